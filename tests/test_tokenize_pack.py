"""Template rendering with assistant-only masks, truncation, and packing without cross-attention."""

import random

import pytest
import torch

from raytune_app.data.packing import best_fit_decreasing, pack
from raytune_app.data.tokenize import tokenize_examples


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


CHAT = [
    {"role": "system", "content": "Extract."},
    {"role": "user", "content": "order ORD-123456 please"},
    {"role": "assistant", "content": '{"order_id": "ORD-123456"}'},
]


def test_mask_covers_exactly_the_answer_and_end_token(tokenizer):
    ((ids, mask, problem),) = tokenize_examples(tokenizer, [CHAT], 512, "drop")
    assert problem is None and len(ids) == len(mask)
    learned = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert learned == '{"order_id": "ORD-123456"}<|im_end|>\n'
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nExtract.<|im_end|>")


def test_multi_turn_masks_every_assistant_turn_only(tokenizer):
    chat = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "two"},
    ]
    ((ids, mask, _),) = tokenize_examples(tokenizer, [chat], 512, "drop")
    learned = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert learned == "one<|im_end|>\ntwo<|im_end|>\n"


def test_truncation_policies(tokenizer):
    ((ids, _, _),) = tokenize_examples(tokenizer, [CHAT], 512, "drop")
    limit = len(ids) - 3
    ((_, _, problem),) = tokenize_examples(tokenizer, [CHAT], limit, "drop")
    assert problem.reason == "too_long" and f"data.max_seq_length={limit}" in problem.message
    ((cut, cut_mask, problem),) = tokenize_examples(tokenizer, [CHAT], limit, "truncate")
    assert problem is None and cut == ids[:limit] and len(cut_mask) == limit
    ((_, _, problem),) = tokenize_examples(tokenizer, [CHAT], 10, "truncate")
    assert problem.reason == "too_long" and "before the answer starts" in problem.message


def test_best_fit_decreasing_respects_capacity_and_keeps_every_item():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    # Close to the lower bound: best-fit decreasing wastes little.
    assert len(bins) <= sum(lengths) / 128 * 1.1 + 1
    with pytest.raises(ValueError, match="cannot be packed"):
        best_fit_decreasing([10, 200], 128)


def test_best_fit_picks_the_tightest_bin():
    # 3 fits both open bins (room 3 and 4): it goes where it leaves no room, not into the roomier one.
    assert best_fit_decreasing([5, 4, 3], 8) == [[0, 2], [1]]


def test_pack_keeps_examples_whole():
    examples = [
        {"input_ids": list(range(n)), "completion_mask": [1] * n, "content_hash": f"h{n}"} for n in (5, 3, 4, 2)
    ]
    packed = pack(examples, 8)
    assert sum(len(p["seq_lengths"]) for p in packed) == 4
    for p in packed:
        assert sum(p["seq_lengths"]) == len(p["input_ids"]) == len(p["completion_mask"]) <= 8
        starts = [0]
        for n in p["seq_lengths"][:-1]:
            starts.append(starts[-1] + n)
        for start, n in zip(starts, p["seq_lengths"]):
            assert p["input_ids"][start : start + n] == list(range(n))  # each example intact and contiguous


# flex_attention (train.attn_implementation) compiles its kernel first (~25 s on 2 cores): the extended lane. The
# packing and position ids under test are ours and the same for both kernels; sdpa checks them at every run.
@pytest.mark.parametrize("attention", ["sdpa", pytest.param("flex_attention", marks=pytest.mark.extended)])
def test_packed_examples_do_not_attend_to_each_other(tiny_model, tokenizer, attention):
    """Through TRL's padding-free collator (position ids restart per example), a packed sequence gives
    each example the same logits as running it alone, with the masking kernel (sdpa) and the one that
    skips the other examples' blocks (flex_attention)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention).eval()
    chats = [CHAT, [{"role": "user", "content": "refund please"}, {"role": "assistant", "content": "ok"}]]
    tokenized = tokenize_examples(tokenizer, chats, 512, "drop")
    examples = [
        {"input_ids": ids, "completion_mask": mask, "content_hash": str(i)}
        for i, (ids, mask, _) in enumerate(tokenized)
    ]
    (row,) = pack(examples, 512)
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    batch = collate([{k: row[k] for k in ("input_ids", "completion_mask", "seq_lengths")}])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for length, example in zip(row["seq_lengths"], [examples[i] for i in sorted(range(2))]):
            alone = model(input_ids=torch.tensor([example["input_ids"]]), use_cache=False).logits[0]
            assert torch.allclose(packed[start : start + length], alone, atol=1e-5)
            start += length
        # Without the restarting position ids the second example would see the first.
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        assert not torch.allclose(leaky[row["seq_lengths"][0] :], packed[row["seq_lengths"][0] :], atol=1e-3)
