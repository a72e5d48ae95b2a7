"""What the prepare stage reads: each `data.sources` entry resolved to files, a row layout and a weight.

    inputs = resolve(recipe)      # Inputs(paths, files, layouts, weights, described)

- Paths, directories and globs are read as they are (local or any pyarrow URI).
- A folder written by `datasets`' save_to_disk, and a Hugging Face dataset id (`hf:`) found in the local
  datasets cache, are written once as Parquet under `<run dir>/source/` (named by the dataset's own
  fingerprint, so an unchanged dataset is not written again) and read like any Parquet file. Nothing is
  downloaded: `HF_DATASETS_OFFLINE` is set while looking, and a dataset not in the cache is an error that
  says how to get it there.
- A public data set named by `adapter` (e-SNLI's line-aligned files, GSM8K's `#### N` answers) is
  written once as JSONL with prompt / response / rationale columns (raytune_app/data/public.py) and read
  with the `columns` layout.
- The layout of each source (`format`, else `data.format`) is looked up on its first row when it is `auto`
  (raytune_app/data/layouts.py), and what was detected is printed and kept in the manifest.

Runs on the driver, before any Ray work.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from raytune_app import console, storage
from raytune_app.config import Recipe
from raytune_app.data.settings import SourceSection
from raytune_app.errors import DataError


class SourceError(DataError):
    """A source that cannot be read; the message names it and says what to do."""


@dataclass
class Inputs:
    paths: list[str]  # what the reader is given (files, directories, globs, URIs)
    files: list  # [path, size, mtime] of every file (the fingerprint's input)
    layouts: dict[str, str] = field(default_factory=dict)  # file (as the reader names it) -> layout
    weights: dict[str, float] = field(default_factory=dict)  # file -> weight, where not 1
    described: list[dict] = field(default_factory=list)  # one entry per source, for the manifest


def _is_saved_dataset(path: str) -> bool:
    return (
        "://" not in path
        and os.path.isdir(path)
        and any(
            os.path.exists(os.path.join(path, name))
            for name in ("dataset_info.json", "dataset_dict.json", "state.json")
        )
    )


def _hub_dataset(source: SourceSection, path: str | None):
    """The `datasets.Dataset` of a save_to_disk folder or a cached hub id (no network)."""
    import datasets

    if path is not None:
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise SourceError(f"{path}: no split {source.split!r} (it has {', '.join(loaded)}); set `split`")
            loaded = loaded[source.split]
        return loaded
    previous = os.environ.get("HF_DATASETS_OFFLINE")
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        return datasets.load_dataset(source.hf, source.subset, split=source.split)
    except Exception as exc:  # not cached, no such split / subset: one readable message
        raise SourceError(
            f"data.sources hf {source.hf!r} (subset {source.subset}, split {source.split}) is not in the local "
            f"datasets cache ({str(exc).splitlines()[0][:200]}). Nothing is downloaded at run time: on a connected "
            "machine run `datasets.load_dataset(...)` with the same cache, or `save_to_disk` it and give that "
            "folder as `path`"
        ) from None
    finally:
        if previous is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = previous


def _materialise(recipe: Recipe, source: SourceSection, path: str | None) -> str:
    """A Parquet copy of a save_to_disk / hub dataset under <run dir>/source/, written once per dataset version."""
    dataset = _hub_dataset(source, path)
    identity = json.dumps([source.hf or path, source.subset, source.split, dataset._fingerprint])
    name = (source.hf or os.path.basename((path or "").rstrip("/"))).replace("/", "--")
    target = storage.absolute(
        storage.join(recipe.run_dir, "source", f"{name}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}.parquet")
    )
    if not storage.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        partial = f"{target}.partial"
        dataset.to_parquet(partial)
        os.replace(partial, target)
        console.logger("prepare").info(f"{source.hf or path}: {dataset.num_rows} rows written once as {target}")
    return target


def _first_record(file: str, file_format: str):
    from raytune_app.data.sources import raw_rows

    for _, raw in raw_rows(file, file_format):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return None  # a malformed first line: the rows themselves report it
    return None


def resolve(recipe: Recipe) -> Inputs:
    """Every source's files, layout and weight (see the module docstring)."""
    from raytune_app.data import layouts

    data = recipe.data
    inputs = Inputs(paths=[], files=[])
    for index, source in enumerate(data.source_sections):
        given = recipe.resolve_source(source.path) if source.path is not None else None
        identity = None  # what the output depends on, where it is not the file read (an adapter's copy)
        if source.adapter is not None and given is not None:
            from raytune_app.data import public

            try:
                path, identity = public.materialise(recipe, source.adapter, given, source.split)
            except public.AdapterError as exc:
                raise SourceError(f"data.sources[{index}]: {exc}") from None
        elif source.hf is not None or given is None or _is_saved_dataset(given):
            path = _materialise(recipe, source, given)  # a hub dataset (no path) or a save_to_disk folder
        else:
            path = given
        try:
            files = storage.file_fingerprint(path)
        except FileNotFoundError:
            raise SourceError(f"data.sources[{index}]: {path} not found") from None
        if not files:
            raise SourceError(f"data.sources[{index}]: {path} matches no files")
        layout = "columns" if source.adapter is not None else data.layout_setting(source)
        detected = layout == "auto"
        if detected:
            layout = layouts.detect(_first_record(files[0][0], data.file_format))
        inputs.paths.append(path)
        # An adapter's copy lives in the run directory: fingerprinting the original files instead lets two
        # run directories (the cells of an experiment) share one prepared output.
        inputs.files.extend(identity if identity is not None else files)
        for file, _, _ in files:
            inputs.layouts[file] = layout
            if source.weight != 1.0:
                inputs.weights[file] = source.weight
        inputs.described.append(
            {
                "source": source.path or source.hf,
                "files": len(files),
                "layout": layout,
                "detected": detected,
                "weight": source.weight,
            }
        )
    return inputs
