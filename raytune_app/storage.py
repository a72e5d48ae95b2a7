"""Run-directory I/O that works the same on a local path and on shared storage (s3://, gs://, ...), and
survives a kill at any moment.

Every stage writes its artefacts through these helpers, which use pyarrow's filesystems (the ones
Ray Data and Ray Train use), so `run.output_dir: s3://bucket/runs` needs no other change. Local paths
are made absolute first: Ray workers may run in another working directory.

DESIGN NOTES: crash consistency
-------------------------------
A stage may be killed (SIGKILL of the driver, a lost node, a full disk) between any two bytes it writes.
The rules below make every state a reader can see either the old complete output or the new complete
one, never a mix, and make "not there" and "damaged" mean the same thing to a reader: not done.

1. Files are written whole or not at all. Local: `write_bytes` writes a temporary file beside the
   target (`.<name>.<id>.tmp`), fsyncs it, renames it over the target (atomic on POSIX) and fsyncs the
   folder, so after a crash the name holds the old bytes or the new ones, and a later stage that reads
   it after a power cut reads what was there when the writer returned. Object stores (S3, GCS): one PUT
   (or a multipart upload completed at close) makes an object appear all at once, so no temporary
   name is needed.
2. A folder that replaces an earlier one (a stage's output, final weights) is built elsewhere and
   swapped in only once complete (`new_version` / `commit_dir`):
   - local: built in a sibling `<target>.incoming-<id>/`, fsynced file by file, then exchanged with
     the target in one `renameat2(RENAME_EXCHANGE)` call (Linux; atomic: the old folder is in place up
     to that instant and the new one from then on) and the old one, now at the staging name, deleted.
     Where the kernel or filesystem lacks the exchange, the target is renamed to
     `<target>.replaced-<id>` and the new one renamed in; `current()` puts a `.replaced-` folder back
     if a crash fell between those two renames.
   - object stores have no rename of folders (S3 copies object by object, GCS refuses), so a
     replaceable folder is a *pointer layout*: the content of each version lives under its own
     prefix `<target>/v-<time>-<id>/`, and the small object `<target>/CURRENT` names the complete
     version. Committing a version is one PUT of `CURRENT`; older versions (and the leftovers of
     crashed writers) are deleted after the flip. Readers resolve the folder with `current(target)`
     (the stage code does this wherever it reads an output: `load_split`, manifests, weights through
     `local_dir`), so a reader sees the old version until the instant the pointer flips.
3. Readers treat a missing, truncated or unparsable state file (`read_json`) as "not done": the stage
   recomputes or resumes instead of failing on a JSON error. Stages write their manifest last, so an
   output without a readable manifest is incomplete by construction.
4. A full device (ENOSPC) is reported as `NoSpace`, naming the path, what was being written, how much
   space it needed at least and how much is free; the half-written version is removed and the
   previous output, never touched before the commit, stays as it was.
5. Appends (the distill teacher cache) are a new small file per batch instead of appending to one
   (objects cannot be appended to), merged into one file at the end of the stage.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import shutil
import sys
import time
import uuid

import pyarrow.fs as pafs

from raytune_app.errors import EXIT_NO_SPACE, MissingInput, RaytuneError

POINTER = "CURRENT"  # the object naming the complete version of a folder on an object store
VERSION_PREFIX = "v-"


# ------------------------------------------------------------------------------------ locations


def absolute(uri: str) -> str:
    uri = os.fspath(uri)
    return uri if "://" in uri else os.path.abspath(uri)


def is_remote(uri: str) -> bool:
    """True for object-store URIs (s3://, gs://, ...): no folder rename, no append, no fsync."""
    uri = os.fspath(uri)
    return "://" in uri and not uri.startswith("file://")


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    # Credentials come from the AWS SDK's own chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
    # AWS_SESSION_TOKEN, profiles, instance roles); endpoint and region are read here, from the same
    # variables the AWS CLI and boto3 read, so one environment serves pyarrow, Ray and MLflow alike.
    return pafs.S3FileSystem(endpoint_override=endpoint or None, region=region or None)


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem configured from the standard AWS variables: AWS_ENDPOINT_URL_S3 or
    AWS_ENDPOINT_URL (an S3-compatible server: MinIO, Ceph, a local test server), AWS_REGION or
    AWS_DEFAULT_REGION. Without them: real S3 with the SDK's defaults."""
    env = os.environ
    return _s3(
        env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
        env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
    )


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    uri = os.fspath(uri)
    if uri.startswith("s3://") and "?" not in uri:  # a query string configures the filesystem itself
        return s3_filesystem(), uri[len("s3://") :].rstrip("/")
    return pafs.FileSystem.from_uri(absolute(uri))


def ray_storage(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train / Tune's RunConfig and Tuner.restore: Ray takes
    a remote path without its scheme when it is given the filesystem, which carries the endpoint."""
    if not is_remote(uri):
        return absolute(uri), None
    fs, path = filesystem(uri)
    return path, fs


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts])


def _local_path(uri: str) -> str:
    uri = os.fspath(uri)
    return uri[len("file://") :] if uri.startswith("file://") else absolute(uri)


# ---------------------------------------------------------------------------------------- reads


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


class Damaged(ValueError):
    """A file that is there but cannot be what it claims (cut short, not parseable); names the file."""


def load_json(uri: str):
    """The JSON document at `uri`; FileNotFoundError when missing, Damaged (naming it) when unreadable."""
    if not exists(uri):
        raise FileNotFoundError(f"no file at {uri}")
    raw = read_bytes(uri)
    try:
        return json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Damaged(
            f"{uri} is damaged ({len(raw)} bytes, not valid JSON: {exc}); it was probably cut short"
        ) from None


def read_json(uri: str):
    """The JSON document at `uri`, or None when there is none or it is damaged (a truncated state file
    means the step that wrote it did not finish: the caller recomputes or resumes). A damaged file is
    reported on stderr, once per read."""
    try:
        return load_json(uri)
    except FileNotFoundError:
        return None
    except Damaged as exc:
        from raytune_app import console

        console.logger("storage").warning(f"{exc}; treating it as not done")
        return None


def unchanged(uri: str, fingerprint: str):
    """The stage output's JSON summary at `uri` when it was made with `fingerprint` (reuse it), else None."""
    previous = read_json(uri)
    return previous if isinstance(previous, dict) and previous.get("fingerprint") == fingerprint else None


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files directly under a directory, sorted, as URIs of the same kind as `uri`."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))
    return [join(uri, name) for name in names]


def tree_size(uri: str) -> int:
    """Bytes in the files under a folder (0 when there is none)."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return info.size or 0
    if info.type != pafs.FileType.Directory:
        return 0
    return sum(
        i.size or 0 for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File
    )


def file_fingerprint(uri: str) -> list:
    """(path, size, mtime) of every file a source path names (a file, a directory or a glob)."""
    import glob

    uri = os.fspath(uri)
    if "://" not in uri and any(ch in uri for ch in "*?["):
        return [entry for match in sorted(glob.glob(uri)) for entry in file_fingerprint(match)]
    uri = current(uri)
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


# ------------------------------------------------------------------------------- full devices


class NoSpace(RaytuneError, OSError):
    """The device under the run directory is full: names the path, the space needed and what is free."""

    exit_code = EXIT_NO_SPACE

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def is_no_space(exc: BaseException | None) -> bool:
    """Whether a full device (ENOSPC / EDQUOT) is behind `exc`, however Ray or Arrow wrapped it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, NoSpace):
            return True
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "[Errno 28]" in str(exc):
            return True
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)
    return False


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def free_bytes(uri: str) -> int | None:
    """Free bytes on the device holding `uri` (its nearest existing parent); None for object stores."""
    if is_remote(uri):
        return None
    path = _local_path(uri)
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path or "/").free


