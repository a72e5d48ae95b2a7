"""Pipelines with `run.output_dir: s3://...` on a real S3-compatible server (moto's, started on a loopback port
by conftest `s3_server` and stopped after), configured only through the standard AWS_* variables, as it would
be against real S3.

The default lane's pipeline on a bucket is the quickstart's (tests/test_quickstart.py: its run directory is in a
bucket). Here, in the extended lane, the whole drill: prepare -> distill (program teacher; the cache persisted
in the bucket) -> train (the driver killed mid-run; the next run resumes from the Ray Train checkpoint in the
bucket) -> tune (one trial, its checkpoints in the bucket) -> evaluate -> register -> serve (an adapter loaded
from the bucket, and the registry's champion), then a run that reuses everything and a distill re-run that asks
the teacher nothing.
"""

import json
import signal
import socket
import time

import pytest
import yaml
from conftest import CliRun

from raytune_app import storage

pytestmark = pytest.mark.slow
TIMEOUT = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpointed(train_uri: str) -> bool:
    """Whether Ray Train has recorded a checkpoint of the run in the bucket (its manager snapshot is written
    once a checkpoint is persisted)."""
    return storage.exists(f"{train_uri}/checkpoint_manager_snapshot.json")


def _arithmetic_rows_in(bucket: str, count: int) -> list[dict]:
    from raytune_app.data import arithmetic

    rows = arithmetic.generate(count, seed=5)
    storage.write_text(
        f"{bucket}/data/arith.jsonl",
        "".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows),
    )
    return rows


@pytest.mark.extended
def test_the_pipeline_on_s3_with_a_killed_driver_resume_registry_and_serving(
    bucket_env, ray_head, tiny_model, tmp_path
):
    import httpx

    bucket = bucket_env["bucket"]("pipeline")
    rows = _arithmetic_rows_in(bucket, 40)
    port = _free_port()
    recipe = {
        "run": {
            "name": "s3toy",
            "output_dir": f"{bucket}/runs",
            "stages": ["prepare", "distill", "train", "tune", "evaluate", "register"],
        },
        "model": {"path": tiny_model},
        "data": {
            "sources": [f"{bucket}/data/arith.jsonl"],
            "columns": {"prompt": "question", "response": "answer"},
            "max_seq_length": 192,
            "split": {"val": 0.15, "test": 0.15},
        },
        "distill": {"teacher": {"backend": "program", "program": "arithmetic"}},
        "train": {
            "workers": 1,
            "max_steps": 6,
            "batch_size": 4,
            "learning_rate": 3e-3,
            "warmup": 0,
            "logging_steps": 1,
            "checkpoint": {"every_steps": 2, "keep_best": 1},
            "lora": {"rank": 4, "dropout": 0.0},
            "distill": {"rationale_weight": 1.0},
        },
        "tune": {
            "search_space": {"train.learning_rate": {"choice": [1e-3]}},
            "algorithm": "grid",
            "max_concurrent_trials": 1,
            "early_stopping": {"asha": False},
        },
        "evaluate": {"task": "free_text", "max_new_tokens": 6, "batch_size": 8, "limit": 6},
        # The registry's database cannot live in a bucket; its artefacts go to <run dir>/mlartifacts there.
        "registry": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "serve": {
            "port": port,
            "guard": {"mode": "off"},
            "backup": None,
            "adapters": {"from-bucket": f"{bucket}/runs/s3toy/train/adapter"},
            "limits": {"default_max_tokens": 6},
            "deployments": {name: {"num_cpus": 0.25} for name in ("llm", "ingress", "router")},
        },
    }
    recipe_file = tmp_path / "s3.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_dir = f"{bucket}/runs/s3toy"

    # 1. Killed mid-training, after a checkpoint reached the bucket (the driver, like a lost spot node).
    first = CliRun(["run", str(recipe_file)], ray_head["env"])
    deadline = time.monotonic() + TIMEOUT
    while not _checkpointed(f"{run_dir}/train") and first.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _checkpointed(f"{run_dir}/train"), first.output[-4000:]
    first.process.send_signal(signal.SIGKILL)
    first.finish(60)
    assert storage.exists(f"{run_dir}/prepare/CURRENT")  # the pointer layout: no folder renames on S3
    assert not storage.exists(f"{run_dir}/train/manifest.json")
    distilled = storage.load_json(f"{storage.current(run_dir + '/distill')}/manifest.json")
    assert distilled["teacher_calls"] == distilled["inputs"] > 0
    assert storage.list_files(f"{run_dir}/distill-cache", ".jsonl")  # the teacher cache is in the bucket

    # 2. The next run continues from the checkpoint in the bucket and does the remaining stages.
    second = CliRun(["run", str(recipe_file)], ray_head["env"])
    assert second.finish(TIMEOUT) == 0, second.output[-4000:]
    assert "resuming from step" in second.output and "train resumed" in second.output, second.output[-4000:]
    assert "prepare reused; distill reused" in second.output
    trained = storage.load_json(f"{run_dir}/train/manifest.json")
    assert trained["global_step"] == 6 and trained["weights"] == f"{run_dir}/train/adapter"
    assert storage.load_json(f"{run_dir}/tune/summary.json")["best"]["trial_id"]
    metrics = storage.load_json(f"{storage.current(run_dir + '/evaluate')}/metrics.json")
    assert set(metrics["models"]) == {"base", "tuned"}

    from raytune_app.registry import store

    version = store.show(f"sqlite:///{tmp_path}/mlflow.db", "s3toy", "@champion")
    assert version["source"].startswith(f"{run_dir}/mlartifacts/"), version["source"]
    assert storage.exists(f"{version['source']}/adapter_model.safetensors")

    # 3. Everything reused; 4. the distill stage forced again asks the teacher nothing (cache in the bucket).
    third = CliRun(["run", str(recipe_file)], ray_head["env"])
    assert third.finish(TIMEOUT) == 0, third.output[-4000:]
    summary = next(line for _, line in third.lines if line.startswith("[run] stages: "))
    assert all(f"{stage} reused" in summary for stage in ("prepare", "distill", "train", "tune", "evaluate")), summary
    again = CliRun(["distill", "--recipe", str(recipe_file), "--force"], ray_head["env"])
    assert again.finish(TIMEOUT) == 0, again.output[-4000:]
    distilled = storage.load_json(f"{storage.current(run_dir + '/distill')}/manifest.json")
    assert distilled["teacher_calls"] == 0 and distilled["cache_hits"] == distilled["inputs"]

    # 5. Serving: an adapter straight from the bucket, and the champion whose artefacts are in the bucket.
    serve = CliRun(["serve", "--recipe", str(recipe_file), "--no-block"], ray_head["env"])
    assert serve.finish(TIMEOUT) == 0, serve.output[-4000:]
    for model in ("from-bucket", "s3toy"):
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": rows[0]["question"]}]},
            timeout=180,
        )
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-raytune-failover"] == "false" and reply.json()["choices"][0]["message"]["content"]
        if model == "s3toy":  # the registry's champion (tune registers its best trial too)
            assert reply.headers["x-raytune-served-by"].startswith("s3toy/"), reply.headers
