"""The console and the run's log file (raytune_app/console.py), without Ray: which lines reach the
console at each verbosity, progress lines on a terminal and in a pipe, what Ray workers print (fed as
Ray's log stream hands it to the driver), and what the log file keeps."""

import io
import logging
import sys

import pytest

from raytune_app import console


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def fresh_console(monkeypatch):
    """A clean console state for one test (verbosity, progress throttling, the log file)."""
    monkeypatch.setattr(console, "_state", console._State())
    monkeypatch.setattr(console, "_console", console._Console())
    monkeypatch.setattr(console, "_last_line", {})
    yield
    console.detach_log_file()
    console.setup(console.NORMAL)


def test_stage_lines_and_verbosity(fresh_console, capsys):
    console.setup(console.NORMAL)
    log = console.logger("train")
    log.info("3 worker(s)")
    log.debug("not shown")
    console.logger().info("run `x`")
    assert capsys.readouterr().out == "[train] 3 worker(s)\n[raytune-app] run `x`\n"
    console.setup(console.QUIET)
    log.info("hidden when quiet")
    log.warning("could not log to MLflow")
    assert capsys.readouterr() == ("", "[train] could not log to MLflow\n")  # warnings and errors: stderr


def test_progress_updates_in_place_on_a_terminal_and_is_thinned_in_a_pipe(fresh_console, monkeypatch):
    console.setup(console.NORMAL)
    log = console.logger("evaluate")
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    for done in (1, 2, 3):
        console.progress(log, done, 3, f"tuned: {done}/3 examples")
    log.info("tuned: field f1 0.9")
    assert terminal.getvalue() == (
        "\r\033[K[evaluate] tuned: 1/3 examples\r\033[K[evaluate] tuned: 2/3 examples"
        "\r\033[K[evaluate] tuned: 3/3 examples\n[evaluate] tuned: field f1 0.9\n"
    )
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stdout", pipe)
    for done in range(1, 11):
        console.progress(log, done, 10, f"base: {done}/10 examples")
    # In a file or a pipe: the first line, then one every PROGRESS_EVERY_S seconds, and the last.
    assert pipe.getvalue() == "[evaluate] base: 1/10 examples\n[evaluate] base: 10/10 examples\n"


def test_worker_output_ours_to_the_console_the_rest_to_the_log_file(fresh_console, tmp_path, capsys):
    console.setup(console.NORMAL)
    path = console.attach_log_file(str(tmp_path))
    console._from_ray_worker(
        {
            "pid": 42,
            "actor_name": "RayTrainWorker",
            "lines": [
                "Loading weights: 100%|██████████| 272/272",
                "/site-packages/transformers/training_args.py:1541: FutureWarning: deprecated",
                console.PROGRESS_MARK + "[train] step 2/60  loss 0.71",
                console.PROGRESS_MARK + "[train] step 2/60  loss 0.71",  # Ray Train's second copy of the line
                "[train] resuming from step 40",
            ],
        }
    )
    assert capsys.readouterr().out == "[train] step 2/60  loss 0.71\n[train] resuming from step 40\n"
    console.detach_log_file()
    logged = open(path).read()
    assert "(RayTrainWorker pid=42) Loading weights" in logged and "FutureWarning" in logged
    assert "[train] step 2/60" not in logged.split("ray_worker_output")[-1]  # ours are not duplicated there


def test_the_log_file_gets_our_lines_and_library_records(fresh_console, tmp_path, capsys):
    console.setup(console.NORMAL)
    library = logging.getLogger("some_library")
    library.propagate = False
    noisy = logging.StreamHandler(sys.stderr)
    library.addHandler(noisy)
    try:
        path = console.attach_log_file(str(tmp_path))
        console.logger("prepare").info("60 rows in")
        library.warning("a library notice")
        logging.getLogger("py.warnings").warning("FutureWarning: something")
        console.detach_log_file()
        captured = capsys.readouterr()
        assert captured.out == "[prepare] 60 rows in\n"
        assert "a library notice" not in captured.err  # its console handler now shows errors only
        logged = open(path).read()
        assert "raytune_app.prepare: 60 rows in" in logged and "some_library: a library notice" in logged
        assert "FutureWarning: something" in logged
    finally:
        library.removeHandler(noisy)


def test_ray_llm_loggers_made_mid_run_write_to_the_log_file(fresh_console, tmp_path, capsys):
    # Ray's LLM modules make their loggers (each with a console handler of its own) when first imported,
    # often in the middle of a stage: after the log file is attached.
    from ray.llm._internal.common.observability.logging import get_logger

    console.setup(console.NORMAL)
    path = console.attach_log_file(str(tmp_path))
    get_logger("made_mid_run_for_a_test").info("No cloud storage mirror configured")
    console.detach_log_file()
    captured = capsys.readouterr()
    assert "No cloud storage mirror" not in captured.out + captured.err
    assert open(path).read().count("No cloud storage mirror configured") == 1


def test_quiet_and_verbose_go_before_or_after_the_command():
    from raytune_app.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["validate", "r.yaml"]).verbosity == console.NORMAL
    assert parse(["-q", "run", "r.yaml"]).verbosity == console.QUIET
    assert parse(["run", "r.yaml", "--verbose"]).verbosity == console.VERBOSE
    assert parse(["--verbose", "train", "--recipe", "r.yaml", "train.lora.rank=8"]).verbosity == console.VERBOSE
    with pytest.raises(SystemExit):
        parse(["run", "r.yaml", "-q", "-v"])  # one or the other


def test_the_log_file_keeps_library_warnings_but_not_their_per_statement_chatter(fresh_console, tmp_path):
    import sqlalchemy

    console.setup(console.NORMAL)
    path = console.attach_log_file(str(tmp_path))
    console.quiet_libraries(ray_data=False)  # what every stage calls again after its imports
    # MLflow's store runs SQLAlchemy: with the root logger at INFO it would log every statement.
    engine = sqlalchemy.create_engine("sqlite://")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text("SELECT 41 + 1"))
    logging.getLogger("transformers.configuration_utils").info("Model config LlamaConfig {...}")
    logging.getLogger("transformers.modeling_utils").warning("a transformers warning")
    logging.getLogger("ray.data.some_operator").info("Execution finished")
    console.detach_log_file()
    logged = open(path).read()
    assert "SELECT 41 + 1" not in logged and "LlamaConfig" not in logged
    assert "a transformers warning" in logged and "Execution finished" in logged