def no_space(target: str, what: str, needed_at_least: int, previous: int = 0) -> NoSpace:
    """The NoSpace error for a write of `what` to `target` that filled its device."""
    free = free_bytes(target)
    if needed_at_least:
        estimate = f"more than {_mib(needed_at_least)} free there" + (
            f" (its previous version takes {_mib(previous)}, and is kept until the new one is complete)"
            if previous
            else ""
        )
    else:  # the writer could not say how much it had written (an error from inside a Ray worker)
        estimate = "more free space there than there is"
    return NoSpace(
        f"no space left on the device holding {target}: {what} needs {estimate}"
        + (f"; {_mib(free)} is free now" if free is not None else "")
        + ". Nothing was replaced: the previous output is intact. Free some space (or point run.output_dir "
        "at a larger volume) and run again."
    )


# --------------------------------------------------------------------------------------- writes


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs(path: str) -> None:
    """mkdir -p, with each new folder's entry made durable in its parent."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder)
        _fsync_dir(os.path.dirname(folder))


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically: readers (and a run after a crash) see the old bytes or the new
    ones. Local files are fsynced with their folder; a full device raises NoSpace naming the file."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        with fs.open_output_stream(path) as out:  # the object appears only when the upload completes
            out.write(data)
        return
    path = _local_path(uri)
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _makedirs(folder)
        with open(temporary, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        _fsync_dir(folder)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        if is_no_space(exc):
            raise no_space(path, f"writing {name}", len(data)) from exc
        raise


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def write_json(uri: str, value, indent: int | None = 2) -> None:
    write_text(uri, json.dumps(value, indent=indent, default=str) + "\n")


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def sync_tree(folder: str) -> None:
    """fsync every file and folder under a local folder (before it is renamed into place)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


# --------------------------------------------------------------------- replaceable folders


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two local paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


def staging_dir(target: str) -> str:
    """Where to build a new version of the folder `target` before `commit_dir` makes it current: a
    sibling folder locally, a new version prefix inside `target` on an object store."""
    stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    if is_remote(target):
        return join(target, f"{VERSION_PREFIX}{stamp}")
    return f"{absolute(target).rstrip('/')}.incoming-{stamp}"


def _children(uri: str) -> list[pafs.FileInfo]:
    fs, path = filesystem(uri)
    return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))


