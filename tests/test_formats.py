"""Data formats users bring: alpaca, ShareGPT (with function calls), OpenAI messages with tool calls,
save_to_disk folders and cached hub ids, and weighted mixing of several sources.

The row rules are pure functions (no Ray); the last tests run the real prepare stage on Ray Data over
files written here, with malformed rows in every format, and check the manifest's realised mix.
"""

import json

import pytest

from raytune_app import config
from raytune_app.data import layouts
from raytune_app.data.mixing import copies
from raytune_app.data.rows import RowProblem, RowSpec, to_example

CHATML_TOOLS = (
    "{% if tools %}{{ '<|im_start|>system\nTools: ' + (tools | tojson) + '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}"
    "{{ '<tool_call>' + (call.function | tojson) + '</tool_call>' }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CHAT = RowSpec(kind="chat")


def test_layouts_are_detected_from_a_row():
    assert layouts.detect({"instruction": "x", "input": "", "output": "y"}) == "alpaca"
    assert layouts.detect({"conversations": [{"from": "human", "value": "hi"}]}) == "sharegpt"
    assert layouts.detect({"messages": [{"role": "user", "content": "hi"}]}) == "openai"
    assert layouts.detect({"question": "q", "answer": "a"}) == "columns"


def test_alpaca_rows_become_chats():
    example = to_example(
        {
            "instruction": "Translate.",
            "input": "bonjour",
            "output": "hello",
            "system": "Be brief.",
            "history": [["hi", "hello there"]],
        },
        CHAT,
        "alpaca",
    )
    assert [m["role"] for m in example["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert example["messages"][3]["content"] == "Translate.\n\nbonjour"
    assert to_example({"instruction": "Say hi.", "output": "hi"}, CHAT, "alpaca")["messages"][0]["content"] == "Say hi."
    with pytest.raises(RowProblem) as problem:
        to_example({"instruction": "Say hi.", "output": 3}, CHAT, "alpaca")
    assert problem.value.field == "output" and problem.value.reason == "wrong_type"


def test_sharegpt_rows_with_function_calls_become_tool_turns():
    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "gpt", "value": "It is 21 degrees."},
        ],
        "tools": json.dumps([WEATHER_TOOL]),
    }
    example = to_example(row, CHAT, "sharegpt")
    roles = [m["role"] for m in example["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"] and example["tools"] == [WEATHER_TOOL]
    assert example["messages"][1]["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ]
    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"}]}
    with pytest.raises(RowProblem) as problem:
        to_example(bad, CHAT, "sharegpt")
    assert problem.value.field == "conversations[1]"


def test_openai_messages_with_tool_calls_are_checked_and_normalised():
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "-3"},
        {"role": "assistant", "content": "Cold: -3."},
    ]
    example = to_example({"messages": messages, "tools": [WEATHER_TOOL]}, CHAT, "openai")
    call = example["messages"][1]["tool_calls"][0]
    assert call["function"]["arguments"] == {"city": "Oslo"} and call["id"] == "c1"
    assert example["messages"][2]["tool_call_id"] == "c1"
    messages[1]["tool_calls"][0]["function"]["arguments"] = "{city: Oslo"
    with pytest.raises(RowProblem, match="not valid JSON") as problem:
        to_example({"messages": messages}, CHAT, "openai")
    assert problem.value.field == "messages[1].tool_calls[0]"


