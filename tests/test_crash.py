"""Kill anything at any moment, lose nothing: `raytune-app run` under SIGKILL, for real.

A small recipe (prepare -> distill -> train -> evaluate -> register on a tiny random Llama) runs once
cleanly as the reference. Then, in fresh run directories, a seeded schedule kills, during each stage
at a random moment of it (drawn from the reference run's stage durations):

- the driver (`raytune-app run` itself, SIGKILL), then runs the command again;
- separately, a busy Ray worker of that stage (a Ray Data task or actor, a Ray Train worker), and
  runs the command again where the kill made it fail.

After every kill, each stage output that was complete before it must still be there, whole and
unchanged; at the end one more run must finish, reporting what it reused / resumed / recomputed,
and its artefacts must equal the reference run's: the prepared and distilled splits' content
hashes, the adapter weights (within a small tolerance: a resumed run replays the same steps from a
checkpoint), the evaluation metrics and a registered version of the same training run.

The CLI runs join a Ray head of the module's own (conftest `ray_head`), as drivers do on a cluster,
so a killed driver's work is cleaned up by Ray while the cluster stays up.
"""

import hashlib
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
from conftest import CliRun

from raytune_app import storage

pytestmark = [pytest.mark.slow, pytest.mark.extended]

STAGES = ["prepare", "distill", "train", "evaluate", "register"]
# The processes a stage keeps busy, by the title Ray gives them (ray::<task or actor>).
WORKER_TITLES = {
    "prepare": ("MapBatches", "ReadSourceFiles", "Write"),
    "distill": ("MapBatches", "MapWorker"),
    "train": ("RayTrainWorker",),
    "evaluate": ("MapWorker",),
}
RUN_TIMEOUT = 600  # seconds for one `raytune-app run`; far above what it takes, so only a hang trips it


def _recipe_file(root: Path, model: str) -> Path:
    from raytune_app.data import arithmetic

    source = root / "arith.jsonl"
    source.write_text(
        "".join(
            json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in arithmetic.generate(48, 3)
        )
    )
    recipe = {
        "run": {"name": "crash", "output_dir": str(root / "reference"), "stages": STAGES},
        "model": {"path": model},
        "data": {
            "sources": [str(source)],
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
            "max_failures": 1,
            "checkpoint": {"every_steps": 2, "keep_best": 1},
            "lora": {"rank": 4, "dropout": 0.0},
            "distill": {"rationale_weight": 1.0},
        },
        "evaluate": {"task": "free_text", "include_base": False, "max_new_tokens": 6, "batch_size": 8, "limit": 8},
    }
    import yaml

    path = root / "crash.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _run(recipe: Path, run_dir: Path, env: dict) -> CliRun:
    return CliRun(["run", str(recipe), f"run.output_dir={run_dir}"], env)


# ------------------------------------------------------------------------------ what is on disk


def _split_digest(folder: str) -> dict:
    """Per split: sha256 of the sorted content hashes (and tasks) of its rows, read from the Parquet files."""
    import pyarrow.parquet as pq

    out = {}
    for split in ("train", "val", "test"):
        files = storage.list_files(storage.join(storage.current(folder), split), ".parquet")
        if not files:
            continue
        keys = []
        for f in files:
            table = pq.read_table(f)
            tasks = table["task"].to_pylist() if "task" in table.column_names else [""] * table.num_rows
            keys += [f"{h}:{t}" for h, t in zip(table["content_hash"].to_pylist(), tasks)]
        out[split] = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()
    return out


def _tree_digest(folder: str) -> str:
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            digest.update(name.encode() + Path(root, name).read_bytes())
    return digest.hexdigest()


def _complete(run_dir: Path) -> dict:
    """stage -> digest of its output, for every stage whose output is complete (a readable manifest and
    the files it promises). Raises if a state file a reader would trip over is damaged."""
    base = run_dir / "crash"
    done = {}
    for stage in ("prepare", "distill"):
        manifest = storage.read_json(str(Path(storage.current(str(base / stage))) / "manifest.json"))
        if manifest is not None:
            splits = _split_digest(str(base / stage))
            assert set(splits) >= {"train", "val"}, f"{stage}: a manifest without its splits"
            done[stage] = (manifest["fingerprint"], splits)
    trained = storage.read_json(str(base / "train" / "manifest.json"))
    if trained is not None:
        from raytune_app import integrity

        assert integrity.weights_problem(trained["weights"]) is None
        done["train"] = (trained["fingerprint"], _tree_digest(storage.current(trained["weights"])))
    metrics = storage.read_json(str(Path(storage.current(str(base / "evaluate"))) / "metrics.json"))
    if metrics is not None:
        done["evaluate"] = (metrics["fingerprint"], metrics["created"])
    if (base / "mlflow.db").exists():
        from raytune_app.registry import store

        client = store.client(f"sqlite:///{base}/mlflow.db")
        if "crash" in [m.name for m in client.search_registered_models()]:
            done["register"] = {v.tags.get("train_fingerprint") for v in client.search_model_versions("name = 'crash'")}
    return done


def _assert_nothing_lost(before: dict, after: dict, what: str) -> None:
    for stage, digest in before.items():
        assert stage in after, f"{what}: the complete {stage} output is gone"
        if stage == "register":
            assert digest <= after[stage], f"{what}: a registered version is gone"
        else:
            assert after[stage] == digest, f"{what}: the complete {stage} output was changed"


