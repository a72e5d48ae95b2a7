"""Ray job submission, for real: a `ray start --head` of its own, `ray job submit` and JobSubmissionClient.

The head runs on loopback with its own --temp-dir and free ports (so it is never the cluster another
process's plain `ray.init()` finds, and it clashes with no other Ray on the machine), and it is stopped,
by the pids of its processes, when the module's tests are done. The two jobs that are meant to fail
are submitted first and run while the pipeline job does (the head has the CPUs: they take none), so
the module waits for job start-up once rather than three times.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port, stop_ray_head

pytestmark = pytest.mark.extended  # the long tail beyond the default suite (tests/conftest.py)
REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"
ANSWERS = ['{"status": "ok"}', '{"status": "refund"}', '{"status": "late"}']


@pytest.fixture(scope="module")
def ray_head():
    """(dashboard URL, environment for the ray CLI) of a fresh local Ray head."""
    # A short path: Ray's socket paths live under it and must stay below the OS limit.
    temp_dir = tempfile.mkdtemp(prefix="rtjob-", dir="/tmp")
    ports = {
        name: free_port()
        for name in (
            "port",
            "dashboard-port",
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
            "node-manager-port",
            "object-manager-port",
        )
    }
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # Local clusters turn token authentication on by default in Ray 2.60; the job's `python` must be this
    # interpreter (with the project's dependencies); the job has no network.
    env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", PATH=f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}")
    command = [
        str(RAY),
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--temp-dir",
        temp_dir,
        "--num-cpus",
        "2",
        "--include-dashboard",
        "true",
        "--disable-usage-stats",
    ]
    command += [arg for name, port in ports.items() for arg in (f"--{name}", str(port))]
    try:
        for _ in range(3):  # a busy shared machine can make the head miss Ray's 30 s start-up window
            started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
            if started.returncode == 0 or "timed out during startup" not in started.stderr + started.stdout:
                break
            stop_ray_head(temp_dir)
        assert started.returncode == 0, started.stderr[-3000:]
        yield f"http://127.0.0.1:{ports['dashboard-port']}", env
    finally:
        stop_ray_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _toy_recipe(root: Path, model: str, **extra) -> Path:
    """A recipe file over a small learnable set; its run directory is a separate folder standing in for shared
    storage."""
    source = root / "toy.jsonl"
    source.write_text(
        "".join(json.dumps({"q": f"ticket {i}: classify, word {i % 7}", "a": ANSWERS[i % 3]}) + "\n" for i in range(80))
    )
    recipe = {
        "run": {"name": "jobtoy", "output_dir": str(root / "shared" / "runs"), "stages": ["prepare", "train"]},
        "model": {"path": model},
        "data": {
            "sources": [str(source)],
            "columns": {"prompt": "q", "response": "a"},
            "max_seq_length": 128,
            "split": {"val": 0.15, "test": 0.15},
            "tokenizer_actors": 1,
        },
        "train": {
            "workers": 1,
            "max_steps": 4,
            "batch_size": 4,
            "learning_rate": 5e-3,
            "warmup": 0,
            "logging_steps": 2,
            "checkpoint": {"every_steps": 4, "keep_best": 1},
            "lora": {"rank": 4, "dropout": 0.0},
        },
        "evaluate": {"backend": "transformers", "task": "free_text", "max_new_tokens": 8, "batch_size": 8, "limit": 6},
    }
    for dotted, value in extra.items():
        node = recipe
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    path = root / "toy.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _wait(client, job_id: str, timeout_s: float = 600):
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(2)
    raise AssertionError(f"job {job_id} still {status} after {timeout_s} s:\n{client.get_job_logs(job_id)[-3000:]}")


def _runtime_env() -> dict:
    return yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text()) | {"working_dir": str(REPO)}


@pytest.fixture(scope="module")
def failing_jobs(ray_head, tiny_model, tmp_path_factory):
    """{name: (job id, folder)}: an invalid recipe, and a recipe whose workers wait for GPUs that never come,
    submitted with the SDK before the pipeline job starts; the tests below read how they ended."""
    from ray.job_submission import JobSubmissionClient

    address, _ = ray_head
    before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    client = JobSubmissionClient(address)
    jobs = {}
    invalid = tmp_path_factory.mktemp("invalid")
    recipe = _toy_recipe(invalid, str(tiny_model), train__lora={"rnak": 4})
    jobs["invalid"] = (
        client.submit_job(entrypoint=f"python jobs/pipeline.py --recipe {recipe}", runtime_env=_runtime_env()),
        invalid,
    )
    gpu = tmp_path_factory.mktemp("gpu")
    recipe = _toy_recipe(gpu, str(tiny_model), train__use_gpu=True, train__workers=2)
    runtime_env = _runtime_env()
    runtime_env["env_vars"] = runtime_env["env_vars"] | {"RAYTUNE_GPU_WAIT_S": "3"}
    jobs["gpu"] = (
        client.submit_job(entrypoint=f"python jobs/train.py --recipe {recipe}", runtime_env=runtime_env),
        gpu,
    )
    yield jobs
    if before is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = before


def test_pipeline_job_then_evaluate_job_on_shared_storage(ray_head, failing_jobs, tiny_model, tmp_path, monkeypatch):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, env = ray_head
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    recipe = _toy_recipe(tmp_path, str(tiny_model))
    run_dir = tmp_path / "shared" / "runs" / "jobtoy"

    # The CLI, exactly as the docs write it: uploads the working directory, streams the logs, waits.
    submitted = subprocess.run(
        [
            str(RAY),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            ".",
            "--runtime-env",
            "jobs/runtime_env.yaml",
            "--",
            "python",
            "jobs/pipeline.py",
            "--recipe",
            str(recipe),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-5000:]
    assert "succeeded" in output and "[run] done: prepare" in output

    prepared = json.loads((run_dir / "prepare" / "manifest.json").read_text())
    assert prepared["rows_in"] == 80 and prepared["rows_out"]["train"] > 0
    trained = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert trained["global_step"] == 4 and not trained["use_gpu"]
    assert (run_dir / "train" / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "recipe.yaml").is_file()

    client = JobSubmissionClient(address)
    (job,) = [j for j in client.list_jobs() if j.entrypoint == f"python jobs/pipeline.py --recipe {recipe}"]
    assert job.status == JobStatus.SUCCEEDED
    # The driver registered with this head's GCS: the job joined the cluster rather than starting its own.
    assert job.driver_info is not None

    # The SDK, one more stage: evaluate reads the prepared split and the adapter the first job left on
    # the shared run directory.
    job_id = client.submit_job(entrypoint=f"python jobs/evaluate.py --recipe {recipe}", runtime_env=_runtime_env())
    status = _wait(client, job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    assert "inside a Ray job" in logs
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert set(metrics["models"]) >= {"base", "tuned"}


def test_invalid_recipe_job_fails_fast_with_the_error_in_ray_job_logs(ray_head, failing_jobs, monkeypatch):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, env = ray_head
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    job_id, folder = failing_jobs["invalid"]
    recipe = folder / "toy.yaml"
    client = JobSubmissionClient(address)
    assert _wait(client, job_id, timeout_s=300) == JobStatus.FAILED

    logs = subprocess.run(
        [str(RAY), "job", "logs", "--address", address, job_id], env=env, capture_output=True, text=True, timeout=120
    ).stdout
    assert f"{recipe}: 1 problem(s) in the recipe" in logs
    assert "train.lora.rnak: unknown key; did you mean `rank`?" in logs
    info = client.get_job_info(job_id)
    # Exit code 2 (invalid recipe), and the driver never connected to Ray: nothing ran before the check.
    assert info.driver_exit_code == 2 and info.driver_info is None
    assert not (folder / "shared" / "runs").exists()


def test_gpu_recipe_job_asks_for_gpus_and_stops_when_none_come(ray_head, failing_jobs, monkeypatch):
    """A recipe whose workers take GPUs asks the autoscaler for them before any stage starts; a cluster that
    never gets them (this CPU head) fails the job with the reason once RAYTUNE_GPU_WAIT_S has passed."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, _ = ray_head
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    job_id, folder = failing_jobs["gpu"]
    client = JobSubmissionClient(address)
    assert _wait(client, job_id, timeout_s=300) == JobStatus.FAILED
    logs = client.get_job_logs(job_id)
    assert "the cluster has 0 GPU(s), this stage needs 2: asking the autoscaler for [{'GPU': 2}]" in logs
    assert "error: the cluster still has 0 GPU(s) after 3 s, this stage needs 2" in logs
    assert client.get_job_info(job_id).driver_exit_code == 1
    assert not (folder / "shared" / "runs" / "jobtoy" / "train").exists()
