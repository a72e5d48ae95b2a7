"""The quickstart pipeline, reduced: `raytune-app run recipes/quickstart.yaml` on the bundled
SmolLM2-135M-Instruct (prepare -> a few LoRA steps -> evaluate base vs tuned -> register), then a
re-run that reuses every stage. Minutes on 2 cores: marked slow, run by default."""

import importlib.util
import json
import os
import re

import pytest

from raytune_app import cli

pytestmark = pytest.mark.usefixtures("ray_local")  # slow: it uses Ray (tests/conftest.py)
RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "quickstart.yaml")


def test_quickstart_runs_end_to_end_and_reuses_unchanged_stages(tmp_path, capsys):
    reduced = [
        f"run.output_dir={tmp_path}",
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
    run_dir = os.path.join(tmp_path, "quickstart")
    assert f"report: {run_dir}/evaluate/report.md" in out
    assert "[register] models:/quickstart/1" in out
    # Generation reports its progress, whichever engine ran it, up to its last row.
    assert re.search(r"^\[evaluate\] .+: (\d+)/\1 (generations|examples)$", out, re.M), out

    metrics = json.load(open(os.path.join(run_dir, "evaluate", "metrics.json")))
    assert metrics["base_model"] == "bundled:smollm2-135m-instruct" and set(metrics["models"]) == {"base", "tuned"}
    assert metrics["backend"] == ("vllm" if importlib.util.find_spec("vllm") else "transformers")
    assert set(metrics["models"]["tuned"]["groups"]["per_group"]) <= {"email", "chat", "formal", "terse"}
    for name in ("report.md", "metrics.png", "latency.png", "loss_curve.png", "predictions.parquet"):
        assert os.path.exists(os.path.join(run_dir, "evaluate", name)), name

    # Nothing changed: every stage is reused and the same version is found in the registry.
    assert cli.main(["run", RECIPE, *reduced]) == 0
    again = capsys.readouterr().out
    assert "models, data and settings unchanged: reusing" in again
    assert "[register] models:/quickstart/1 " in again
    assert (
        cli.main(["registry", "show", "quickstart", "@champion", "--tracking-uri", f"sqlite:///{run_dir}/mlflow.db"])
        == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "1" and shown["tags"]["base_model"] == "bundled:smollm2-135m-instruct"
    assert float(shown["tags"]["eval.schema_valid_rate"]) == metrics["models"]["tuned"]["schema_valid_rate"]
