"""The one rule for what a training run's Ray Train workers take, and whether a cluster can ever hold them.

Used by the train stage (train/run.py, against `ray.cluster_resources()` before any worker starts), by
each Ray Tune trial's plan (tune/run.py) and by `raytune-app validate --gpus N` (fit.py, against a
cluster's size before anything is submitted), so the three never disagree:

- workers take GPUs when `train.use_gpu` is true, or when it is `auto` and the cluster has GPUs;
- on GPUs: one GPU per worker, so `train.workers` GPUs;
- on CPUs: fp16 is refused (CPU kernels for it are missing or slow: use bf16 or fp32), and each worker
  takes `cpus_per_worker` CPUs (the tune stage's setting) or, for the train stage, an even share of the
  cluster's cores, at least 1.

Pure Python; no Ray (the callers read the cluster's size).
"""

from __future__ import annotations

from dataclasses import dataclass

from raytune_app.train.settings import TrainSection


@dataclass(frozen=True)
class WorkerPlan:
    """Where a run's workers go on a cluster, and what can never fit (one line each; empty: it fits)."""

    use_gpu: bool
    cpus_per_worker: float
    problems: tuple[str, ...] = ()


def workers_on_gpu(train: TrainSection, gpus: int) -> bool:
    """Whether training workers take GPUs on a cluster with `gpus` GPUs (`auto` follows the cluster)."""
    return gpus > 0 if train.use_gpu == "auto" else bool(train.use_gpu)


def plan_workers(
    train: TrainSection, gpus: int, cpus: float | None, cpus_per_worker: float | None = None
) -> WorkerPlan:
    """The workers of one training run on a cluster of `gpus` GPUs and `cpus` CPUs (None: not checked)."""
    workers, problems = train.workers, []
    use_gpu = workers_on_gpu(train, gpus)
    if use_gpu and gpus == 0:
        problems.append("train.use_gpu is true but the cluster has no GPUs; set train.use_gpu: auto, or add GPU nodes")
    elif use_gpu and gpus < workers:
        problems.append(
            f"train.workers={workers} needs {workers} GPUs (one per worker), the cluster has {gpus}; lower "
            f"train.workers to {gpus} or add GPU nodes"
        )
    if not use_gpu and train.precision == "fp16":
        problems.append("train.precision fp16 needs a GPU and the workers get none; use bf16 or fp32 on CPUs")
    if not use_gpu and (train.liger or train.attn_implementation.startswith("flash")):
        problems.append(
            "train.liger / flash attention run on GPUs and the workers get none; set train.liger: false and "
            "train.attn_implementation: auto on CPUs"
        )
    if cpus_per_worker is not None:  # a fixed share per worker (tune trials), on GPU workers too
        need = workers * cpus_per_worker
        if cpus is not None and need > cpus:
            problems.append(
                f"train.workers={workers} x tune.cpus_per_worker={cpus_per_worker:g} needs {need:g} CPUs, the "
                f"cluster has {cpus:g}; lower train.workers or tune.cpus_per_worker"
            )
        share = cpus_per_worker
    elif use_gpu:
        share = 1
    else:
        if cpus is not None and cpus < workers:
            problems.append(
                f"train.workers={workers} needs {workers} CPUs, the cluster has {cpus:g} (each worker takes at "
                "least one); lower train.workers"
            )
        # On CPU each worker gets an even share of the cores (Ray sets its torch thread count from it).
        share = max(1, int(cpus // workers)) if cpus is not None else 1
    return WorkerPlan(use_gpu=use_gpu, cpus_per_worker=share, problems=tuple(problems))
