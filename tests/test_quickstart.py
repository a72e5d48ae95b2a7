"""The quickstart pipeline, reduced: `raytune-app run recipes/quickstart.yaml` on the bundled
SmolLM2-135M-Instruct (prepare -> a few LoRA steps -> evaluate base vs tuned -> register), then a
re-run that reuses every stage. Minutes on 2 cores: marked slow, run by default.

Its run directory is in a bucket of a real S3-compatible server (moto's, conftest `s3_server`), reached only
through the standard AWS_* variables as real S3 would be: one end-to-end run checks both promises, the
quickstart and a pipeline on object storage (the generated source, prepare's output, Ray Train's
checkpoints, the adapter, the evaluation and the registered artefacts all in the bucket), at the cost of one.
Local run directories are what every other pipeline test uses; the extended drill on S3 (killed driver,
distill, tune, serving) is in tests/test_s3_pipeline.py."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from raytune_app import cli, storage

pytestmark = pytest.mark.usefixtures("ray_local")  # slow: it uses Ray (tests/conftest.py)
RECIPE = str(Path(__file__).parent.parent / "recipes" / "quickstart.yaml")


def test_quickstart_on_a_bucket_runs_end_to_end_and_reuses_unchanged_stages(bucket_env, tmp_path, capsys):
    bucket = bucket_env["bucket"]("quickstart")
    reduced = [
        f"run.output_dir={bucket}/runs",
        # The registry's database cannot live in a bucket; its artefacts go to <run dir>/mlartifacts there.
        f"registry.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "data.generator.rows=60",
        # Two one-example steps (a step of SmolLM2 in fp32 takes seconds on 2 cores): what is tested is the
        # pipeline, the checkpoint and the table, not the scores.
        "train.max_steps=2",
        "train.batch_size=1",
        "train.logging_steps=1",
        "train.checkpoint.every_steps=2",
        # A few examples, a few tokens each.
        "evaluate.limit=3",
        "evaluate.max_new_tokens=8",
        "evaluate.batch_size=4",
        "evaluate.base_shots=1",  # the recipe's 3 quadruple the base's prompts, and prefill is most of the engine time
        "evaluate.enforce_eager=true",  # vLLM (installed by setup.sh) without torch.compile: starts sooner
    ]
    assert cli.main(["run", RECIPE, *reduced]) == 0
    out = capsys.readouterr().out
    # The default console fits on one screen: stage lines, progress, the table (the rest is in the log file).
    assert len(out.splitlines()) <= 30, out
    # The closing table: base vs tuned, schema-valid rate, field F1, p50 latency; then the report.
    heading = re.search(r"structured metrics on split test \((\d+) examples\):", out)
    assert heading and 1 <= int(heading.group(1)) <= 3, out[-3000:]  # evaluate.limit=3
    table = out[heading.start() :]
    assert "schema valid rate" in table and "field f1" in table and "p50 latency (s)" in table
    assert "base" in table and "tuned" in table
    run_dir = f"{bucket}/runs/quickstart"
    evaluated = storage.current(f"{run_dir}/evaluate")  # the pointer layout: no folder renames on S3
    assert f"report: {evaluated}/report.md" in out, out
    assert "[register] models:/quickstart/1" in out
    # Generation reports its progress, whichever engine ran it, up to its last row.
    assert re.search(r"^\[evaluate\] .+: (\d+)/\1 (generations|examples)$", out, re.M), out

    metrics = storage.load_json(f"{evaluated}/metrics.json")
    assert metrics["base_model"] == "bundled:smollm2-135m-instruct" and set(metrics["models"]) == {"base", "tuned"}
    assert metrics["backend"] == ("vllm" if importlib.util.find_spec("vllm") else "transformers")
    assert set(metrics["models"]["tuned"]["groups"]["per_group"]) <= {"email", "chat", "formal", "terse"}
    for name in ("report.md", "metrics.png", "latency.png", "loss_curve.png", "predictions.parquet"):
        assert storage.exists(f"{evaluated}/{name}"), name
    # Everything else in the bucket too: prepare's output behind its pointer, Ray Train's checkpoint, the
    # adapter (a pointer folder as well), and the registered artefacts.
    assert storage.exists(f"{run_dir}/prepare/CURRENT")
    trained = storage.load_json(f"{run_dir}/train/manifest.json")
    assert trained["global_step"] == 2 and trained["weights"] == f"{run_dir}/train/adapter"
    assert storage.exists(f"{storage.current(run_dir + '/train/adapter')}/adapter_model.safetensors")
    assert storage.exists(f"{run_dir}/train/checkpoint_manager_snapshot.json")  # Ray Train's, in the bucket

    # Nothing changed: every stage is reused and the same version is found in the registry.
    assert cli.main(["run", RECIPE, *reduced]) == 0
    again = capsys.readouterr().out
    assert "models, data and settings unchanged: reusing" in again
    summary = next(line for line in again.splitlines() if line.startswith("[run] stages: "))
    assert all(f"{stage} reused" in summary for stage in ("prepare", "train", "evaluate")), summary
    assert "[register] models:/quickstart/1 " in again
    registry = f"sqlite:///{tmp_path}/mlflow.db"
    assert cli.main(["registry", "show", "quickstart", "@champion", "--tracking-uri", registry]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "1" and shown["tags"]["base_model"] == "bundled:smollm2-135m-instruct"
    assert shown["source"].startswith(f"{run_dir}/mlartifacts/"), shown["source"]
    assert storage.exists(f"{shown['source']}/adapter_model.safetensors")
    assert float(shown["tags"]["eval.schema_valid_rate"]) == metrics["models"]["tuned"]["schema_valid_rate"]
