"""`train.profile_steps`: a few optimizer steps under torch.profiler, summed up where the run writes its metrics.

Why: a step's tokens/s says how fast, not where the time goes. The first GPU run of this project (BENCHMARKS.md,
"GPU path") stepped in about the same time at 2k tokens per step as at 8k, so the matrix work was not what
bounded the step; the profile answers what did. The summary (`profile.txt` in the train stage folder) opens with
the step's wall time beside the time the profiler saw on the device (GPU) or in operators (CPU): a device busy
for a small share of the wall means the step waits on the host (Python, launches, syncs, data), and the table of
operators by self time below says which.

Rank 0 profiles, from the first step after the first logging interval (compilation, allocator growth and the
first batches' warm-up stay out), for `profile_steps` steps; a run resumed past that step is not profiled.
"""

from __future__ import annotations

import time

import torch

from raytune_app import console, storage


def profile_callback(steps: int, start: int, target: str):
    """A TrainerCallback that profiles optimizer steps start+1 .. start+steps and writes the summary to `target`."""
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        def __init__(self):
            self.profiler: torch.profiler.profile | None = None
            self.began = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if self.profiler is None and state.global_step == start:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                    torch.cuda.synchronize()
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.start()
                self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is None or state.global_step < start + steps:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.began
            profiler, self.profiler = self.profiler, None
            profiler.stop()
            storage.write_text(target, summary(profiler, steps, wall))
            console.logger("train").info(f"profiled steps {start + 1}-{start + steps}: {target}")

    return Profile()


def summary(profiler, steps: int, wall: float) -> str:
    """The profile as text: wall time per step, busy time per step, the operators by self time."""
    events = profiler.key_averages()
    on_gpu = torch.cuda.is_available()
    operator_us = sum(e.self_cpu_time_total for e in events)
    per_step_ms = 1000 * wall / steps
    lines = [
        f"# torch.profiler: {steps} optimizer step(s), {per_step_ms:.1f} ms per step (wall)",
        f"# operators on the host: {operator_us / 1000 / steps:.1f} ms per step",
    ]
    if on_gpu:
        # The kernels' own events: an operator's device time is its kernels' again (summing both counted the
        # GPU's time twice, a "102% busy" step in the first profiled GPU run).
        kernel_us = sum(e.self_device_time_total for e in events if e.device_type != torch.autograd.DeviceType.CPU)
        busy = kernel_us / 1000 / steps
        lines.append(f"# kernels on the GPU: {busy:.1f} ms per step, {100 * busy / per_step_ms:.0f}% of the wall")
        # A GPU busy for a small share of the wall waits on the host: the second table says on what.
        lines += ["", "## by time on the GPU", events.table(sort_by="self_device_time_total", row_limit=30)]
        lines += ["", "## by time on the host", events.table(sort_by="self_cpu_time_total", row_limit=30)]
    else:
        lines += ["", events.table(sort_by="self_cpu_time_total", row_limit=40)]
    return "\n".join(lines) + "\n"
