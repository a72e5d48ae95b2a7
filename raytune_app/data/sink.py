"""The prepare stage's writer: one streaming pass writes every split, the rejects and the statistics.

A Ray Data `Datasink` (Ray's extension point for outputs). Each write task takes the blocks it is
given and, per block, appends the rows of each split to that split's Parquet file (one file per split
per write task, one row group per block) and the rejected rows to a JSONL part file. It returns
counts, a token-length histogram and an order-independent content hash per split; `on_write_complete`
adds them up on the driver. Writing all outputs in one pass means the pipeline (parse, validate,
tokenise) runs once, not once per split.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink

from raytune_app import storage

SPLITS = ("train", "val", "test")
HASH_MODULUS = 2**128

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)


def split_schema(kind: str, packed: bool, keep_columns: tuple[str, ...]) -> pa.Schema:
    """Columns of a prepared split file (packed applies to the train split of SFT data only)."""
    provenance = [("content_hash", pa.string()), ("source_file", pa.string()), ("source_row", pa.int64())]
    kept = [(name, pa.string()) for name in keep_columns]
    if packed:
        return pa.schema([("input_ids", pa.list_(pa.int32())), ("completion_mask", pa.list_(pa.int8())),
                          ("seq_lengths", pa.list_(pa.int32())), ("num_tokens", pa.int32()),
                          ("example_hashes", pa.list_(pa.string()))])
    if kind == "preference":
        return pa.schema([("prompt", MESSAGES), ("chosen", MESSAGES), ("rejected", MESSAGES), ("num_tokens", pa.int32()),
                          *provenance, *kept])
    return pa.schema([("messages", MESSAGES), ("input_ids", pa.list_(pa.int32())), ("completion_mask", pa.list_(pa.int8())),
                      ("num_tokens", pa.int32()), *provenance, *kept])


def _split_table(rows: list[dict], kind: str, packed: bool, keep_columns: tuple[str, ...]) -> pa.Table:
    schema = split_schema(kind, packed, keep_columns)
    if packed:
        columns = {name: [r[name] for r in rows] for name in schema.names}
        return pa.Table.from_pydict(columns, schema=schema)
    examples = [json.loads(r["example"]) for r in rows]
    kept = [json.loads(r["keep"]) if r["keep"] else {} for r in rows]
    columns = {"num_tokens": [r["num_tokens"] for r in rows], "content_hash": [r["content_hash"] for r in rows],
               "source_file": [r["_source_file"] for r in rows], "source_row": [r["_source_row"] for r in rows]}
    if kind == "preference":
        columns["prompt"] = [e["prompt"] for e in examples]
        columns["chosen"] = [[{"role": "assistant", "content": e["chosen"]}] for e in examples]
        columns["rejected"] = [[{"role": "assistant", "content": e["rejected"]}] for e in examples]
    else:
        columns["messages"] = [e["messages"] for e in examples]
        columns["input_ids"] = [r["input_ids"] for r in rows]
        columns["completion_mask"] = [r["completion_mask"] for r in rows]
    for name in keep_columns:
        columns[name] = [k.get(name) for k in kept]
    return pa.Table.from_pydict(columns, schema=schema)


def row_hash_value(content_hash: str) -> int:
    return int.from_bytes(hashlib.sha256(content_hash.encode()).digest()[:16], "big")


class PreparedSink(Datasink):
    """Writes `<out>/<split>/part-*.parquet`, `<out>/rejected/part-*.jsonl`; `self.stats` after the write."""

    def __init__(self, out_dir: str, kind: str, packing: bool, keep_columns: tuple[str, ...], max_seq_length: int):
        self.out_dir = out_dir
        self.kind = kind
        self.packing = packing
        self.keep_columns = tuple(keep_columns)
        self.max_seq_length = max_seq_length
        self.stats: dict | None = None

    def _empty_stats(self) -> dict:
        return {
            "rows_in": 0,
            "rejected": Counter(),
            "splits": {s: {"rows": 0, "examples": 0, "tokens": 0, "hash": 0,
                           "lengths": np.zeros(self.max_seq_length + 1, dtype=np.int64)} for s in SPLITS},
        }

    def write(self, blocks, ctx) -> dict:
        stats = self._empty_stats()
        fs, root = storage.filesystem(self.out_dir)
        writers: dict[str, pq.ParquetWriter] = {}
        rejects = None
        try:
            for block in blocks:
                table = pa.table(block) if not isinstance(block, pa.Table) else block
                rows = table.to_pylist()
                by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
                for row in rows:
                    packed_row = row.get("example_hashes") is not None
                    stats["rows_in"] += len(row["example_hashes"]) if packed_row else 1
                    if row["status"] != "ok":
                        stats["rejected"][row["status"]] += 1
                        if rejects is None:
                            fs.create_dir(f"{root}/rejected", recursive=True)
                            rejects = fs.open_output_stream(f"{root}/rejected/part-{ctx.task_idx:05d}.jsonl")
                        rejects.write((json.dumps({
                            "source_file": row["_source_file"], "line": row["_source_row"], "reason": row["status"],
                            "field": row["field"], "message": row["message"], "raw": row["raw"],
                        }, ensure_ascii=False) + "\n").encode())
                        continue
                    split = row["split"]
                    by_split[split].append(row)
                    s = stats["splits"][split]
                    s["rows"] += 1
                    s["tokens"] += row["num_tokens"]
                    s["lengths"][min(row["num_tokens"], self.max_seq_length)] += 1
                    hashes = row["example_hashes"] if packed_row else [row["content_hash"]]
                    s["examples"] += len(hashes)
                    for h in hashes:
                        s["hash"] = (s["hash"] + row_hash_value(h)) % HASH_MODULUS
                for split, split_rows in by_split.items():
                    if not split_rows:
                        continue
                    packed = self.packing and split == "train"
                    part = _split_table(split_rows, self.kind, packed, self.keep_columns)
                    if split not in writers:
                        fs.create_dir(f"{root}/{split}", recursive=True)
                        writers[split] = pq.ParquetWriter(f"{root}/{split}/part-{ctx.task_idx:05d}.parquet", part.schema, filesystem=fs)
                    writers[split].write_table(part)
        finally:
            for writer in writers.values():
                writer.close()
            if rejects is not None:
                rejects.close()
        return stats

    def on_write_complete(self, write_result) -> None:
        total = self._empty_stats()
        for stats in write_result.write_returns:
            total["rows_in"] += stats["rows_in"]
            total["rejected"].update(stats["rejected"])
            for split in SPLITS:
                mine, theirs = total["splits"][split], stats["splits"][split]
                for key in ("rows", "examples", "tokens"):
                    mine[key] += theirs[key]
                mine["hash"] = (mine["hash"] + theirs["hash"]) % HASH_MODULUS
                mine["lengths"] += theirs["lengths"]
        self.stats = total
