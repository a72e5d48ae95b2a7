"""DPO and GRPO on Ray Train (tiny random Llama, real TRL), reward functions by hand, preference pairs
from a model's own failures (SFT -> pairs -> DPO chain), and recipe checks that stop bad setups early."""

import json
import os
from pathlib import Path

import pytest
from conftest import prepare_once, toy_recipe

from raytune_app import config
from raytune_app.train import rewards
from raytune_app.train.pairs import select_pairs
from raytune_app.train.settings import PairsSection, RewardSpec

# --------------------------------------------------------------------------- rewards, by hand

SCHEMA = {"type": "object", "required": ["status"], "properties": {"status": {"enum": ["ok", "late"]}}}


def _chat(text):
    return [{"role": "assistant", "content": text}]


def test_json_rewards_on_good_and_malformed_completions():
    import jsonschema

    replies = [
        '{"status": "ok"}',
        '```json\n{"status": "late"}\n```',
        '{"status": "ok"} trailing prose',
        '{"status": "gone"}',
        '{"status": ',
        "",
        None,
        _chat('{"status": "ok"}'),
    ]
    assert rewards.json_valid(None, replies) == [1, 1, 0, 1, 0, 0, 0, 1]
    validator = jsonschema.Draft202012Validator(SCHEMA)
    assert rewards.json_schema(None, replies, validator=validator) == [1, 1, 0, 0, 0, 0, 0, 1]
    gold = '{"status": "ok", "n": 2}'
    f1 = rewards.field_f1(
        None, ['{"status": "ok", "n": 2}', '{"status": "ok"}', "not json", '{"n": 3}'], reference=[gold] * 4
    )
    assert f1 == [1.0, pytest.approx(2 / 3, abs=1e-6), 0.0, 0.0]
    assert rewards.field_f1(None, ['{"a": 1}'], reference=["plain text gold"]) == [0.0]


def test_exact_answer_length_and_format_rewards():
    gold = ["Tom has 3 apples. #### 1,200", "#### 7", "#### -2.50"]
    replies = ["so 1200 in all #### 1200", "the answer is 7", "#### -2.5 dollars"]
    assert rewards.exact_answer(None, replies, reference=gold) == [1.0, 0.0, 1.0]  # no marker: no answer
    assert rewards.exact_answer(
        None, ["#### 12", "####", _chat("x #### 7")], reference=["#### 1200", "#### 7", "#### 7"]
    ) == [0, 0, 1]
    assert rewards.exact_answer(None, ["A: yes"], reference=["A: Yes"], marker="A:") == [1.0]
    assert rewards.length_penalty(None, ["x" * 10, "x" * 30, "x" * 1000], max_chars=20, per_char=0.01) == [
        0.0,
        -0.1,
        -1.0,
    ]
    assert rewards.format_match(None, ["<a>1</a>", "<a>1</a> extra", _chat(" <a>2</a> ")], pattern=r"<a>\d+</a>") == [
        1,
        0,
        1,
    ]


def test_build_dispatches_by_name_and_binds_args():
    specs = [
        RewardSpec(function="json_valid", weight=2.0),
        RewardSpec(function="length_penalty", args={"max_chars": 1}),
        RewardSpec(function="os.path:basename"),
    ]
    functions, weights = rewards.build(specs)
    assert [f.__name__ for f in functions] == ["json_valid", "length_penalty", "basename"]
    assert weights == [2.0, 1.0, 1.0]
    assert functions[1](None, ["abc"], reference=["x"]) == [-0.01]
    problems = rewards.problems(
        [
            RewardSpec(function="no_such_reward"),
            RewardSpec(function="nope.module:f"),
            RewardSpec(function="format", args={"pattern": "(", "max_chars": 3}),
        ]
    )
    assert "not a built-in" in problems[0] and "cannot import" in problems[1]
    assert any("takes ['pattern']" in p for p in problems) and any("not a regular expression" in p for p in problems)


# --------------------------------------------------------------------------- pairs, by hand


