"""Shared by the benchmarks: run one measured side in a fresh subprocess and track its peak memory; measure
variants in alternating order and print their medians against the baseline.

The peak is the largest total RSS of the subprocess and all its descendants (for Ray: the driver,
raylet, GCS and workers), sampled every `interval` seconds. The subprocess prints its result as JSON
on its last line of stdout.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

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


class CpuByProcess:
    """Where a machine's CPU went while the `with` block ran: CPU seconds per process kind, every process on
    the machine (Ray names its actors' processes, e.g. `ray::ServeReplica:app:router`, vLLM its
    `VLLM::EngineCore`), this process shown as "this process". `.table()` lists them with their share of
    all cores over the block's wall time, the busiest first."""

    def __enter__(self) -> CpuByProcess:
        self.began, self.before = time.perf_counter(), self._snapshot()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, after = time.perf_counter() - self.began, self._snapshot()
        self.seconds: dict[str, float] = {}
        for key, (kind, used) in after.items():
            spent = used - self.before.get(key, (kind, 0.0))[1]  # a process started inside the block: all of it
            if spent > 0:
                self.seconds[kind] = self.seconds.get(kind, 0.0) + spent

    @staticmethod
    def _snapshot() -> dict[tuple[int, float], tuple[str, float]]:
        me, seen = os.getpid(), {}
        for process in psutil.process_iter(["pid", "create_time", "cmdline", "name", "cpu_times"]):
            info = process.info
            if info["cpu_times"] is None:
                continue
            command = info["cmdline"] or [info["name"] or "?"]
            kind = "this process" if info["pid"] == me else os.path.basename(command[0].split()[0])
            script = [arg for arg in command[1:] if not arg.startswith("-")][:1]
            if kind.startswith("python") and script:  # a plain Python process: name its script
                kind = f"python {os.path.basename(script[0])}"
            seen[info["pid"], info["create_time"]] = (kind, info["cpu_times"].user + info["cpu_times"].system)
        return seen

    def table(self, top: int = 12) -> str:
        cores = os.cpu_count() or 1
        lines = [f"CPU by process over {self.wall:.1f} s on {cores} cores (share of all cores):"]
        for kind, spent in sorted(self.seconds.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {kind:<48}{spent:>8.1f} s {spent / (self.wall * cores):>7.1%}")
        return "\n".join(lines)


def alternating(variants: tuple[str, ...], repeats: int, measure: Callable, show=lambda r: f"{r:.1f} s") -> dict:
    """{variant: [measure(variant) per repeat]}, the order reversed every other repeat so that other load on the
    machine hits every variant alike; each result printed (`show`) as it comes."""
    results: dict[str, list] = {v: [] for v in variants}
    for repeat in range(repeats):
        for variant in variants if repeat % 2 == 0 else variants[::-1]:
            results[variant].append(measure(variant))
            print(f"repeat {repeat + 1}: {variant}: {show(results[variant][-1])}", flush=True)
    return results


def median_table(title: str, seconds: dict[str, list[float]], column: str = "seconds") -> str:
    """Each variant's median, its ratio to the first variant's (the baseline) and every run."""
    base = statistics.median(next(iter(seconds.values())))
    lines = [title, f"{'variant':<24}{column:>9}{'ratio':>7}   runs"]
    for variant, runs in seconds.items():
        median = statistics.median(runs)
        lines.append(f"{variant:<24}{median:>9.1f}{median / base:>7.2f}   " + ", ".join(f"{t:.1f}" for t in runs))
    return "\n".join(lines)
