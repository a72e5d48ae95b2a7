"""Row rules of the prepare stage as plain functions: validation, normalisation, hashing, splitting."""

import random

import pytest

from raytune_app.data import rows
from raytune_app.data.rows import RowProblem, RowSpec

SFT = RowSpec(kind="prompt_response", prompt="q", response="a")
CHAT = RowSpec(kind="chat", messages="conv", system_prompt="Be brief.")
PREF = RowSpec(kind="preference")


def reason(record, spec):
    with pytest.raises(RowProblem) as caught:
        rows.to_example(record, spec)
    return caught.value.reason, caught.value.field


def test_normalise_text():
    assert rows.normalise_text("  caf\u0065\u0301 \r\nline  \r\n\n") == "caf\u00e9\nline"
    assert rows.normalise_text("a    b") == "a    b"  # inner whitespace carries meaning


def test_prompt_response_example():
    example = rows.to_example(
        {"q": " Hi ", "a": "Hello\r\n"}, RowSpec(kind="prompt_response", prompt="q", response="a", system_prompt="S")
    )
    assert example == {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    }


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"a": "x"}, ("missing_field", "q")),
        ({"q": None, "a": "x"}, ("null_field", "q")),
        ({"q": 3, "a": "x"}, ("wrong_type", "q")),
        ({"q": "  ", "a": "x"}, ("empty_field", "q")),
        ({"q": "hi", "a": ["x"]}, ("wrong_type", "a")),
        ([1, 2], ("not_an_object", None)),
    ],
)
def test_schema_problems(record, expected):
    assert reason(record, SFT) == expected


def test_problem_messages_say_what_to_do():
    with pytest.raises(
        RowProblem,
        match=r"no field `q` \(needed as the prompt; the row has: a\); map another column with data.columns.prompt",
    ):
        rows.to_example({"a": "x"}, SFT)


def test_malformed_json():
    with pytest.raises(RowProblem) as caught:
        rows.parse_json_line('{"q": "hi", "a": }')
    assert caught.value.reason == "malformed_json" and "column 18" in caught.value.message


def test_length_filters():
    spec = RowSpec(kind="prompt_response", prompt="q", response="a", min_prompt_chars=3, max_response_chars=5)
    assert reason({"q": "hi", "a": "ok"}, spec) == ("prompt_too_short", "q")
    assert reason({"q": "hello", "a": "too long answer"}, spec) == ("response_too_long", "a")


def test_chat_rows():
    example = rows.to_example({"conv": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, CHAT)
    assert example["messages"][0] == {"role": "system", "content": "Be brief."}
    assert reason({"conv": [{"role": "user", "content": "a"}]}, CHAT) == ("bad_messages", "conv")
    assert reason({"conv": [{"role": "bot", "content": "a"}]}, CHAT) == ("bad_messages", "conv[0]")
    assert reason({"conv": "not json"}, CHAT) == ("wrong_type", "conv")
    as_string = '[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]'
    assert rows.to_example({"conv": as_string}, CHAT)["messages"][-1]["content"] == "b"


def test_preference_rows():
    example = rows.to_example({"prompt": "p", "chosen": "good", "rejected": "bad"}, PREF)
    assert example == {"prompt": [{"role": "user", "content": "p"}], "chosen": "good", "rejected": "bad"}
    assert reason({"prompt": "p", "chosen": "same", "rejected": "same "}, PREF) == (
        "chosen_equals_rejected",
        "rejected",
    )
    assert reason({"prompt": "p", "chosen": "good"}, PREF) == ("missing_field", "rejected")
    assert reason({"prompt": "", "chosen": "a", "rejected": "b"}, PREF) == ("empty_field", "prompt")


def test_kept_columns_are_text():
    spec = RowSpec(kind="prompt_response", keep_columns=("group", "id", "meta"))
    assert rows.kept_values({"group": "a", "id": 7, "meta": {"k": 1}}, spec) == {
        "group": "a",
        "id": "7",
        "meta": '{"k": 1}',
    }
    with pytest.raises(RowProblem, match="data.keep_columns"):
        rows.kept_values({"group": "a"}, spec)


def test_content_hash_ignores_what_normalisation_removes():
    a = rows.to_example({"q": "Hi there", "a": "ok"}, SFT)
    b = rows.to_example({"q": "Hi there  \r\n", "a": " ok"}, SFT)
    c = rows.to_example({"q": "Hi  there", "a": "ok"}, SFT)
    assert rows.content_hash(a) == rows.content_hash(b) != rows.content_hash(c)


def _keys(n, seed):
    return [f"prompt number {i} salt {seed}" for i in range(n)]


def test_split_is_deterministic_and_order_independent():
    keys = _keys(2000, 0)
    first = {k: rows.assign_split(k, 0.1, 0.1) for k in keys}
    shuffled = keys[:]
    random.Random(1).shuffle(shuffled)
    assert {k: rows.assign_split(k, 0.1, 0.1) for k in shuffled} == first


def test_split_is_stable_when_rows_are_added_and_fractions_hold():
    keys = _keys(20000, 0)
    splits = [rows.assign_split(k, 0.1, 0.2) for k in keys]
    assert abs(splits.count("val") / len(keys) - 0.1) < 0.01
    assert abs(splits.count("test") / len(keys) - 0.2) < 0.01
    # Growing the test fraction only moves rows out of val/train into test, never test rows elsewhere.
    grown = [rows.assign_split(k, 0.1, 0.25) for k in keys]
    assert all(g == "test" for s, g in zip(splits, grown) if s == "test")
    assert [rows.assign_split(k, 0.1, 0.2, salt="other") for k in keys] != splits


def test_same_prompt_lands_in_one_split():
    a = rows.to_example({"q": "What is 2+2?", "a": "4"}, SFT)
    b = rows.to_example({"q": "What is 2+2?", "a": "four"}, SFT)
    assert rows.content_hash(a) != rows.content_hash(b)
    assert rows.split_key(a) == rows.split_key(b)
