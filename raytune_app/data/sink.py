"""The prepare stage's writer: one streaming pass writes every split, the rejects and the statistics.

A Ray Data `Datasink` (Ray's extension point for outputs). Each write task takes the blocks it is
given and, per block, appends the rows of each split to that split's Parquet file (one file per split
per write task, one row group per block) and the rejected rows to a JSONL part file. It returns
counts, a token-length histogram and an order-independent content hash per split; `on_write_complete`
adds them up on the driver. Writing all outputs in one pass means the pipeline (parse, validate,
tokenise) runs once, not once per split. The work stays in Arrow: only rejected rows become Python.

Each write task also records the node it ran on (blocks and rows per node id): Ray Data fuses the map steps
into the write task, so this is where each block was parsed, tokenised and written. The manifest keeps it
(`nodes`), which says how the work spread over a multi-node cluster, and from which node each part came.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink

from raytune_app import storage
from raytune_app.data.mixing import TALLY

SPLITS = ("train", "val", "test")
HASH_MODULUS = 2**128
PACKED_COLUMNS = ["input_ids", "completion_mask", "seq_lengths", "num_tokens", "example_hashes"]
REJECT_FIELDS = ("source_file", "source_row", "status", "field", "message", "raw")


def split_columns(kind: str, packed: bool, keep_columns: tuple[str, ...]) -> list[str]:
    """Columns of a prepared split file (packed applies to the train split of SFT data only)."""
    if packed:
        return PACKED_COLUMNS
    example = (
        ["prompt", "chosen", "rejected"]
        if kind == "preference"
        else ["messages", "tools", "input_ids", "completion_mask"]
    )
    return [*example, "num_tokens", "content_hash", "source_file", "source_row", *keep_columns]


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
            "nodes": {},  # node id -> {"blocks": n, "rows": n} written by tasks on that node
            "rejected": Counter(),
            "mix": {},  # source file -> [train examples available, used] (raytune_app/data/mixing.py)
            "splits": {
                s: {
                    "rows": 0,
                    "examples": 0,
                    "tokens": 0,
                    "hash": 0,
                    "lengths": np.zeros(self.max_seq_length + 1, dtype=np.int64),
                }
                for s in SPLITS
            },
        }

    def _count(self, stats: dict, split: str, part: pa.Table, packed: bool) -> None:
        s = stats["splits"][split]
        lengths = np.minimum(part["num_tokens"].to_numpy(), self.max_seq_length)
        hashes = pc.list_flatten(part["example_hashes"]) if packed else part["content_hash"]
        s["rows"] += part.num_rows
        s["examples"] += len(hashes)
        s["tokens"] += int(lengths.sum())
        s["lengths"] += np.bincount(lengths, minlength=self.max_seq_length + 1)
        s["hash"] = (s["hash"] + sum(row_hash_value(h) for h in hashes.to_pylist())) % HASH_MODULUS
        stats["rows_in"] += len(hashes)

    def write(self, blocks, ctx) -> dict:
        import ray

        stats = self._empty_stats()
        node = stats["nodes"].setdefault(ray.get_runtime_context().get_node_id(), {"blocks": 0, "rows": 0})
        fs, root = storage.filesystem(self.out_dir)
        writers: dict[str, pq.ParquetWriter] = {}
        rejects = None
        try:
            for block in blocks:
                table = block if isinstance(block, pa.Table) else pa.table(block)
                node["blocks"] += 1
                node["rows"] += table.num_rows
                is_tally = pc.fill_null(pc.equal(table["status"], TALLY), False)
                for tally in table.filter(is_tally).select(["source_file", "message"]).to_pylist():
                    counts = json.loads(tally["message"])
                    seen = stats["mix"].setdefault(tally["source_file"], [0, 0])
                    seen[0], seen[1] = seen[0] + counts["available"], seen[1] + counts["used"]
                table = table.filter(pc.invert(is_tally))
                ok = pc.fill_null(pc.equal(table["status"], "ok"), False)
                bad = table.filter(pc.invert(ok)).select(list(REJECT_FIELDS)).to_pylist()
                if bad:
                    if rejects is None:
                        fs.create_dir(f"{root}/rejected", recursive=True)
                        rejects = fs.open_output_stream(f"{root}/rejected/part-{ctx.task_idx:05d}.jsonl")
                    stats["rows_in"] += len(bad)
                    stats["rejected"].update(row["status"] for row in bad)
                    rejects.write(
                        "".join(
                            json.dumps(
                                {
                                    "source_file": r["source_file"],
                                    "line": r["source_row"],
                                    "reason": r["status"],
                                    "field": r["field"],
                                    "message": r["message"],
                                    "raw": r["raw"],
                                },
                                ensure_ascii=False,
                            )
                            + "\n"
                            for r in bad
                        ).encode()
                    )
                for split in SPLITS:
                    part = table.filter(pc.and_(ok, pc.fill_null(pc.equal(table["split"], split), False)))
                    if part.num_rows == 0:
                        continue
                    packed = self.packing and split == "train"
                    part = part.select(split_columns(self.kind, packed, self.keep_columns))
                    self._count(stats, split, part, packed)
                    if split not in writers:
                        fs.create_dir(f"{root}/{split}", recursive=True)
                        writers[split] = pq.ParquetWriter(
                            f"{root}/{split}/part-{ctx.task_idx:05d}.parquet", part.schema, filesystem=fs
                        )
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
            for node, counts in stats["nodes"].items():
                mine = total["nodes"].setdefault(node, {"blocks": 0, "rows": 0})
                mine["blocks"] += counts["blocks"]
                mine["rows"] += counts["rows"]
            total["rejected"].update(stats["rejected"])
            for file, (available, used) in stats["mix"].items():
                seen = total["mix"].setdefault(file, [0, 0])
                seen[0], seen[1] = seen[0] + available, seen[1] + used
            for split in SPLITS:
                mine, theirs = total["splits"][split], stats["splits"][split]
                for key in ("rows", "examples", "tokens"):
                    mine[key] += theirs[key]
                mine["hash"] = (mine["hash"] + theirs["hash"]) % HASH_MODULUS
                mine["lengths"] += theirs["lengths"]
        self.stats = total
