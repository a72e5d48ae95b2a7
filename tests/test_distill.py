"""Distilling Step-by-Step: parsing and filtering teacher text, the program / openai / hf teachers end to
end on a local Ray (the openai one against a real local HTTP server that fails on purpose), the cache,
the multi-task data with its prefixes, and the weighted loss (lambda = 0 is label-only)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import prepare_once

from raytune_app import config
from raytune_app.data import arithmetic
from raytune_app.distill import parse

MARKERS = ["So the answer is", "The answer is"]


def test_parse_well_formed_malformed_and_truncated():
    assert parse.parse("3 + 4 = 7. So the answer is 7.", MARKERS) == ("3 + 4 = 7.", "7", None)
    assert parse.parse("First 2. The answer is: **12**\nExtra", MARKERS) == ("First 2.", "12", None)
    # The last marker counts: a rationale may quote the phrase earlier.
    assert parse.parse("He said the answer is 3, but 3 + 1 = 4. So the answer is 4.", MARKERS)[1] == "4"
    assert parse.parse("Adding 5 and 2 gives", MARKERS) == (None, None, "no_answer_marker")  # truncated
    assert parse.parse("So the answer is 5.", MARKERS) == (None, None, "empty_rationale")
    assert parse.parse("Some steps. So the answer is", MARKERS) == (None, None, "empty_label")
    assert parse.parse("   ", MARKERS) == (None, None, "empty")
    assert parse.parse(None, MARKERS) == (None, None, "teacher_error")
    assert parse.normalise(" 1,000.0 ") == "1000" and parse.normalise("'Yes'.") == "yes"


def test_filtering_decisions_and_reasons():
    good, wrong, bad = ("r", "7", None), ("r2", "8", None), (None, None, "no_answer_marker")
    assert parse.decide("7", [wrong, good], "gold", 0.5) == ({"rationale": "r", "label": "7"}, None)
    assert parse.decide("7", [wrong], "gold", 0.5) == (None, "label_mismatch")
    assert parse.decide("7", [bad, bad], "gold", 0.5) == (None, "no_answer_marker")
    # Self-consistency: 2 of 3 agree (more than half) -> kept; 1 of 2 -> no majority; unparsed votes count.
    assert parse.decide(None, [good, good, wrong], "self_consistency", 0.5)[0]["label"] == "7"
    assert parse.decide(None, [good, wrong], "self_consistency", 0.5) == (None, "no_majority")
    assert parse.decide(None, [good, bad, bad], "self_consistency", 0.5) == (None, "no_majority")
    assert parse.decide(None, [wrong, good], "none", 0.5)[0]["label"] == "8"
    with pytest.raises(ValueError, match="self_consistency"):
        parse.decide(None, [good], "gold", 0.5)


def test_weighted_loss_by_hand_and_lambda_zero_is_label_only():
    import torch
    import torch.nn.functional as F

    from raytune_app.distill.loss import weighted_lm_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, 3, 4]])

    def alone(i):  # example i's mean next-token loss over its answer tokens
        keep = labels[i, 1:] != -100
        return F.cross_entropy(logits[i, :-1][keep], labels[i, 1:][keep])

    assert torch.isclose(weighted_lm_loss(logits, labels, torch.tensor([1.0, 1.0])), (alone(0) + alone(1)) / 2)
    assert torch.isclose(weighted_lm_loss(logits, labels, torch.tensor([1.0, 0.0])), alone(0) / 2)
    assert torch.isclose(weighted_lm_loss(logits, labels, torch.tensor([1.0, 0.5])), (alone(0) + 0.5 * alone(1)) / 2)


def _source(tmp_path, rows=36):
    """Arithmetic problems; every 4th gold answer is wrong on purpose and one question is not solvable."""
    problems = arithmetic.generate(rows, seed=5)
    path = tmp_path / "arith.jsonl"
    with path.open("w") as out:
        for i, row in enumerate(problems):
            answer = str(int(row["answer"]) + 1) if i % 4 == 0 else row["answer"]
            out.write(json.dumps({"question": row["question"], "answer": answer}) + "\n")
        out.write(json.dumps({"question": "What is the colour of the sky on a clear day?", "answer": "blue"}) + "\n")
    return path


def _recipe(tmp_path, model, teacher, **distill):
    return config.validate(
        {
            "run": {
                "name": "dss",
                "output_dir": str(tmp_path / "runs"),
                "stages": ["prepare", "distill", "train", "evaluate"],
            },
            "model": {"path": model},
            "data": {
                "sources": [str(_source(tmp_path))],
                "columns": {"prompt": "question", "response": "answer"},
                "max_seq_length": 256,
                "split": {"val": 0.1, "test": 0.1},
            },
            "distill": {"teacher": teacher, **distill},
            "train": {
                "workers": 1,
                "max_steps": 3,
                "batch_size": 4,
                "learning_rate": 1e-3,
                "warmup": 0,
                "logging_steps": 1,
                "checkpoint": {"every_steps": 3, "keep_best": 1},
                "lora": {"rank": 4, "dropout": 0.0},
                "distill": {"rationale_weight": 1.0},
            },
            "evaluate": {"backend": "transformers", "task": "free_text", "max_new_tokens": 6, "batch_size": 4},
        }
    )


@pytest.mark.usefixtures("ray_local")
@pytest.mark.extended
def test_program_teacher_filters_caches_and_trains_both_tasks(tmp_path, tiny_model):
    from raytune_app.data.prepare import load_split
    from raytune_app.distill.run import distill
    from raytune_app.models import load_tokenizer
    from raytune_app.train.run import train
    from raytune_app.train.worker import load_splits

    recipe = _recipe(tmp_path, tiny_model, {"backend": "program", "program": "arithmetic"})
    prepared = prepare_once(recipe)
    first = distill(recipe)
    n = prepared["rows_out"]["train"]
    assert first["inputs"] == n and first["teacher_calls"] == n and first["cache_hits"] == 0
    # Wrong gold answers are caught by the (correct) program teacher; the odd question makes it fail.
    assert first["rejected"]["label_mismatch"] >= 3 and first["kept_rationales"] + sum(first["rejected"].values()) == n
    assert first["tasks"] == {"label": n, "rationale": first["kept_rationales"]}  # label task: every input
    rejected = [json.loads(line) for line in (tmp_path / "runs/dss/distill/rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == sum(first["rejected"].values()) and all(r["reason"] for r in rejected)

    again = distill(recipe, force=True)  # the cache answers; only failed rows (not cached) are asked again
    failed = first["rejected"].get("teacher_error", 0)
    assert again["teacher_calls"] == failed and again["cache_hits"] == n - failed
    assert again["kept_rationales"] == first["kept_rationales"]

    tokenizer = load_tokenizer(tiny_model)
    table = load_split(str(tmp_path / "runs/dss/distill"), "train")
    texts = {
        task: tokenizer.decode(ids) for ids, task in zip(table["input_ids"].to_pylist(), table["task"].to_pylist())
    }
    assert (
        "[label] " in texts["label"]
        and "[rationale] " in texts["rationale"]
        and "So the answer is" not in texts["rationale"]
    )

    weighted, _, _ = load_splits(str(tmp_path / "runs/dss/distill"), rationale_weight=0.5)
    assert sorted(set(weighted["loss_weight"])) == [0.5, 1.0] and len(weighted) == table.num_rows
    label_only, val, _ = load_splits(str(tmp_path / "runs/dss/distill"), rationale_weight=0.0)
    assert len(label_only) == n and "loss_weight" not in label_only.column_names and len(val) > 0

    manifest = train(recipe)  # the multi-task trainer path on Ray Train
    assert manifest["global_step"] == 3 and manifest["final_eval_loss"] is not None


class _FlakyTeacher(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that answers with the arithmetic program, after failing each
    new prompt first with a 500 and then a 429 (Retry-After: 0)."""

    seen: dict = {}
    calls = 0
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = body["messages"][-1]["content"]
        with self.lock:
            type(self).calls += 1
            attempt = self.seen.get(question, 0)
            self.seen[question] = attempt + 1
        if attempt < 2:
            self.send_response(500 if attempt == 0 else 429)
            self.send_header("Retry-After", "0")
            self.end_headers()
            return
        try:
            text = arithmetic.solve(question)
        except ValueError:
            text = "I do not know."
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.mark.usefixtures("ray_local")
@pytest.mark.extended
def test_openai_teacher_retries_injected_errors_against_a_real_server(tmp_path, tiny_model):
    from raytune_app.distill.run import distill

    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyTeacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        teacher = {
            "backend": "openai",
            "model": "teacher",
            "base_url": f"http://127.0.0.1:{server.server_port}/v1",
            "max_retries": 3,
            "backoff_s": 0.01,
            "concurrency": 4,
            "batch_size": 16,
        }
        recipe = _recipe(tmp_path, tiny_model, teacher)
        n = prepare_once(recipe)["rows_out"]["train"]
        first = distill(recipe)
        assert first["teacher_calls"] == n and first["teacher_errors"] == {}
        assert _FlakyTeacher.calls == 3 * n  # every prompt: a 500, a 429, then the answer
        assert first["rejected"].get("label_mismatch", 0) >= 3 and first["kept_rationales"] >= n // 2
        calls = _FlakyTeacher.calls
        assert distill(recipe, force=True)["teacher_calls"] == 0 and _FlakyTeacher.calls == calls  # cached

        # Retries run out: the rows are counted as teacher errors (not cached), and the run still finishes.
        _FlakyTeacher.seen.clear()
        (tmp_path / "strict").mkdir()
        strict = _recipe(tmp_path / "strict", tiny_model, teacher | {"max_retries": 1})
        prepare_once(strict)
        failed = distill(strict)
        assert failed["kept_rationales"] == 0 and failed["rejected"] == {"teacher_error": failed["inputs"]}
        assert failed["teacher_errors"] == {"HTTP 429 after 2 tries": failed["inputs"]}
    finally:
        server.shutdown()