def _artefacts(run_dir: Path) -> dict:
    """What a finished run must have made, comparable across run directories."""
    from safetensors.torch import load_file

    base = run_dir / "crash"
    trained = storage.load_json(str(base / "train" / "manifest.json"))
    metrics = storage.load_json(str(Path(storage.current(str(base / "evaluate"))) / "metrics.json"))
    tuned = {k: v for k, v in metrics["models"]["tuned"].items() if k not in ("latency", "seconds", "weights")}
    prepared = storage.load_json(str(Path(storage.current(str(base / "prepare"))) / "manifest.json"))
    return {
        "prepared": (
            {s: v["content_hash"] for s, v in prepared["splits"].items()},
            _split_digest(str(base / "prepare")),
        ),
        "distilled": _split_digest(str(base / "distill")),
        "train": (trained["fingerprint"], trained["global_step"]),
        "weights": {
            name: tensor.clone()  # load_file maps the file; the run directory may change under it
            for name, tensor in load_file(
                str(Path(storage.current(trained["weights"])) / "adapter_model.safetensors")
            ).items()
        },
        "metrics": tuned,
        "registered": _complete(run_dir)["register"],
    }


def _assert_same(got: dict, want: dict, what: str) -> None:
    import torch

    for key in ("prepared", "distilled", "train", "metrics", "registered"):
        assert got[key] == want[key], f"{what}: {key} differs from the clean run's"
    assert got["weights"].keys() == want["weights"].keys()
    for name, tensor in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], tensor, atol=1e-5, rtol=1e-4, msg=f"{what}: {name}")


# ------------------------------------------------------------------------------------ killing


def _busy_workers(head: dict, titles: tuple[str, ...]) -> list:
    """The head's worker processes running one of `titles` (processes this test's head started)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if cmdline and cmdline[0].startswith("ray::") and any(t in cmdline[0] for t in titles):
                raylet = proc.parent()
                if raylet is not None and any(head["temp_dir"] in part for part in raylet.cmdline()):
                    found.append(proc)
        except psutil.Error:
            continue
    return found


def _kill_a_worker(head: dict, stage: str, patience: float = 20.0) -> str | None:
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        busy = _busy_workers(head, WORKER_TITLES[stage])
        if busy:
            victim = busy[0]
            title = victim.cmdline()[0]
            victim.send_signal(signal.SIGKILL)
            return title
        time.sleep(0.1)
    return None


def _abuse(recipe: Path, run_dir: Path, head: dict, durations: dict, kind: str, seed: int) -> list[str]:
    """Run the recipe under the kill schedule (`kind`: driver or worker, one kill per stage at a seeded
    random moment within it), re-running after every run that died, until the schedule is used up;
    checks after each run that no complete output was lost. Returns what happened, for messages."""
    rng = random.Random(seed)
    pending = [s for s in STAGES if kind == "driver" or s in WORKER_TITLES]
    events, runs = [], 0
    while pending:
        runs += 1
        assert runs <= 2 * len(STAGES) + 2, f"too many runs: {events}"
        before = _complete(run_dir)
        run = _run(recipe, run_dir, head["env"])
        while pending:
            stage = pending[0]
            began = run.wait_for(f"[run] {stage}: starting", timeout=RUN_TIMEOUT)
            if began is None:
                break  # this run ended (a worker kill made it fail, or it finished): run again
            pending.pop(0)
            moment = rng.uniform(0.05, 0.95) * durations[stage]
            time.sleep(max(0.0, began + moment - time.monotonic()))
            if kind == "driver":
                run.process.send_signal(signal.SIGKILL)
                events.append(f"driver killed {moment:.1f} s into {stage}")
                break
            victim = _kill_a_worker(head, stage)
            events.append(f"{victim or 'no busy worker'} killed {moment:.1f} s into {stage}")
        code = run.finish(timeout=RUN_TIMEOUT)
        events.append(f"run {runs} ended with {code}")
        _assert_nothing_lost(before, _complete(run_dir), f"after {events[-2:]}")
    return events


@pytest.fixture(scope="module")
def reference(ray_head, tiny_model, tmp_path_factory):
    """(recipe file, stage durations, artefacts) of a clean run."""
    root = tmp_path_factory.mktemp("crash")
    recipe = _recipe_file(root, tiny_model)
    run = _run(recipe, root / "reference", ray_head["env"])
    code = run.finish(timeout=RUN_TIMEOUT)
    assert code == 0, run.output[-4000:]
    starts = [run.wait_for(f"[run] {stage}: starting", 0) for stage in STAGES] + [run.wait_for("[run] done", 0)]
    durations = {stage: starts[i + 1] - starts[i] for i, stage in enumerate(STAGES)}
    return recipe, durations, _artefacts(root / "reference"), root


@pytest.mark.parametrize("kind,seed", [("driver", 11), ("worker", 12)])
def test_killed_at_random_moments_the_run_finishes_with_the_clean_runs_artefacts(reference, ray_head, kind, seed):
    recipe, durations, want, root = reference
    run_dir = root / f"killed-{kind}"
    events = _abuse(recipe, run_dir, ray_head, durations, kind, seed)
    final = _run(recipe, run_dir, ray_head["env"])
    assert final.finish(timeout=RUN_TIMEOUT) == 0, final.output[-4000:]
    summary = next(line for _, line in final.lines if line.startswith("[run] stages: "))
    assert all(f"{stage} " in summary for stage in STAGES), summary
    _assert_same(_artefacts(run_dir), want, f"{kind} kills ({'; '.join(events)})")
