"""Run-directory I/O that works the same on a local path and on shared storage (s3://, gs://, ...).

Every stage writes its artefacts through these helpers, which use pyarrow's filesystems (the ones
Ray Data and Ray Train use), so `run.output_dir: s3://bucket/runs` needs no other change. Local paths
are made absolute first: Ray workers may run in another working directory.
"""

from __future__ import annotations

import os
import time

import pyarrow.fs as pafs

from raytune_app.errors import MissingInput


def absolute(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(absolute(uri))


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts])


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def read_json(uri: str):
    """The JSON document at `uri`, or None when there is no file there."""
    import json

    return json.loads(read_text(uri)) if exists(uri) else None


def unchanged(uri: str, fingerprint: str):
    """The stage output's JSON summary at `uri` when it was made with `fingerprint` (reuse it), else None."""
    previous = read_json(uri)
    return previous if previous is not None and previous.get("fingerprint") == fingerprint else None


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(os.path.dirname(path), recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files directly under a directory, sorted, as URIs of the same kind as `uri`."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))
    return [join(uri, name) for name in names]


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def replace_dir(source: str, target: str) -> None:
    """Put a fully written directory in place of `target` (the old one goes only once the new is complete)."""
    fs, source_path = filesystem(source)
    _, target_path = filesystem(target)
    if fs.get_file_info(target_path).type != pafs.FileType.NotFound:
        fs.delete_dir(target_path)
    fs.move(source_path, target_path)


def file_fingerprint(uri: str) -> list:
    """(path, size, mtime) of every file a source path names (a file, a directory or a glob)."""
    import glob

    if "://" not in uri and any(ch in uri for ch in "*?["):
        return [entry for match in sorted(glob.glob(uri)) for entry in file_fingerprint(match)]
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return [
            [i.path, i.size, i.mtime_ns] for i in sorted(infos, key=lambda i: i.path) if i.type == pafs.FileType.File
        ]
    if info.type == pafs.FileType.NotFound:
        raise MissingInput(f"data source not found: {uri}")
    return [[info.path, info.size, info.mtime_ns]]


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory to `uri` (replacing what is there)."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def local_dir(uri: str) -> str:
    """A local folder with the content of the folder at `uri`: `uri` itself when local, else a fresh copy."""
    if "://" not in uri:
        return uri
    import tempfile

    target = tempfile.mkdtemp(prefix="raytune-")
    fs, path = filesystem(uri)
    pafs.copy_files(path, target, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return target


def move_aside(uri: str, fingerprint: str) -> str:
    """Move an earlier run's folder out of the way (it is never overwritten); returns where it went."""
    aside = f"{uri}.previous-{fingerprint}-{int(time.time())}"
    move(uri, aside)
    return aside


def move(source: str, target: str) -> None:
    fs, source_path = filesystem(source)
    _, target_path = filesystem(target)
    fs.move(source_path, target_path)