def _siblings(target: str, marker: str) -> list[str]:
    """Local folders beside `target` named `<target name><marker>...` (leftovers of earlier writers)."""
    parent, name = os.path.split(absolute(target).rstrip("/"))
    if not os.path.isdir(parent):
        return []
    return sorted(os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(f"{name}{marker}"))


def current(target: str) -> str:
    """Where the complete version of the replaceable folder `target` is: `target` itself locally (put
    back first if a crash fell mid-swap) and on object stores without a pointer; the version that
    `<target>/CURRENT` names on an object store."""
    target = os.fspath(target)
    if not is_remote(target):
        path = _local_path(target).rstrip("/")
        if not os.path.exists(path):
            replaced = _siblings(path, ".replaced-")
            if replaced:  # a crash between the two renames of the fallback swap: put the old one back
                os.rename(replaced[-1], path)
                _fsync_dir(os.path.dirname(path))
        return target
    pointer = join(target, POINTER)
    if not exists(pointer):
        return target
    try:
        version = load_json(pointer)["version"]
    except (Damaged, KeyError, TypeError) as exc:  # an object store writes it whole: this is outside damage
        raise Damaged(f"{pointer} does not name a version of {target} ({exc}); remove it to start over") from None
    return join(target, version)


def commit_dir(staging: str, target: str) -> None:
    """Make the complete folder `staging` (from `staging_dir(target)`) the current version of `target`.
    The previous version stays in place, whole, until the new one is in."""
    if is_remote(target):
        prefix = target.rstrip("/") + "/"
        if not staging.startswith(prefix):  # built elsewhere: copy it in as a new version first
            version = staging_dir(target)
            fs, source = filesystem(staging)
            _, destination = filesystem(version)
            pafs.copy_files(source, destination, source_filesystem=fs, destination_filesystem=fs)
            staging = version
        name = staging[len(prefix) :].split("/", 1)[0]
        write_json(join(target, POINTER), {"version": name, "committed": time.time()})
        fs, _ = filesystem(target)
        for info in _children(target):  # older versions, crashed writers' leftovers, an earlier flat layout
            if info.base_name in (POINTER, name):
                continue
            if info.type == pafs.FileType.Directory:
                fs.delete_dir(info.path)
            else:
                fs.delete_file(info.path)
        return
    source, destination = _local_path(staging).rstrip("/"), _local_path(target).rstrip("/")
    sync_tree(source)
    current(destination)  # a half-done fallback swap is put back before anything else moves
    parent = os.path.dirname(destination)
    if not os.path.exists(destination):
        os.rename(source, destination)
    elif _exchange(source, destination):
        shutil.rmtree(source)  # the old version, now at the staging name
    else:
        replaced = f"{destination}.replaced-{uuid.uuid4().hex[:8]}"
        os.rename(destination, replaced)
        os.rename(source, destination)
        _fsync_dir(parent)
        shutil.rmtree(replaced)
    _fsync_dir(parent)
    for stale in _siblings(destination, ".incoming-") + _siblings(destination, ".replaced-"):
        shutil.rmtree(stale, ignore_errors=True)  # left by writers that crashed before their commit


def replace_dir(source: str, target: str) -> None:
    """Put a fully written directory in place of `target` (the old one goes only once the new is in)."""
    commit_dir(source, target)


@contextlib.contextmanager
def new_version(target: str, what: str):
    """Build a new version of the folder `target`: yields the staging folder to write into; on a normal
    exit the version is committed, on an error it is removed (a full device becomes NoSpace naming
    `target` and the space the new version needed at least), and the previous version stays current."""
    staging = staging_dir(target)
    try:
        yield staging
        commit_dir(staging, target)
    except BaseException as exc:
        written = tree_size(staging)
        with contextlib.suppress(Exception):
            remove(staging)
        if is_no_space(exc) and not isinstance(exc, NoSpace):
            raise no_space(target, what, written, tree_size(current(target))) from exc
        raise


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local directory to `uri` as a new version of that folder (the previous one, if any, stays
    whole until the copy is complete)."""
    with new_version(uri, f"the copy of {local_dir}") as staging:
        fs, path = filesystem(staging)
        if is_remote(staging):
            pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        else:
            shutil.copytree(local_dir, path)


def local_dir(uri: str) -> str:
    """A local folder with the content of the (current version of the) folder at `uri`: `uri` itself
    when local, else a fresh copy."""
    uri = os.fspath(uri)
    if "://" not in uri:
        return current(uri)
    import tempfile

    uri = current(uri)
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
    """Rename a file or folder. Object stores have no rename: the objects are copied, then the source is
    deleted, so a crash in between leaves the source whole (and a partial copy at `target`)."""
    fs, source_path = filesystem(source)
    _, target_path = filesystem(target)
    if not is_remote(source):
        fs.move(source_path, target_path)
        return
    if fs.get_file_info(source_path).type == pafs.FileType.Directory:
        pafs.copy_files(source_path, target_path, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(source_path)
    else:
        fs.copy_file(source_path, target_path)
        fs.delete_file(source_path)
