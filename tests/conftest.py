"""Shared fixtures: a real local Ray (2 CPUs), a tiny random Llama with its tokenizer, data writers."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest


@pytest.fixture(scope="session")
def ray_local():
    import ray

    for attempt in range(3):
        if ray.is_initialized():
            break
        try:
            ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        except Exception as exc:  # Ray's raylet gives its agents a fixed 15 s to start (ray-project/ray#65983)
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            ray.shutdown()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


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


def toy_recipe(root, model_path, **train):
    """A recipe over a small learnable set (three fixed JSON answers, a `channel` group column)."""
    from raytune_app import config

    source = root / "toy.jsonl"
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
        (root / "schema.json").write_text(json.dumps(TOY_SCHEMA))
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
                "task": "structured",
                "schema_file": str(root / "schema.json"),
                "group_column": "channel",
                "max_new_tokens": 12,
                "batch_size": 4,
            },
        }
    )


@pytest.fixture(scope="session")
def toy_run(ray_local, tiny_model, tmp_path_factory):
    """(recipe, root): the toy set prepared and a LoRA adapter trained on it for a few steps."""
    from raytune_app.data.prepare import prepare
    from raytune_app.train.run import train

    root = tmp_path_factory.mktemp("toy_run")
    recipe = toy_recipe(root, tiny_model)
    prepare(recipe)
    train(recipe)
    return recipe, root


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
