"""More preference methods (ORPO, SimPO, KTO, DPO with an SFT term) and per-step logging to TensorBoard and
Weights & Biases: the recipe -> TRL mappings without Ray, then each method on Ray Train with a tiny model."""

import glob
import json
import os

import pytest

from raytune_app import config
from raytune_app.train.arguments import dpo_arguments, kto_arguments, orpo_arguments, simpo_arguments


def preference_recipe(tmp_path, model_path, source=None, **train):
    return config.validate(
        {
            "run": {"name": train.get("method", "dpo"), "output_dir": str(tmp_path / "runs")},
            "model": {"path": model_path},
            "data": {
                "sources": [str(source or tmp_path / "pairs.jsonl")],
                "kind": "preference",
                "max_seq_length": 96,
                "split": {"val": 0.2, "test": 0.0},
            },
            "train": {
                "max_steps": 10,
                "batch_size": 4,
                "learning_rate": 5e-3,
                "warmup": 0,
                "logging_steps": 2,
                "checkpoint": {"every_steps": 5, "keep_best": 1},
                "lora": {"rank": 4, "dropout": 0.0},
                **train,
            },
        }
    )


def test_each_method_section_reaches_its_trl_config(tmp_path, tiny_model, one_process_group):
    dpo = dpo_arguments(
        preference_recipe(
            tmp_path, tiny_model, method="dpo", dpo={"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}
        ),
        str(tmp_path),
        use_gpu=False,
        ds_config=None,
    )
    assert dpo.loss_type == ["sigmoid", "sft"] and dpo.loss_weights == [1.0, 0.5]
    orpo = orpo_arguments(
        preference_recipe(tmp_path, tiny_model, method="orpo", orpo={"beta": 0.2}),
        str(tmp_path),
        use_gpu=False,
        ds_config=None,
    )
    assert orpo.beta == 0.2 and orpo.max_length == 96
    simpo = simpo_arguments(
        preference_recipe(tmp_path, tiny_model, method="simpo", simpo={"beta": 2.5, "gamma_beta_ratio": 0.3}),
        str(tmp_path),
        use_gpu=False,
        ds_config=None,
    )
    assert (simpo.loss_type, simpo.beta, simpo.simpo_gamma, simpo.cpo_alpha) == ("simpo", 2.5, 0.3, 0.0)
    kto = kto_arguments(
        preference_recipe(tmp_path, tiny_model, method="kto", kto={"undesirable_weight": 1.5}),
        str(tmp_path),
        use_gpu=False,
        ds_config=None,
    )
    assert kto.undesirable_weight == 1.5 and kto.desirable_weight == 1.0
    logged = dpo_arguments(
        preference_recipe(tmp_path, tiny_model, method="dpo", report_to=["mlflow", "tensorboard", "wandb"]),
        str(tmp_path),
        use_gpu=False,
        ds_config=None,
    )
    assert logged.report_to == ["tensorboard", "wandb"]  # MLflow is the train stage's own, after the run


def test_methods_are_checked_against_the_data():
    with pytest.raises(config.RecipeError, match="train.method orpo trains on preference pairs"):
        config.validate({"data": {"sources": ["x.jsonl"]}, "train": {"method": "orpo"}})
    with pytest.raises(config.RecipeError, match="loss_weights has 1 values for 2 loss type"):
        config.validate(
            {
                "data": {"sources": ["x.jsonl"], "kind": "preference"},
                "train": {"method": "dpo", "dpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1]}},
            }
        )


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": f"ticket {i}: classify, word {i % 7}",
                    "chosen": '{"status": "ok"}',
                    "rejected": f"go away {i % 5}",
                }
            )
            + "\n"
            for i in range(60)
        )
    )
    return path


def _events(path: str):
    """The Event records of a TensorBoard event file (TFRecord framing: length, its CRC, data, its CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            event = Event()
            event.ParseFromString(f.read(length))
            f.read(4)
            yield event


def _history(recipe):
    return [json.loads(line) for line in open(os.path.join(recipe.stage_dir("train"), "metrics.jsonl"))]


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, settings",
    [("orpo", {}), ("simpo", {}), ("kto", {}), ("dpo", {"dpo": {"loss_type": ["sigmoid", "sft"]}})],
)
@pytest.mark.extended
def test_each_method_trains_on_ray_train_and_prefers_the_chosen_answers(
    ray_local, tmp_path, tiny_model, pairs_file, method, settings
):
    from raytune_app.data.prepare import prepare
    from raytune_app.train.run import train

    recipe = preference_recipe(tmp_path, tiny_model, pairs_file, method=method, **settings)
    prepare(recipe)
    manifest = train(recipe)
    assert manifest["method"] == method and manifest["global_step"] == 10
    final = manifest["final_eval"]
    # Every method's own measure of preferring `chosen` on held-out pairs: the reward margin (chosen minus
    # rejected; for KTO the two answers are judged apart and the margin compares their mean rewards).
    assert final["eval_rewards/margins"] > 0, final
    if method != "kto":  # KTO logs a margin only for the batches that hold both kinds of answer
        margins = [h["rewards/margins"] for h in _history(recipe) if "rewards/margins" in h]
        assert margins[-1] > margins[0], margins


@pytest.mark.slow
@pytest.mark.extended
def test_per_step_metrics_reach_tensorboard_and_wandb(ray_local, tmp_path, tiny_model):
    from conftest import toy_recipe

    from raytune_app.data.prepare import prepare
    from raytune_app.train.run import train

    recipe = toy_recipe(tmp_path, tiny_model, report_to=["tensorboard", "wandb"])
    prepare(recipe)
    train(recipe)
    train_dir = recipe.stage_dir("train")
    events = glob.glob(os.path.join(train_dir, "tensorboard", "**", "events.out.tfevents.*"), recursive=True)
    assert events, os.listdir(train_dir)
    tags = {value.tag for path in events for event in _events(path) for value in event.summary.value}
    assert "train/loss" in tags and "eval/loss" in tags
    runs = glob.glob(os.path.join(train_dir, "wandb", "offline-run-*"))
    assert runs and glob.glob(os.path.join(runs[0], "*.wandb"))
