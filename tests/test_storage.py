"""Crash-consistent run-directory I/O (raytune_app/storage.py), locally and on a real S3-compatible server.

Writers are killed for real (SIGKILL of a subprocess at seeded random moments) while they write files
and swap whole folders in; what a reader finds afterwards is always one complete version. A full
device is a real size-limited tmpfs (needs root to mount; skipped where mounting is not allowed).
"""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from raytune_app import integrity, storage

WRITER = textwrap.dedent(
    """
    import json, sys
    from raytune_app import storage
    target, mode = sys.argv[1], sys.argv[2]
    i = 0
    while True:
        i += 1
        if mode == "file":
            # Self-checking content: a header with i and its length, then a body of byte i % 256.
            body = bytes([i % 256]) * (1_500_000 + 1_000 * i)
            storage.write_bytes(target, json.dumps({"i": i, "n": len(body)}).encode().ljust(64) + body)
        else:
            with storage.new_version(target, "a test version") as staging:
                for name in ("a.bin", "b.bin"):
                    storage.write_bytes(storage.join(staging, name), bytes([i % 256]) * 400_000)
                storage.write_text(storage.join(staging, "manifest.json"), json.dumps({"i": i}))
        print(i, flush=True)
    """
)


def _killed_writer(target: str, mode: str, seed: int, env: dict | None = None) -> int:
    """Start a writer looping over versions of `target`, SIGKILL it at a seeded random moment after its
    first complete version; returns the last version it reported complete."""
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, target, mode],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        first = process.stdout.readline()
        assert first.strip() == "1", f"the writer did not start: {first!r}"
        time.sleep(random.Random(seed).uniform(0.05, 0.8))
        process.send_signal(signal.SIGKILL)
        rest = process.communicate(timeout=30)[0].split()
    finally:
        if process.poll() is None:
            process.kill()
    return int(rest[-1]) if rest else 1


def _check_file(path: str) -> int:
    data = storage.read_bytes(path)
    header = json.loads(data[:64])
    body = data[64:]
    assert len(body) == header["n"], f"cut short: {len(body)} of {header['n']} bytes"
    assert body == bytes([header["i"] % 256]) * header["n"], "a mix of two versions"
    return header["i"]


def _check_version(target: str) -> int:
    folder = storage.current(target)
    manifest = json.loads(storage.read_text(storage.join(folder, "manifest.json")))
    for name in ("a.bin", "b.bin"):
        assert storage.read_bytes(storage.join(folder, name)) == bytes([manifest["i"] % 256]) * 400_000, name
    return manifest["i"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_killed_writer_leaves_the_old_file_or_the_new_one_never_half(tmp_path, seed):
    target = str(tmp_path / "state.bin")
    reported = _killed_writer(target, "file", seed)
    found = _check_file(target)
    # The last version reported complete is there, or the one after it (killed between rename and print).
    assert found in (reported, reported + 1)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("state.bin") and n != "state.bin"]


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_a_killed_folder_swap_leaves_one_complete_version(tmp_path, seed):
    target = str(tmp_path / "stage")
    reported = _killed_writer(target, "dir", seed)
    assert _check_version(target) in (reported, reported + 1)
    # The next commit clears what the killed writer left half-built beside the target.
    with storage.new_version(target, "a test version") as staging:
        storage.write_text(storage.join(staging, "manifest.json"), json.dumps({"i": 0}))
        for name in ("a.bin", "b.bin"):
            storage.write_bytes(storage.join(staging, name), bytes([0]) * 400_000)
    assert _check_version(target) == 0
    assert sorted(os.listdir(tmp_path)) == ["stage"]


