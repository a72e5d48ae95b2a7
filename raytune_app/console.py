"""What `raytune-app` shows on the console, and the run's log file where everything else goes.

    raytune-app run --recipe recipes/quickstart.yaml              # stage lines, progress, the final table
    raytune-app run --recipe recipes/quickstart.yaml --quiet      # warnings, errors and the final result only
    raytune-app run --recipe recipes/quickstart.yaml --verbose    # also Ray's and the libraries' own output

Stage code logs through `logger(stage)` (a standard `logging` logger, `raytune_app.<stage>`); a line is
shown as `[<stage>] message`. Long steps report with `progress(...)`: on a terminal one line that updates
in place, in a file or pipe a line every PROGRESS_EVERY_S seconds and the last one.

By default the console gets our lines only. Everything else, at INFO and above, goes to the run's log
file (`<run dir>/raytune-app.log`, `log_file` says where): Ray's own logs, Ray Data's progress and
execution summaries, what Ray workers print (Ray Train and Ray Data actors: transformers and
bitsandbytes warnings, DeepSpeed notices, tracebacks of failed attempts), Python warnings. The lines our
code logs inside a Ray worker (training progress) reach the driver through Ray's log streaming and are
picked out by their `[<stage>] ` prefix. Pure `logging`; Ray is touched only by `route_ray_output`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time

ROOT = "raytune_app"
# Marks a progress line on its way from a Ray worker to the driver's console (a zero-width space: it
# shows as nothing where it is not recognised).
PROGRESS_MARK = "\u200b"
PROGRESS_EVERY_S = 30.0
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET, NORMAL, VERBOSE = -1, 0, 1

STAGES = (
    "raytune-app",
    "prepare",
    "distill",
    "train",
    "tune",
    "evaluate",
    "register",
    "serve",
    "guard",
    "pairs",
    "export",
    "storage",
    "run",
)
_OURS = re.compile(r"^(\u200b?)\[(" + "|".join(re.escape(s) for s in STAGES) + r")\] ")
_COUNT = re.compile(r"(\d+)/(\d+)")


class _State:
    verbosity: int = NORMAL
    file_handler: logging.FileHandler | None = None
    log_file: str | None = None


_state = _State()


def logger(stage: str | None = None) -> logging.Logger:
    """The logger of a stage (`[stage]` on the console); the package's own (`[raytune-app]`) without one."""
    _ensure_console()
    return logging.getLogger(f"{ROOT}.{stage}" if stage else ROOT)


def progress(log: logging.Logger, done: int, total: int, text: str) -> None:
    """A progress report of a long step (`done` of `total`): one updating line on a terminal."""
    log.info(text, extra={"progress": (done, total)})


class _Console:
    """Writes our lines to the sys.stdout of the moment (so pytest's capsys and redirect_stdout see
    them), warnings and errors to sys.stderr: progress lines update in place on a terminal, and are
    thinned out elsewhere."""

    def __init__(self) -> None:
        self.open_line = False  # a progress line is on screen without its newline
        self.last_progress: dict[str, float] = {}

    def write(self, line: str, progress: tuple[int, int] | None = None, key: str = "", to_stderr: bool = False) -> None:
        out = sys.stdout
        if to_stderr:
            if self.open_line:  # end the progress line on screen before the warning
                out.write("\n")
                out.flush()
                self.open_line = False
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            return
        tty = bool(getattr(out, "isatty", lambda: False)())
        if progress is not None:
            done, total = progress
            now = time.monotonic()
            if tty:
                out.write("\r\033[K" + line)
                self.open_line = True
                if done >= total:
                    out.write("\n")
                    self.open_line = False
                out.flush()
                return
            last = self.last_progress.get(key)
            if done < total and last is not None and now - last < PROGRESS_EVERY_S:
                return
            self.last_progress[key] = now
        if self.open_line:
            out.write("\n")
            self.open_line = False
        out.write(line + "\n")
        out.flush()


_console = _Console()


