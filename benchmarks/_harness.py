"""Shared by the benchmarks: run one measured side in a fresh subprocess and track its peak memory.

The peak is the largest total RSS of the subprocess and all its descendants (for Ray: the driver,
raylet, GCS and workers), sampled every `interval` seconds. The subprocess prints its result as JSON
on its last line of stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import psutil


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(script: str, child_args: list[str], interval: float = 0.2, extra_args: tuple[str, ...] = ()) -> dict:
    """Run `python script EXTRA_ARGS... --child ARGS...`; its JSON result plus `peak_gib`."""
    child = subprocess.Popen(
        [sys.executable, script, *extra_args, "--child", *child_args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"},
    )
    peak, done = 0, threading.Event()
    watcher = psutil.Process(child.pid)

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(watcher))
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output, _ = child.communicate()
    done.set()
    thread.join()
    if child.returncode != 0:
        raise RuntimeError(f"{script} --child {' '.join(child_args)} failed (exit {child.returncode})")
    return json.loads(output.strip().splitlines()[-1]) | {"peak_gib": peak / 2**30}


def start_ray(num_cpus: int | None = None, log_to_driver: bool = False) -> None:
    """A benchmark's own local Ray: every core of the machine (unless `num_cpus` says otherwise), no dashboard,
    errors only, and the workers' output kept off the table the benchmark prints unless `log_to_driver`."""
    from raytune_app.cluster import start_local

    start_local(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=log_to_driver,
    )
