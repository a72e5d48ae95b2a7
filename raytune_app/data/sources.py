"""Reading source files with provenance: every row keeps the file and line it came from.

Ray Data's `read_json` stops at the first malformed line and forgets line numbers; we need both,
so the prepare stage reads through this `FileBasedDatasource` (Ray's extension point for file
formats: it brings path expansion, globbing, any pyarrow filesystem incl. s3:// and gs://, and
streaming read tasks). Each row is `{_source_file, _source_row, _raw}` where `_raw` is the row as
JSON text; parsing and validation happen later, in parallel, in `rows.py`.

`_source_row` is the 1-based line for JSONL and CSV (the line where the record starts) and the
1-based row number for Parquet.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from raytune_app.errors import DataError

ROWS_PER_BLOCK = 4096
SOURCE_SCHEMA = pa.schema([("_source_file", pa.string()), ("_source_row", pa.int64()), ("_raw", pa.string())])
EXTENSIONS = {
    "jsonl": ["jsonl", "json", "ndjson", "jsonl.gz", "json.gz"],
    "parquet": ["parquet"],
    "csv": ["csv", "csv.gz"],
}


def format_of(path: str) -> str:
    """File format from the extension (for data.format: auto)."""
    lowered = path.lower()
    for fmt, extensions in EXTENSIONS.items():
        if any(lowered.endswith("." + ext) for ext in extensions):
            return fmt
    raise DataError(f"{path}: cannot tell the format from the extension; set data.format to jsonl, parquet or csv")


def _block(path: str, rows: list[int], raws: list[str]) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array([path] * len(rows), pa.string()), pa.array(rows, pa.int64()), pa.array(raws, pa.string())],
        schema=SOURCE_SCHEMA,
    )


def _jsonl_lines(stream) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line, read in chunks so big files stream."""
    remainder = b""
    number = 0
    while True:
        chunk = stream.read(8 << 20)
        if not chunk:
            break
        lines = (remainder + chunk).split(b"\n")
        remainder = lines.pop()
        for line in lines:
            number += 1
            if line.strip():
                yield number, line.decode("utf-8", errors="replace")
    if remainder.strip():
        yield number + 1, remainder.decode("utf-8", errors="replace")


def _csv_rows(stream) -> Iterator[tuple[int, str]]:
    reader = csv.DictReader(io.TextIOWrapper(io.BufferedReader(_Readable(stream)), encoding="utf-8", newline=""))
    start = 2  # line 1 is the header
    for record in reader:
        # Cells are text; an empty cell is a missing value, as in every spreadsheet export.
        yield start, json.dumps({k: (v if v != "" else None) for k, v in record.items()}, ensure_ascii=False)
        start = reader.line_num + 1


def _parquet_rows(stream) -> Iterator[tuple[int, str]]:
    import pyarrow.parquet as pq

    number = 0
    parquet = pq.ParquetFile(pa.BufferReader(stream.read()))
    for batch in parquet.iter_batches(batch_size=ROWS_PER_BLOCK):
        for record in batch.to_pylist():
            number += 1
            yield number, json.dumps(record, ensure_ascii=False, default=str)


READERS = {"jsonl": _jsonl_lines, "csv": _csv_rows, "parquet": _parquet_rows}


def raw_rows(uri: str, fmt: str = "auto") -> Iterator[tuple[int, str]]:
    """(row number, row as JSON text) of one file, read in this process: for files small enough not
    to need a Ray job (an evaluation set, guard data). Numbering as in `SourceFiles`."""
    from raytune_app import storage

    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path) as stream:
        yield from READERS[fmt if fmt != "auto" else format_of(uri)](stream)


class _Readable(io.RawIOBase):
    """A pyarrow input stream seen as a Python raw file (for the csv module)."""

    def __init__(self, stream):
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class SourceFiles(FileBasedDatasource):
    """JSONL, CSV or Parquet files as provenance-tagged raw rows (see module docstring)."""

    def __init__(self, paths, fmt: str = "auto", **kwargs):
        super().__init__(paths, **kwargs)
        self._format = fmt

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        fmt = self._format if self._format != "auto" else format_of(path)
        reader = READERS[fmt]
        rows, raws = [], []
        for number, raw in reader(f):
            rows.append(number)
            raws.append(raw)
            if len(rows) >= ROWS_PER_BLOCK:
                yield _block(path, rows, raws)
                rows, raws = [], []
        if rows:
            yield _block(path, rows, raws)