class _StageFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = record.name.split(".")
        stage = parts[1] if len(parts) > 1 and parts[0] == ROOT else "raytune-app"
        text = f"[{stage}] {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _ConsoleHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            progress = getattr(record, "progress", None)
            if progress is not None and not _in_driver():
                # In a Ray worker: mark the line so the driver's console can treat it as progress.
                line = PROGRESS_MARK + line
                progress = None
            _console.write(line, progress, key=record.name, to_stderr=record.levelno >= logging.WARNING)
        except Exception:  # a console that cannot be written to must not stop a stage
            self.handleError(record)


def _in_driver() -> bool:
    """False inside a Ray worker process (Ray Train worker, Ray Data actor, Tune trial)."""
    ray_worker = sys.modules.get("ray._private.worker")
    if ray_worker is None:
        return True
    return getattr(ray_worker.global_worker, "mode", None) != getattr(ray_worker, "WORKER_MODE", 1)


_LEVELS = {QUIET: logging.WARNING, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}


def _ensure_console() -> None:
    ours = logging.getLogger(ROOT)
    handler = next((h for h in ours.handlers if isinstance(h, _ConsoleHandler)), None)
    if handler is None:
        handler = _ConsoleHandler()
        handler.setFormatter(_StageFormatter())
        ours.addHandler(handler)
        # Everything reaches our handlers (the log file keeps debug lines); the console handler filters.
        ours.setLevel(logging.DEBUG)
        # Our lines go to the console once; the run's log file gets them through its own handler.
        ours.propagate = False
    handler.setLevel(_LEVELS[_state.verbosity])


def setup(verbosity: int = NORMAL) -> None:
    """Console level for this process: QUIET (warnings and errors), NORMAL, VERBOSE (debug, and every
    library's output on the console too). Python warnings become log records (the log file's)."""
    _state.verbosity = verbosity
    _ensure_console()
    logging.captureWarnings(True)
    if verbosity >= VERBOSE:
        # Libraries' records on the console as well (the root logger's handler, set once).
        root = logging.getLogger()
        if not any(getattr(h, "_raytune_verbose", False) for h in root.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            handler._raytune_verbose = True  # type: ignore[attr-defined]
            root.addHandler(handler)
        root.setLevel(logging.INFO)


# Libraries whose INFO records are per-statement or per-object chatter, not events of the run: MLflow's
# SQLAlchemy store logs every SQL statement (and builds it) once the root logger is at INFO, torch's inductor
# one line per kernel template, transformers a whole model config per load. A tiny quickstart run wrote
# ~7,000 such lines. Their warnings and errors still reach the log file; --verbose shows everything.
CHATTY_LIBRARIES = ("sqlalchemy", "alembic", "torch._inductor", "torch._dynamo", "transformers", "urllib3", "botocore")


def _cap_chatty_libraries() -> None:
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def attach_log_file(run_dir: str) -> str:
    """Send every log record (ours, Ray's, the libraries', Python warnings) to the run's log file, from now
    until `detach_log_file`; returns its path. A remote run directory (s3://...) keeps its log locally."""
    import tempfile

    detach_log_file()
    if "://" in run_dir:
        folder = os.path.join(tempfile.gettempdir(), "raytune_app", "logs", run_dir.rstrip("/").rsplit("/", 1)[-1])
    else:
        folder = run_dir
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "raytune-app.log")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.setLevel(logging.INFO)  # Ray Data's logger passes DEBUG records: a file of a sensible size
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    _state.file_handler = handler
    logging.getLogger(ROOT).addHandler(handler)  # ours do not propagate (they reach the console once)
    if _state.verbosity < VERBOSE:
        _cap_chatty_libraries()
    quiet_libraries(ray_data=False)
    _state.log_file = path
    logging.getLogger(ROOT).debug("log file %s, command line: %s", path, " ".join(sys.argv))
    return path


def detach_log_file() -> None:
    handler = _state.file_handler
    if handler is None:
        return
    for name in ["", *logging.Logger.manager.loggerDict]:
        logging.getLogger(name).removeHandler(handler)
    handler.close()
    _state.file_handler = _state.log_file = None


def record_failure(command: str, exc: BaseException) -> None:
    """The traceback of a failed command into the run's log file (only there: the console shows the
    message, or the traceback of a bug, itself)."""
    if _state.file_handler is not None:
        failures = logging.getLogger("raytune_app_failures")
        failures.addHandler(logging.NullHandler())  # never Python's last-resort console handler
        failures.error("%s stopped", command, exc_info=exc)