def test_select_pairs_keeps_distinct_failures_and_prefers_passing_samples_when_asked():
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"}]
    rows = [
        {"example": "a", "prompt": prompt, "gold": "G", "prediction": p, "passes": ok}
        for p, ok in [("wrong", False), ("wrong", False), ("G", True), ("  ", False), ("other", False)]
    ]
    rows.append(
        {"example": "b", "prompt": [{"role": "user", "content": "q2"}], "gold": "H", "prediction": "H", "passes": True}
    )
    pairs, counts = select_pairs(rows, PairsSection(max_pairs_per_prompt=5))
    assert [(p["prompt"], p["system"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("q1", "be brief", "G", "wrong"),
        ("q1", "be brief", "G", "other"),
    ]
    assert counts == {
        "prompts": 2,
        "answers": 6,
        "passing": 2,
        "failing": 4,
        "empty_answers": 1,
        "pairs": 2,
        "prompts_with_pairs": 1,
    }
    rows[2]["prediction"] = "G, said differently"
    pairs, _ = select_pairs(rows, PairsSection(chosen="passing_sample", max_pairs_per_prompt=1))
    assert [(p["chosen"], p["rejected"], p["chosen_from"]) for p in pairs] == [
        ("G, said differently", "wrong", "passing_sample")
    ]


def test_pairs_steps_split_by_their_own_salt_or_one_they_share():
    """Each pairs step re-splits its pairs with a salt of its name; steps given one data.split.salt split
    alike (preference_losses.py compares losses on the same validation pairs)."""

    def second_step(step: dict):
        raw = {"data": {"generator": {"name": "order_extraction"}}, "chain": [{"name": "sft"}, step]}
        return config.validate(raw).chain_step(1)

    assert second_step({"name": "dpo", "pairs": {}, "train": {"method": "dpo"}}).data.split.salt == "pairs:dpo"
    shared = {"pairs": {}, "data": {"split": {"salt": "shared"}}}
    orpo = second_step({"name": "orpo", "train": {"method": "orpo"}} | shared)
    dpo = second_step({"name": "dpo", "train": {"method": "dpo"}} | shared)
    assert orpo.data.split.salt == dpo.data.split.salt == "shared" and orpo.data.split.test == 0.0


# --------------------------------------------------------------------------- recipe checks


def _problems(raw, *overrides):
    with pytest.raises(config.RecipeError) as caught:
        config.validate(raw, overrides=list(overrides))
    return "\n".join(caught.value.problems)


def test_bad_method_setups_are_refused_before_any_work(tmp_path):
    raw = {"data": {"sources": ["x.jsonl"]}}
    assert "train.method dpo trains on preference pairs" in _problems(raw, "train.method=dpo")
    assert "train.method sft needs prompt_response or chat data" in _problems(raw, "data.kind=preference")
    text = _problems(raw, "train.method=grpo", "train.batch_size=6")
    assert "needs at least one reward function" in text and "multiple of train.grpo.num_generations (4)" in text
    text = _problems({**raw, "train": {"method": "grpo", "grpo": {"rewards": [{"function": "mypkg.nothere:score"}]}}})
    assert "train.grpo.rewards.0.function" in text and "cannot import" in text
    assert "lists a function twice" in _problems(
        {
            **raw,
            "train": {"method": "grpo", "grpo": {"rewards": [{"function": "json_valid"}, {"function": "json_valid"}]}},
        }
    )
    chain = [{"name": "a", "train": {"method": "dpo"}, "pairs": {}}, {"name": "b", "pairs": {}}]
    text = _problems({**raw, "chain": chain})
    assert "the first step has none" in text and "set train.method to one of dpo, " in text and "(it is sft)" in text


@pytest.mark.slow  # prepare runs on Ray Data (it starts a local Ray when none is up)
def test_bad_preference_rows_are_named_by_file_line_and_field(tmp_path, tiny_model, write_jsonl):
    from raytune_app.data.prepare import RowError, prepare

    source = write_jsonl(
        "pairs.jsonl", [{"prompt": "p1", "chosen": "a", "rejected": "b"}, {"prompt": "p2", "chosen": "a"}]
    )
    recipe = config.validate(
        {
            "run": {"name": "bad", "output_dir": str(tmp_path / "runs")},
            "model": {"path": tiny_model},
            "data": {"sources": [str(source)], "kind": "preference", "on_error": "fail"},
            "train": {"method": "dpo"},
        }
    )
    with pytest.raises(RowError) as caught:
        prepare(recipe)
    message = str(caught.value)
    assert "pairs.jsonl" in message and "line 2" in message and "rejected" in message
    assert not (tmp_path / "runs" / "bad" / "prepare" / "manifest.json").exists()


# --------------------------------------------------------------------------- training on Ray Train


def _history(recipe):
    path = Path(recipe.stage_dir("train")) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _lora_b_norm(adapter_dir):
    from safetensors.torch import load_file

    weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    return sum(float(t.abs().sum()) for name, t in weights.items() if "lora_B" in name)


@pytest.mark.extended
def test_dpo_raises_the_reward_margin_on_a_learnable_set(ray_local, tmp_path, tiny_model, write_jsonl):
    from raytune_app.data.prepare import prepare
    from raytune_app.train.run import train

    pairs = [
        {"prompt": f"ticket {i}: classify, word {i % 7}", "chosen": '{"status": "ok"}', "rejected": f"go away {i % 5}"}
        for i in range(60)
    ]
    source = write_jsonl("pairs.jsonl", pairs)
    recipe = config.validate(
        {
            "run": {"name": "dpo", "output_dir": str(tmp_path / "runs")},
            "model": {"path": tiny_model},
            "data": {
                "sources": [str(source)],
                "kind": "preference",
                "max_seq_length": 128,
                "split": {"val": 0.2, "test": 0.0},
            },
            "train": {
                "method": "dpo",
                "max_steps": 10,
                "batch_size": 4,
                "learning_rate": 5e-3,
                "warmup": 0,
                "logging_steps": 2,
                "checkpoint": {"every_steps": 5, "keep_best": 1},
                "lora": {"rank": 4, "dropout": 0.0},
                "dpo": {"beta": 0.1},
            },
        }
    )
    prepare(recipe)
    manifest = train(recipe)
    assert manifest["method"] == "dpo" and manifest["global_step"] == 10
    # A fresh LoRA adapter starts equal to the reference (margin 0); on held-out pairs it now prefers `chosen`.
    assert manifest["final_eval"]["eval_rewards/margins"] > 0.2
    assert manifest["final_eval"]["eval_rewards/accuracies"] >= 0.9
    margins = [h["rewards/margins"] for h in _history(recipe) if "rewards/margins" in h]
    assert len(margins) == 5 and margins[-1] > margins[0]
    # The reference was a frozen copy of the starting adapter, not a second model; only the trained one is saved.
    adapter = manifest["weights"]
    assert not os.path.exists(os.path.join(adapter, "ref")) and _lora_b_norm(adapter) > 0


@pytest.mark.extended
def test_grpo_computes_and_logs_rewards_and_updates_the_policy(ray_local, tmp_path, tiny_model):
    from raytune_app.train.run import train

    recipe = toy_recipe(
        tmp_path,
        tiny_model,
        method="grpo",
        max_steps=4,
        checkpoint={"every_steps": 2, "keep_best": 1},
        grpo={
            "num_generations": 2,
            "max_completion_length": 8,
            "eval_prompts": 4,
            "rewards": [
                {"function": "json_schema"},
                {"function": "length_penalty", "weight": 0.5, "args": {"max_chars": 10}},
            ],
        },
    )
    prepare_once(recipe)
    manifest = train(recipe)
    logged = [h for h in _history(recipe) if "reward" in h]
    assert len(logged) == 2
    for entry in logged:  # per step: the weighted sum and each function's mean
        assert {"rewards/json_schema/mean", "rewards/length_penalty/mean", "reward_std", "kl"} <= set(entry)
        assert entry["reward"] == pytest.approx(
            entry["rewards/json_schema/mean"] + 0.5 * entry["rewards/length_penalty/mean"], abs=1e-5
        )
    assert "eval_reward" in manifest["final_eval"]
    from raytune_app.registry import store  # every step's rewards are in the MLflow run too

    client = store.client(store.tracking_uri(recipe))
    assert [m.step for m in client.get_metric_history(manifest["mlflow_run_id"], "rewards/json_schema/mean")] == [2, 4]
    assert _lora_b_norm(manifest["weights"]) > 0  # a fresh adapter's B is zero: the policy update ran


@pytest.mark.extended
def test_sft_then_dpo_on_the_models_own_failures(ray_local, tmp_path, tiny_model):
    from raytune_app.train.run import train_chain

    raw = toy_recipe(tmp_path, tiny_model).model_dump(mode="json")
    raw["chain"] = [
        {"name": "sft"},
        {"name": "dpo", "train": {"method": "dpo", "max_steps": 4}, "pairs": {"limit": 40}},
    ]
    recipe = config.validate(raw)
    result = train_chain(recipe)
    sft, dpo = result["chain"]
    assert dpo["parent_fingerprint"] == sft["fingerprint"]
    counts = json.loads(Path(recipe.pairs_dir(1), "pairs.json").read_text())
    assert (
        counts["prompts"] == 40
        and counts["answers"] == 40
        and counts["pairs"] + counts["passing"] + counts["empty_answers"] == 40
    )
    rows = [json.loads(line) for line in Path(recipe.pairs_file(1)).read_text().splitlines()]
    assert len(rows) == counts["pairs"] > 10
    references = {'{"status": "ok"}', '{"status": "refund"}', '{"status": "late"}'}
    assert all(
        r["chosen"] in references and r["rejected"] != r["chosen"] and r["prompt"].startswith("ticket") for r in rows
    )
    # Pairs come from the sft step's training prompts only, never from its test split.
    step = recipe.chain_step(0)
    from raytune_app.data.prepare import load_split

    test_prompts = {
        m[-2]["content"] for m in load_split(step.stage_dir("prepare"), "test").column("messages").to_pylist()
    }
    assert test_prompts and not test_prompts & {r["prompt"] for r in rows}
    # A second run finds everything unchanged: no new generation, no new training.
    again = train_chain(recipe)
    assert again["chain"][1]["fingerprint"] == dpo["fingerprint"]
    assert json.loads(Path(recipe.pairs_dir(1), "pairs.json").read_text())["seconds"] == counts["seconds"]
