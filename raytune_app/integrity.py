"""Is a folder of weights (or a checkpoint) whole? Cheap structural checks that catch a file cut short.

    from raytune_app import integrity
    integrity.check_weights("runs/x/train/adapter")      # raises storage.Damaged naming the file
    integrity.weights_problem(uri)                       # the same as a message, or None

Used before anything trains on, registers, evaluates or serves weights, so a truncated file is named
instead of surfacing as a library's error from deep inside a worker (or, worse, loading as garbage).
The checks read headers and sizes only, through pyarrow's filesystems, so they cost a few small
reads on an object store too:

- `*.safetensors`: the header's declared tensor extents must end exactly at the end of the file;
- `*.json`: must parse;
- `*.bin` / `*.pt` / `*.pth` in torch's zip format (torch.save's default): the zip's central
  directory, at the very end of the file, must be readable (a cut-short zip has none).
"""

from __future__ import annotations

import json
import struct
import zipfile

import pyarrow.fs as pafs

from raytune_app import storage

CHECKED_SUFFIXES = (".safetensors", ".json", ".bin", ".pt", ".pth")


def _safetensors_problem(fs: pafs.FileSystem, path: str, size: int) -> str | None:
    if size < 8:
        return f"{size} bytes, shorter than a safetensors header"
    with fs.open_input_file(path) as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        if 8 + header_size > size:
            return f"{size} bytes, but its header alone declares {8 + header_size}"
        try:
            header = json.loads(f.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its safetensors header is not valid JSON"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + header_size + max(ends, default=0)
    if expected != size:
        return f"{size} bytes, but its header declares {expected}"
    return None


def _zip_problem(fs: pafs.FileSystem, path: str) -> str | None:
    with fs.open_input_file(path) as f:
        magic = f.read(4)
        if magic != b"PK\x03\x04":
            return None  # not torch's zip format (a legacy pickle): nothing cheap to check
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            return f"not a whole torch file ({exc})"
    return None


def file_problem(uri: str) -> str | None:
    """What is wrong with one file (None: nothing found)."""
    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return "missing"
    name = info.base_name
    if name.endswith(".safetensors"):
        return _safetensors_problem(fs, path, info.size)
    if name.endswith(".json"):
        with fs.open_input_stream(path) as f:
            raw = f.read()
        try:
            json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"{len(raw)} bytes, not valid JSON ({exc})"
        return None
    if name.endswith((".bin", ".pt", ".pth")):
        return _zip_problem(fs, path)
    return None


def weights_problem(uri: str) -> str | None:
    """'<file>: <what is wrong>' for the first damaged file in the folder (its current version), or None."""
    folder = storage.current(uri)
    fs, path = storage.filesystem(folder)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        return f"{uri}: no such folder"
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(CHECKED_SUFFIXES))
    if not files:
        return f"{uri}: no weights files in it"
    for file_path in files:
        file_uri = storage.join(folder, file_path[len(path) :].lstrip("/"))
        problem = file_problem(file_uri)
        if problem:
            return f"{file_uri} is damaged: {problem}"
    return None


def check_weights(uri: str, what: str = "weights") -> None:
    """Raise storage.Damaged naming the damaged file of the weights folder `uri`."""
    problem = weights_problem(uri)
    if problem:
        raise storage.Damaged(f"{what}: {problem}; it was probably cut short by a crash or a full disk")


RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


def resume_problem(run_dir: str) -> tuple[str, str] | None:
    """What stops Ray Train from resuming the run in `run_dir` (its storage folder), or None:
    ("state", message) when Ray's own record of the checkpoints is damaged (the run cannot be resumed;
    start it again), ("checkpoint", message) when a checkpoint it would resume from has a damaged file."""
    snapshot = storage.join(run_dir, RAY_TRAIN_SNAPSHOT)
    try:
        state = storage.load_json(snapshot)
    except FileNotFoundError:
        return None
    except storage.Damaged as exc:
        return "state", str(exc)
    names = [r.get("checkpoint_dir_name") for r in state.get("checkpoint_results", [])]
    latest = (state.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    for name in dict.fromkeys([latest, *names]):  # the latest first: it is what a resume loads
        if not name:
            continue
        problem = weights_problem(storage.join(run_dir, name))
        if problem:
            return "checkpoint", problem
    return None