def log_file() -> str | None:
    """Where this process's run log is (None before `attach_log_file`)."""
    return _state.log_file


def quiet_libraries(ray_data: bool = True) -> None:
    """Library output off the console and into the log file, unless --verbose: every library logger
    that writes to the console itself (Ray's, Ray Data's, transformers', MLflow's, alembic's) keeps only
    its errors there and also writes to the log file; with `ray_data`, Ray Data's progress bars go off.
    Idempotent and cheap: called again after stages import more libraries."""
    if ray_data and _state.verbosity < VERBOSE:
        import ray.data  # configures its own console logger when first imported: before the loop below

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.enable_operator_progress_bars = False
        context.print_on_execution_start = False
    handler = _state.file_handler
    for name, lg in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(lg, logging.Logger) or name == ROOT or name.startswith(ROOT + "."):
            continue
        own = [h for h in lg.handlers if not isinstance(h, logging.FileHandler)]
        if _state.verbosity < VERBOSE:
            for h in own:
                if isinstance(h, logging.StreamHandler) and h.level < logging.ERROR:
                    h.setLevel(logging.ERROR)
        if handler is not None and not lg.propagate and handler not in lg.handlers:
            lg.addHandler(handler)
            if lg.level > logging.INFO and not name.startswith(CHATTY_LIBRARIES):
                lg.setLevel(logging.INFO)  # e.g. Ray's own loggers: their INFO lines belong in the log file
    if handler is not None and _state.verbosity < VERBOSE:
        # Ray's LLM modules give each of their loggers a console handler when it is first made (mid-stage,
        # e.g. ray.data.llm's "No cloud storage mirror configured") unless "ray.llm" has a handler already:
        # it gets the log file's, and those later loggers write there through it.
        llm = logging.getLogger("ray.llm")
        if handler not in llm.handlers:
            llm.addHandler(handler)
            llm.propagate = False  # "ray" also writes to the log file: each line once
            llm.setLevel(logging.INFO)


def ray_init_logging() -> dict:
    """`ray.init` arguments for its logging: Ray's default console logger with --verbose, else none (its
    records reach the log file through the handlers `quiet_libraries` set)."""
    # Ray keeps the handlers its "ray" logger has (its console one, made errors-only by quiet_libraries,
    # and the log file's) and sets their format: the log file's own, so its lines stay alike.
    return {"logging_level": "INFO", "logging_format": FILE_FORMAT}


def route_ray_output() -> bool:
    """Lines Ray workers print (streamed to this driver by `ray.init(log_to_driver=True)`): ours to the
    console (progress as progress), the rest to the log file. Returns False where this Ray has no such
    stream to take over (then Ray prints them as it does by default). Not with --verbose."""
    if _state.verbosity >= VERBOSE:
        return False
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # a Ray without this (private) dispatcher: its default printing stays
        return False
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("raytune_app")
    dispatcher.add_handler("raytune_app", _from_ray_worker)
    return True


_worker_log = logging.getLogger("ray_worker_output")
_last_line: dict = {}


def _from_ray_worker(data: dict) -> None:
    """One batch of lines a Ray worker printed: {pid, actor_name, task_name, is_err, lines, ...}."""
    who = data.get("actor_name") or data.get("task_name") or "worker"
    lines = data.get("lines", [])
    if data.get("pid") == "autoscaler":  # its status report every few seconds: only its events, as Ray does
        from ray._private.worker import filter_autoscaler_events

        lines, who = list(filter_autoscaler_events(lines)), "autoscaler"
    for line in lines:
        found = _OURS.match(line)
        if found and _last_line.get(data.get("pid")) == line:
            continue  # Ray Train hands a worker's print to its logger too: the same line twice
        if found:
            _last_line[data.get("pid")] = line
        if found and _state.verbosity >= NORMAL:
            text = line[len(found.group(1)) :]
            progress = None
            if found.group(1):
                count = _COUNT.search(text)
                progress = (int(count.group(1)), int(count.group(2))) if count else (0, 1)
            _console.write(text, progress, key=f"{data.get('pid')}:{found.group(2)}")
        else:
            _worker_log.info("(%s pid=%s) %s", who, data.get("pid"), line)
