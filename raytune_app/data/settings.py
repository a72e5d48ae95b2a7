"""The recipe's `data` section: where examples come from and how the prepare stage shapes them.

Plain pydantic; no Ray. Every field documented where it is declared; the prepare stage that reads it is
raytune_app/data/prepare.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raytune_app.sections import Section


class GeneratorSection(Section):
    name: Literal["order_extraction", "order_extraction_pairs", "multi_step_arithmetic"] = Field(
        "order_extraction",
        description="Built-in data generator. `order_extraction`: support messages about orders turned into "
        "JSON with a fixed schema (raytune_app.data.extraction); `order_extraction_pairs`: the same with a "
        "`rejected` answer per message showing a typical flaw (prose after the JSON, a wrong value, a dropped or "
        "repeated key, a prose reply), for DPO; `multi_step_arithmetic`: word problems of 2-4 "
        "steps with integer answers (raytune_app.data.arithmetic; columns question, answer).",
    )
    rows: int = Field(1200, gt=0, description="How many examples to generate.")
    seed: int = Field(0, description="Seed of the generator: the same seed gives the same file.")


class ColumnsSection(Section):
    """Where each role is found in the source rows; which roles are needed depends on `data.kind`."""

    prompt: str | None = Field(None, description="Column holding the user prompt (kinds: prompt_response, preference).")
    response: str | None = Field(None, description="Column holding the target answer (kind: prompt_response).")
    system: str | None = Field(None, description="Optional column holding a per-row system prompt.")
    messages: str | None = Field(
        None,
        description="Column holding a chat as a list of {role, content} (kind: chat); the last message "
        "must be the assistant's, and only assistant turns are trained on.",
    )
    chosen: str | None = Field(None, description="Column holding the preferred answer (kind: preference).")
    rejected: str | None = Field(None, description="Column holding the dispreferred answer (kind: preference).")


_ROLES_BY_KIND = {
    "prompt_response": ("prompt", "response"),
    "chat": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
}


# Column names the prepare stage writes itself; a kept source column may not take one of them.
RESERVED_COLUMNS = {
    "source_file",
    "source_row",
    "status",
    "field",
    "message",
    "raw",
    "content_hash",
    "split",
    "messages",
    "prompt",
    "chosen",
    "rejected",
    "input_ids",
    "completion_mask",
    "num_tokens",
    "seq_lengths",
    "example_hashes",
}


class FiltersSection(Section):
    min_prompt_chars: int = Field(1, ge=0, description="Drop rows whose prompt is shorter (after normalising).")
    max_prompt_chars: int = Field(20_000, gt=0, description="Drop rows whose prompt is longer.")
    min_response_chars: int = Field(
        1, ge=0, description="Drop rows whose response (or chosen/rejected, last assistant turn) is shorter."
    )
    max_response_chars: int = Field(20_000, gt=0, description="Drop rows whose response is longer.")

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_prompt_chars > self.max_prompt_chars:
            raise ValueError(
                f"min_prompt_chars ({self.min_prompt_chars}) is above max_prompt_chars ({self.max_prompt_chars})"
            )
        if self.min_response_chars > self.max_response_chars:
            raise ValueError(
                f"min_response_chars ({self.min_response_chars}) is above max_response_chars "
                f"({self.max_response_chars})"
            )
        return self


class SplitSection(Section):
    val: float = Field(0.1, ge=0, lt=1, description="Fraction of unique rows sent to the validation split.")
    test: float = Field(0.1, ge=0, lt=1, description="Fraction of unique rows sent to the test split.")
    salt: str = Field(
        "",
        description="Mixed into the split hash. Rows keep their split when rows are added or reordered; "
        "change the salt to draw a different split.",
    )

    @model_validator(mode="after")
    def _leaves_training_data(self):
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must be below 1 so rows remain for training, got {self.val} + {self.test}")
        return self


LAYOUTS = Literal["auto", "columns", "alpaca", "sharegpt", "openai"]


class SourceSection(Section):
    """One input with its own settings; a plain string in `data.sources` is `{path: <string>}`."""

    path: str | None = Field(
        None,
        description="A file, directory or glob (local, s3://, gs://, ...), or a folder written by "
        "`datasets.Dataset.save_to_disk` (read with load_from_disk). Relative to the recipe file.",
    )
    hf: str | None = Field(
        None,
        description="A Hugging Face dataset id (e.g. tatsu-lab/alpaca), read from the local datasets cache only: "
        "nothing is downloaded at run time (download it once on a connected machine, or save_to_disk and use `path`).",
    )
    subset: str | None = Field(None, description="With `hf`: the dataset's configuration (subset) name.")
    split: str = Field(
        "train",
        description="With `hf` or a save_to_disk DatasetDict: the split to read; with adapter `esnli`: the files' "
        "suffix (train, dev, test).",
    )
    adapter: Literal["esnli", "gsm8k"] | None = Field(
        None,
        description="A public data set read in its published layout (raytune_app/data/public.py) and written once "
        "as JSONL rows {prompt, response, rationale} under <run dir>/source/: `esnli`: `path` is a folder of the "
        "line-aligned e-SNLI files (s1 / s2 / labels / preproc1_expl_N.<split>); `gsm8k`: `path` is GSM8K's "
        "JSONL (the label is the number after `####`, the rationale the worked solution before it).",
    )
    format: LAYOUTS | None = Field(None, description="This source's row layout; left out: `data.format`.")
    weight: float = Field(
        1.0,
        ge=0,
        description="Mixing weight: each training example of this source is used `weight` times on average "
        "(0.5: a seeded half of them, 2: each twice, 1.5: all once and a seeded half twice). Validation and "
        "test rows are never weighted. The realised mix is in the prepare manifest.",
    )

    @model_validator(mode="after")
    def _one_place(self):
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of `path` (files or a save_to_disk folder) or `hf` (a dataset id)")
        if self.adapter is not None and self.path is None:
            raise ValueError(f"adapter {self.adapter} reads files: give `path` (the data set's folder or file)")
        if self.adapter is not None and self.format not in (None, "auto", "columns"):
            raise ValueError(f"adapter {self.adapter} writes prompt / response columns: leave `format` out")
        return self


class DataSection(Section):
    sources: list[str | SourceSection] = Field(
        default_factory=list,
        description="Inputs: files, directories or globs (local paths or any pyarrow URI: s3://, gs://, hdfs://), "
        "save_to_disk folders, or {hf: <dataset id>} from the local cache; each either a string or "
        "{path | hf, format, weight, ...} (see SourceSection). Relative paths are relative to the recipe file.",
    )
    generator: GeneratorSection | None = Field(
        None, description="Generate the input with a built-in generator instead of reading `sources`."
    )
    format: LAYOUTS = Field(
        "auto",
        description="Row layout of the sources: `columns` (the fields `data.columns` names), `alpaca` (instruction, "
        "input, output), `sharegpt` (conversations of {from, value}, incl. function_call / observation turns), "
        "`openai` (messages with tool_calls and tool turns, plus `tools`). `auto`: detected from each source's first "
        "row (and printed), unless `data.columns` maps a field or the kind is preference (then `columns`). The "
        "alpaca, sharegpt and openai layouts give chats (trained like kind chat). A file type given here "
        "(jsonl, parquet, csv), as recipes before `file_format` did, is read as `file_format`.",
    )
    file_format: Literal["auto", "jsonl", "parquet", "csv"] = Field(
        "auto", description="File type; `auto` goes by extension (.jsonl/.json/.ndjson, .parquet, .csv)."
    )
    kind: Literal["prompt_response", "chat", "preference"] = Field(
        "prompt_response",
        description="Shape of an example: `prompt_response` (SFT), `chat` (multi-turn SFT) or `preference` "
        "(prompt, chosen, rejected; for DPO).",
    )
    columns: ColumnsSection = Field(
        default_factory=ColumnsSection,
        description="Column mapping from source fields to roles, e.g. {prompt: question, response: answer}. "
        "A role left out is looked up under its own name.",
    )
    system_prompt: str | None = Field(
        None, description="System prompt put before every example (a per-row `columns.system` wins)."
    )
    keep_columns: list[str] = Field(
        default_factory=list,
        description="Source columns carried through unchanged into the prepared splits (e.g. a group column "
        "for per-group evaluation, an id). A missing one is a schema error for that row.",
    )
    on_error: Literal["skip", "fail"] = Field(
        "skip",
        description="A row that fails validation: `skip` counts it and writes it to rejected.jsonl with its "
        "file, line and reason; `fail` stops the stage with an error naming them.",
    )
    dedupe: bool = Field(
        True, description="Drop exact duplicates (same normalised content hash); the first seen is kept."
    )
    filters: FiltersSection = Field(default_factory=FiltersSection, description="Length and quality filters.")
    split: SplitSection = Field(
        default_factory=SplitSection, description="Deterministic hash-based train/val/test split."
    )
    max_seq_length: int = Field(1024, gt=8, description="Longest tokenised example (and packed sequence), in tokens.")
    truncation: Literal["drop", "truncate"] = Field(
        "drop",
        description="An example longer than max_seq_length: `drop` rejects it (reason too_long); `truncate` "
        "cuts the end of the answer, keeping the whole prompt (rejected if the prompt alone does not fit).",
    )
    packing: bool = Field(
        False,
        description="Pack several SFT examples into each sequence of up to max_seq_length tokens (best-fit "
        "decreasing); the trainer keeps attention inside each example using the recorded seq_lengths. Pays off "
        "with a varlen flash-attention kernel (GPU); on CPU attention over a packed sequence costs more than "
        "the padding it saves, so leave it off there (measured in BENCHMARKS.md).",
    )
    batch_size: int = Field(1024, gt=0, description="Rows per Ray Data batch in each step of the pipeline.")
    tokenizer_actors: int = Field(
        2,
        gt=0,
        description="Size of the Ray Data actor pool that renders templates and tokenises (one tokenizer each).",
    )

    @model_validator(mode="before")
    @classmethod
    def _file_type_in_format(cls, raw):
        # `format` used to be the file type; a recipe written then keeps working.
        if isinstance(raw, dict) and raw.get("format") in ("jsonl", "parquet", "csv") and "file_format" not in raw:
            raw = {**raw, "file_format": raw["format"], "format": "auto"}
        return raw

    @property
    def source_sections(self) -> list[SourceSection]:
        return [SourceSection(path=s) if isinstance(s, str) else s for s in self.sources]

    def layout_setting(self, source: SourceSection) -> str:
        """The layout a source is read with: its own, else data.format; `auto` is decided per file later."""
        layout = source.format or self.format
        explicit_columns = any(v is not None for k, v in self.columns.model_dump().items() if k != "system")
        if layout == "auto" and (self.kind == "preference" or explicit_columns):
            return "columns"
        return layout

    @model_validator(mode="after")
    def _check(self):
        if bool(self.sources) == (self.generator is not None):
            raise ValueError("give exactly one of `sources` (files to read) or `generator` (built-in data)")
        needed = _ROLES_BY_KIND[self.kind]
        set_roles = {r for r, v in self.columns.model_dump().items() if v is not None}
        foreign = sorted(set_roles - set(needed) - {"system"})
        if foreign:
            raise ValueError(
                f"columns {foreign} do not belong to kind `{self.kind}`, which uses {list(needed)} (and `system`)"
            )
        clash = sorted(set(self.keep_columns) & RESERVED_COLUMNS)
        if clash:
            raise ValueError(
                f"keep_columns {clash} clash with columns prepare writes itself; rename them in the source"
            )
        if self.packing and self.kind == "preference":
            raise ValueError("packing applies to SFT data (kinds prompt_response, chat), not to preference pairs")
        if self.kind == "preference":
            chats = [
                s.path or s.hf for s in self.source_sections if (s.format or self.format) not in ("auto", "columns")
            ]
            if chats or self.format not in ("auto", "columns"):
                raise ValueError(
                    f"kind preference reads prompt / chosen / rejected columns; the alpaca, sharegpt and openai "
                    f"layouts are chats for SFT (set on: {', '.join(str(c) for c in chats) or 'data.format'})"
                )
        return self

    def column_for(self, role: str) -> str:
        """Source column name for a role (the role's own name unless mapped)."""
        return getattr(self.columns, role) or role
