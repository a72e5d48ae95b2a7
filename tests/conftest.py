"""Shared fixtures: a real local Ray (2 CPUs), a tiny random Llama with its tokenizer, data writers.

Test lanes: `pytest -m "not slow"` is the fast lane (unit and mapping tests, no Ray: about a minute);
plain `pytest` (scripts/test.sh, CI) runs everything. A test is slow when it is marked so, or when it
uses a fixture that starts Ray or trains (`RAY_FIXTURES` below): that rule marks it here, at
collection, so a new Ray test lands in the right lane without anyone remembering the mark.
"""

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest

# Fixtures that start Ray (or need a run made on it); a test using any of them, directly or through
# another fixture, is in the slow lane.
RAY_FIXTURES = {"ray_local", "ray_head", "toy_run", "searched", "app"}


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) and "slow" not in item.keywords:
            item.add_marker(slow)


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