def test_tool_calls_are_rendered_and_learned_or_refused_by_the_template(tiny_model):
    from raytune_app.data.tokenize import tokenize_examples
    from raytune_app.models import load_tokenizer

    example = to_example(
        {
            "conversations": [
                {"from": "human", "value": "Weather in Paris?"},
                {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
                {"from": "observation", "value": "21"},
                {"from": "gpt", "value": "21 degrees."},
            ]
        },
        CHAT,
        "sharegpt",
    )
    with_tools = load_tokenizer(tiny_model, chat_template=CHATML_TOOLS)
    [(ids, mask, problem)] = tokenize_examples(with_tools, [example["messages"]], 512, "drop", [[WEATHER_TOOL]])
    assert problem is None
    learned = with_tools.decode([t for t, m in zip(ids, mask) if m])
    assert "get_weather" in learned and "21 degrees." in learned and "Weather in Paris" not in learned
    plain = load_tokenizer(tiny_model)  # ChatML without tool support: the call would silently vanish
    [(_, _, refused)] = tokenize_examples(plain, [example["messages"]], 512, "drop", [[WEATHER_TOOL]])
    assert refused is not None and refused.reason == "template_drops_tools" and "get_weather" in refused.message


def test_mixing_weights_are_seeded_and_realised():
    hashes = [f"{i:032x}" for i in range(4000)]
    half = sum(copies(h, 0.5, seed=0) for h in hashes)
    assert 1800 < half < 2200 and half == sum(copies(h, 0.5, seed=0) for h in hashes)
    assert sum(copies(h, 0.5, seed=1) for h in hashes) != half  # another seed draws other rows
    assert all(copies(h, 2.0, 0) == 2 for h in hashes[:50]) and all(copies(h, 0.0, 0) == 0 for h in hashes[:50])
    assert 5800 < sum(copies(h, 1.5, seed=0) for h in hashes) < 6200


def test_legacy_file_type_in_format_still_reads():
    recipe = config.validate({"data": {"sources": ["x.jsonl"], "format": "jsonl"}})
    assert recipe.data.file_format == "jsonl" and recipe.data.format == "auto"
    with pytest.raises(config.RecipeError, match="exactly one of `path`"):
        config.validate({"data": {"sources": [{"weight": 2}]}})
    with pytest.raises(config.RecipeError, match="kind preference"):
        config.validate({"data": {"sources": [{"path": "x.jsonl", "format": "sharegpt"}], "kind": "preference"}})


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_prepare_mixes_formats_and_sources_with_weights(tmp_path, tiny_model):
    import datasets

    from raytune_app.data.prepare import prepare

    alpaca = _write(
        tmp_path / "alpaca.jsonl",
        [{"instruction": f"Classify ticket {i}.", "input": f"word {i}", "output": "ok"} for i in range(120)]
        + [{"instruction": "No output here."}],
    )  # line 121: missing output
    sharegpt = _write(
        tmp_path / "sharegpt.jsonl",
        [
            {
                "conversations": [
                    {"from": "human", "value": f"Weather in city {i}?"},
                    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": i}})},
                    {"from": "observation", "value": str(i)},
                    {"from": "gpt", "value": f"It is {i}."},
                ],
                "tools": [WEATHER_TOOL],
            }
            for i in range(120)
        ]
        + ['{"conversations": [{"from": "human"}]}'],
    )  # line 121: a turn without value
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": str(i)}]}
            for i in range(120)
        ]
    ).save_to_disk(str(saved))
    recipe = config.validate(
        {
            "run": {"name": "mix", "output_dir": str(tmp_path / "runs")},
            "model": {"path": tiny_model, "chat_template": CHATML_TOOLS},
            "data": {
                "sources": [{"path": alpaca, "weight": 2.0}, {"path": sharegpt, "weight": 0.5}, str(saved)],
                "max_seq_length": 256,
                "split": {"val": 0.1, "test": 0.1},
            },
        }
    )
    manifest = prepare(recipe)
    layouts_seen = [(s["layout"], s["detected"]) for s in manifest["inputs"]]
    assert layouts_seen == [("alpaca", True), ("sharegpt", True), ("openai", True)]
    mix = {entry["file"].rsplit("/", 1)[-1]: entry for entry in manifest["mix"]}
    assert mix["alpaca.jsonl"]["used"] == 2 * mix["alpaca.jsonl"]["available"]
    half = mix["sharegpt.jsonl"]
    assert 0.3 * half["available"] <= half["used"] <= 0.7 * half["available"]
    parquet = next(entry for name, entry in mix.items() if name.endswith(".parquet"))
    assert parquet["used"] == parquet["available"]
    assert manifest["rows_out"]["train"] == sum(entry["used"] for entry in manifest["mix"])

    rejected = [json.loads(line) for line in open(tmp_path / "runs" / "mix" / "prepare" / "rejected.jsonl")]
    where = {(r["source_file"].rsplit("/", 1)[-1], r["line"], r["field"]) for r in rejected}
    assert ("alpaca.jsonl", 121, "output") in where and ("sharegpt.jsonl", 121, "conversations[0]") in where

    from raytune_app.data.prepare import load_split

    train = load_split(recipe.stage_dir("prepare"), "train").to_pylist()
    tool_rows = [r for r in train if r["tools"]]
    assert tool_rows and json.loads(tool_rows[0]["tools"]) == [WEATHER_TOOL]
    assert json.loads(tool_rows[0]["messages"][1]["tool_calls"])[0]["function"]["name"] == "get_weather"


def test_a_hub_dataset_not_in_the_cache_is_a_clear_error(tmp_path, monkeypatch):
    from raytune_app.data.inputs import SourceError, resolve

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    recipe = config.validate(
        {
            "run": {"output_dir": str(tmp_path)},
            "data": {"sources": [{"hf": "nobody/no-such-dataset", "split": "train"}]},
        }
    )
    with pytest.raises(SourceError, match="not in the local datasets cache.*Nothing is downloaded"):
        resolve(recipe)