@pytest.mark.usefixtures("ray_local")
@pytest.mark.extended
def test_hf_teacher_runs_on_an_actor_pool(tmp_path, tiny_model):
    from raytune_app.distill.run import distill

    teacher = {"backend": "hf", "engine": "transformers", "model": tiny_model, "max_new_tokens": 8, "batch_size": 8}
    recipe = _recipe(tmp_path, tiny_model, teacher)
    n = prepare_once(recipe)["rows_out"]["train"]
    result = distill(recipe)
    # A random tiny model never writes the answer marker: everything is rejected, and counted as such.
    assert result["teacher_calls"] == n and sum(result["rejected"].values()) + result["kept_rationales"] == n
    assert result["tasks"]["label"] == n


def test_distill_section_checks():
    base = {
        "data": {"generator": {"name": "multi_step_arithmetic"}},
        "run": {"stages": ["prepare", "distill", "train"]},
    }
    config.validate({"data": base["data"]})  # no distill stage: the teacher needs nothing
    for distill, message in (
        ({"teacher": {"backend": "program"}}, r"distill.teacher.program: required"),
        ({"teacher": {"backend": "openai", "model": "m"}}, r"distill.teacher.base_url: required"),
        ({"teacher": {"backend": "program", "program": "arithmetic"}, "filter": "self_consistency"}, "samples >= 2"),
        (
            {
                "teacher": {"backend": "program", "program": "arithmetic"},
                "label_prefix": "[x]",
                "rationale_prefix": "[x]",
            },
            "must differ",
        ),
    ):
        with pytest.raises(config.RecipeError, match=message):
            config.validate(base | {"distill": distill})


@pytest.mark.gpu
@pytest.mark.usefixtures("ray_local")
def test_vllm_teacher_on_a_gpu(tmp_path, tiny_model):
    """The vllm backend through Ray Data's vLLM processor: runs only where vLLM and a CUDA GPU are present."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from raytune_app.distill.run import distill

    recipe = _recipe(
        tmp_path, tiny_model, {"backend": "vllm", "model": tiny_model, "max_new_tokens": 8, "batch_size": 8}
    )
    n = prepare_once(recipe)["rows_out"]["train"]
    result = distill(recipe)
    assert result["teacher_calls"] == n and sum(result["rejected"].values()) + result["kept_rationales"] == n