def test_a_failed_version_is_removed_and_the_old_one_stays(tmp_path):
    target = str(tmp_path / "out")
    with storage.new_version(target, "v1") as staging:
        storage.write_text(storage.join(staging, "manifest.json"), '{"v": 1}')
    with pytest.raises(RuntimeError), storage.new_version(target, "v2") as staging:
        storage.write_text(storage.join(staging, "half.txt"), "x")
        raise RuntimeError("killed halfway")
    assert storage.read_text(storage.join(target, "manifest.json")) == '{"v": 1}'
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_crash_between_the_fallback_renames_is_repaired_by_the_next_reader(tmp_path):
    """Where the kernel cannot exchange two folders, the swap is two renames; a crash between them
    leaves only `<target>.replaced-<id>`, which the next reader puts back."""
    target = tmp_path / "out"
    (tmp_path / "out.replaced-1234").mkdir()
    (tmp_path / "out.replaced-1234" / "manifest.json").write_text('{"v": 1}')
    assert storage.current(str(target)) == str(target)
    assert (target / "manifest.json").read_text() == '{"v": 1}'


def test_damaged_state_files_read_as_not_done(tmp_path, capfd):
    path = tmp_path / "run.json"
    path.write_text('{"fingerprint": "abc", "sta')  # cut short
    assert storage.read_json(str(path)) is None
    assert storage.unchanged(str(path), "abc") is None
    assert "run.json is damaged" in capfd.readouterr().err
    with pytest.raises(storage.Damaged, match="run.json"):
        storage.load_json(str(path))
    assert storage.read_json(str(tmp_path / "missing.json")) is None


def test_integrity_names_cut_short_weights(tmp_path):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file({"w": torch.ones(64, 64)}, str(folder / "adapter_model.safetensors"))
    torch.save({"step": 3, "m": torch.zeros(256)}, folder / "optimizer.pt")
    (folder / "adapter_config.json").write_text('{"r": 4}')
    assert integrity.weights_problem(str(folder)) is None
    for name in ("adapter_model.safetensors", "optimizer.pt", "adapter_config.json"):
        whole = (folder / name).read_bytes()
        (folder / name).write_bytes(whole[: len(whole) - 7])
        problem = integrity.weights_problem(str(folder))
        assert problem is not None and name in problem, problem
        with pytest.raises(storage.Damaged, match=name):
            integrity.check_weights(str(folder))
        (folder / name).write_bytes(whole)
    assert integrity.weights_problem(str(tmp_path / "nothing")) is not None


