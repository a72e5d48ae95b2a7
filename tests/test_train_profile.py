"""`train.profile_steps`: a real transformers Trainer on a tiny Llama runs with the profiling callback, which
writes its summary after the chosen steps and leaves the other steps alone (no Ray: the callback is rank 0's
and takes nothing from Ray Train)."""

import pytest

from raytune_app import config
from raytune_app.train.profile import profile_callback


def run_steps(model_path, out_dir, callbacks, steps=6):
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(model_path)
    rows = [{"input_ids": torch.arange(1, 17), "labels": torch.arange(1, 17)} for _ in range(steps * 2)]
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=2,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks)
    trainer.train()
    return trainer.state.global_step


def test_profiled_steps_write_a_summary_of_where_the_step_time_goes(tmp_path, tiny_model):
    target = tmp_path / "profile.txt"
    assert run_steps(tiny_model, tmp_path / "out", [profile_callback(3, 2, str(target))]) == 6
    text = target.read_text()
    lines = text.splitlines()
    assert lines[0].startswith("# torch.profiler: 3 optimizer step(s),") and "ms per step (wall)" in lines[0]
    assert lines[1].startswith("# operators on the host:")
    assert "aten::mm" in text or "aten::addmm" in text  # the table lists the forward / backward matmuls


def test_no_summary_when_the_run_ends_before_the_profiled_steps(tmp_path, tiny_model):
    target = tmp_path / "profile.txt"
    run_steps(tiny_model, tmp_path / "out", [profile_callback(3, 10, str(target))], steps=4)
    assert not target.exists()


def test_the_field_is_off_by_default_and_refuses_negative_counts():
    recipe = config.validate({"data": {"sources": ["x.jsonl"]}})
    assert recipe.train.profile_steps == 0
    with pytest.raises(config.RecipeError, match="profile_steps"):
        config.validate({"data": {"sources": ["x.jsonl"]}, "train": {"profile_steps": -1}})
