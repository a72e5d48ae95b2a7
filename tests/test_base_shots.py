"""Few-shot prompting of the base model in the evaluate stage (`evaluate.base_shots`): the fair baseline for a
fine-tune whose answer format the base was never told. The bundled SmolLM2-135M-Instruct, real Ray."""

import json

import pytest

from raytune_app import config
from raytune_app.evaluate.generation import with_shots

LABELS = ("positive", "negative")
GOOD = ["a delight", "wonderful acting", "I loved every minute", "a warm, funny film", "superb and moving"]
BAD = ["a waste of time", "dull and far too long", "I hated the ending", "badly acted", "boring from the start"]


def test_shots_go_after_the_system_prompt_and_before_the_conversation():
    shots = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert [m["content"] for m in with_shots(chat, shots)] == ["s", "q1", "a1", "q"]
    assert [m["content"] for m in with_shots(chat[1:], shots)] == ["q1", "a1", "q"]
    assert with_shots(chat, []) is chat


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """The reviews file every test of the module reads: one file, so its prepared data is made once per session
    (conftest `prepare_once` copies it into each run directory)."""
    source = tmp_path_factory.mktemp("reviews") / "reviews.jsonl"
    with source.open("w") as out:
        for i in range(60):
            text = (GOOD if i % 2 == 0 else BAD)[i // 2 % 5]
            out.write(json.dumps({"q": f"Review {i}: {text}.", "a": LABELS[i % 2]}) + "\n")
    return source


def _recipe(source, tmp_path, shots: int, backend: str = "transformers"):
    return config.validate(
        {
            "run": {"name": f"shots-{shots}-{backend}", "output_dir": str(tmp_path / "runs"), "stages": ["prepare"]},
            "model": {"path": "bundled:smollm2-135m-instruct"},
            "data": {
                "sources": [str(source)],
                "columns": {"prompt": "q", "response": "a"},
                "system_prompt": "Is the film review positive or negative?",
                "split": {"val": 0.0, "test": 0.25},
            },
            "evaluate": {
                "backend": backend,
                "task": "free_text",
                "base_shots": shots,
                "max_new_tokens": 4,
                "enforce_eager": True,
            },
        }
    )


def _words(predictions: list[str]) -> list[str]:
    """Replies as comparable words: a label answered as "Positive." counts as "positive"."""
    return [p.strip().lower().rstrip(".") for p in predictions]


def _answers(summary) -> list[str]:
    import pyarrow.parquet as pq

    return _words(pq.read_table(f"{summary['output_dir']}/predictions.parquet").column("prediction").to_pylist())


@pytest.mark.usefixtures("ray_local")
def test_the_base_shown_a_few_examples_answers_in_their_format(reviews, tmp_path):
    """Asked plainly the base answers in prose; after 6 example turns it answers with a label word, and the
    score counts it. The stage runs with the shots (on Ray); the plain answers come from the same replica class
    the stage runs, called here on the same examples (a second stage run would only add an actor's start)."""
    from conftest import prepare_once

    from raytune_app.evaluate.generation import Generator
    from raytune_app.evaluate.metrics import normalise_answer
    from raytune_app.evaluate.run import _fingerprint, base_shots, candidates, evaluate, prepared_examples

    plain_recipe, shots_recipe = _recipe(reviews, tmp_path, 0), _recipe(reviews, tmp_path, 6)
    prepare_once(shots_recipe)
    shown = evaluate(shots_recipe)
    n = shown["examples"]
    assert n >= 10
    labelled = sum(answer in LABELS for answer in _answers(shown))
    assert labelled >= 0.8 * n, _answers(shown)
    assert shown["models"]["base"]["few_shot"] == 6

    prepare_once(plain_recipe)
    examples, identity = prepared_examples(plain_recipe)
    assert examples.num_rows == n
    # A changed base_shots is evaluated anew: the plain run's fingerprint (as the stage computes it) differs.
    plain_models = candidates(plain_recipe)
    assert shown["fingerprint"] != _fingerprint(plain_recipe, identity, plain_models, None, base_shots(plain_recipe))
    replica = Generator(plain_recipe.model.model_dump(), None, max_new_tokens=4)
    plain = _words(replica(examples).column("prediction").to_pylist())
    assert sum(answer in LABELS for answer in plain) < labelled, plain
    golds = examples.column("gold").to_pylist()
    plain_match = sum(normalise_answer(p) == normalise_answer(g) for p, g in zip(plain, golds)) / n
    assert shown["models"]["base"]["normalised_match"] > plain_match


@pytest.mark.usefixtures("ray_local")
@pytest.mark.extended
def test_the_vllm_engine_is_shown_the_same_examples(reviews, tmp_path):
    from conftest import prepare_once

    from raytune_app.evaluate.run import evaluate

    pytest.importorskip("vllm")
    on_vllm, on_transformers = _recipe(reviews, tmp_path, 6, "vllm"), _recipe(reviews, tmp_path, 6, "transformers")
    prepare_once(on_vllm)
    prepare_once(on_transformers)
    vllm_answers, hf_answers = _answers(evaluate(on_vllm)), _answers(evaluate(on_transformers))
    assert sum(a in LABELS for a in vllm_answers) >= 0.8 * len(vllm_answers), vllm_answers
    assert sum(a == b for a, b in zip(vllm_answers, hf_answers)) >= 0.8 * len(hf_answers)


def test_more_shots_than_training_rows_is_refused_before_any_model_work(reviews, tmp_path, ray_local):
    from conftest import prepare_once

    from raytune_app.evaluate.run import EvaluateError, evaluate

    recipe = _recipe(reviews, tmp_path, 64)
    prepare_once(recipe)
    with pytest.raises(EvaluateError, match=r"evaluate.base_shots=64: the prepared train split has \d+ rows"):
        evaluate(recipe)