@pytest.fixture
def tiny_device(tmp_path):
    """A real 1 MiB tmpfs, mounted for the test (root only) and unmounted after."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_device_names_the_file_and_the_space_and_keeps_the_old_content(tiny_device):
    target = str(tiny_device / "run" / "manifest.json")
    storage.write_text(target, '{"old": true}')
    with pytest.raises(storage.NoSpace) as caught:
        storage.write_bytes(target, b"x" * 3 * 2**20)
    message = str(caught.value)
    assert target in message and "3.0 MiB" in message and "free now" in message, message
    assert storage.read_text(target) == '{"old": true}'
    assert not [n for n in os.listdir(tiny_device / "run") if n != "manifest.json"]  # no temporary left

    folder = str(tiny_device / "run" / "stage")
    with storage.new_version(folder, "v1") as staging:
        storage.write_text(storage.join(staging, "manifest.json"), '{"v": 1}')
    with pytest.raises(storage.NoSpace) as caught, storage.new_version(folder, "the test stage") as staging:
        fs, path = storage.filesystem(storage.join(staging, "big.bin"))
        fs.create_dir(os.path.dirname(path))
        with fs.open_output_stream(path) as out:  # pyarrow's own writer (what Ray Data's sinks use)
            for _ in range(3):
                out.write(b"y" * 2**20)
    assert folder in str(caught.value) and "the test stage needs more than" in str(caught.value)
    assert storage.read_text(storage.join(folder, "manifest.json")) == '{"v": 1}'
    assert sorted(os.listdir(tiny_device / "run")) == ["manifest.json", "stage"]


# --------------------------------------------------------------------------------- S3 (moto server)


@pytest.fixture
def s3(s3_server, monkeypatch):
    for key, value in s3_server["env"].items():
        monkeypatch.setenv(key, value)
    return s3_server


def test_s3_files_folders_pointer_layout_and_moves(s3):
    root = s3["bucket"]("layout")
    storage.write_json(f"{root}/runs/x/run.json", {"fingerprint": "f1"})
    assert storage.read_json(f"{root}/runs/x/run.json") == {"fingerprint": "f1"}

    target = f"{root}/runs/x/prepare"
    with storage.new_version(target, "v1") as staging:
        assert staging.startswith(f"{target}/v-")
        storage.write_text(storage.join(staging, "train", "part-0.txt"), "one")
        storage.write_text(storage.join(staging, "manifest.json"), '{"v": 1}')
    first = storage.current(target)
    with pytest.raises(RuntimeError), storage.new_version(target, "v2") as staging:
        storage.write_text(storage.join(staging, "manifest.json"), '{"v": 2}')
        raise RuntimeError("killed")
    assert storage.current(target) == first  # the failed version never became current
    with storage.new_version(target, "v3") as staging:
        storage.write_text(storage.join(staging, "manifest.json"), '{"v": 3}')
    assert storage.read_text(storage.join(storage.current(target), "manifest.json")) == '{"v": 3}'
    left = sorted(info.base_name for info in storage._children(target))
    assert left == sorted(["CURRENT", storage.current(target).rsplit("/", 1)[-1]])  # old versions deleted

    # upload_dir / local_dir go through the pointer: readers get the current version's files.
    local = storage.local_dir(target)
    assert open(os.path.join(local, "manifest.json")).read() == '{"v": 3}'
    storage.upload_dir(local, f"{root}/runs/x/copy")
    assert storage.exists(storage.join(storage.current(f"{root}/runs/x/copy"), "manifest.json"))

    # No folder rename on S3: move copies, then deletes the source.
    aside = storage.move_aside(f"{root}/runs/x/copy", "f1")
    assert not storage.exists(f"{root}/runs/x/copy")
    assert storage.exists(storage.join(storage.current(aside), "manifest.json"))

    path, fs = storage.ray_storage(f"{root}/runs/x")
    assert path == "layout/runs/x" and fs is not None


def test_a_recipe_in_a_bucket_loads_and_a_missing_one_is_named(s3):
    from raytune_app import config

    root = s3["bucket"]("recipes")
    storage.write_text(f"{root}/tune/best_recipe.yaml", "run: {name: from-bucket}\ndata: {sources: [x.jsonl]}\n")
    assert config.load(f"{root}/tune/best_recipe.yaml").run.name == "from-bucket"
    with pytest.raises(config.RecipeError, match=f"{root}/tune/missing.yaml"):
        config.load(f"{root}/tune/missing.yaml")


@pytest.mark.parametrize("seed", [7, 8])
def test_s3_a_killed_pointer_flip_leaves_one_complete_version(s3, seed):
    target = f"{s3['bucket'](f'flip{seed}')}/runs/x/stage"
    reported = _killed_writer(target, "dir", seed, env=s3["env"])
    assert _check_version(target) in (reported, reported + 1)


def test_a_full_device_inside_a_ray_worker_becomes_one_message_naming_the_run_directory(tmp_path):
    """Ray wraps a worker's OSError in its own error types (sometimes only as text): the CLI still reports
    a full device as NoSpace naming the run directory, not as a traceback."""
    from raytune_app import cli, config

    recipe = config.validate({"run": {"name": "x", "output_dir": str(tmp_path)}, "data": {"sources": ["a.jsonl"]}})
    with pytest.raises(storage.NoSpace) as caught, cli._stage_errors(recipe, "train"):
        raise RuntimeError("ray.exceptions.RayTaskError(OSError): [Errno 28] No space left on device: 'ckpt'")
    assert str(tmp_path / "x") in str(caught.value) and "the train stage needs" in str(caught.value)
    with pytest.raises(ValueError, match="other"), cli._stage_errors(recipe, "train"):
        raise ValueError("other")
