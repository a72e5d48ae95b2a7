"""The one rule for what a training run's Ray Train workers take, and whether a cluster can ever hold them.

Used by the train stage (train/run.py, against `ray.cluster_resources()` before any worker starts), by
each Ray Tune trial's plan (tune/run.py) and by `raytune-app validate --gpus N` (fit.py, against a
cluster's size before anything is submitted), so the three never disagree:

- workers take GPUs when `train.use_gpu` is true, or when it is `auto` and the cluster has GPUs;
- on GPUs: one GPU per worker, so `train.workers` GPUs;
- on CPUs: fp16 is refused (CPU kernels for it are missing or slow: use bf16 or fp32), and each worker
  takes `cpus_per_worker` CPUs (the tune stage's setting) or, for the train stage, an even share of the
  cluster's cores, at least 1 — and never more than one node holds: a worker's CPUs are all on its own
  node, so 2 workers on two 4-core nodes take 4 each, not the 8 that "8 cores / 2 workers" would say
  (a request no node can grant, which Ray would wait on for ever);
- `train.worker_resources` (custom resources) narrow the nodes a worker may use to those declaring them.

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


def worker_slots(nodes: list[dict[str, float]], cpus_per_worker: float, extra: dict[str, float]) -> int:
    """How many workers of `cpus_per_worker` CPUs and the custom resources `extra` the nodes hold at once
    (`nodes`: each node's resources, as `ray.nodes()` lists them). A worker never spans nodes."""
    total = 0
    for node in nodes:
        fits = [node.get("CPU", 0.0) / cpus_per_worker] if cpus_per_worker > 0 else []
        fits += [node.get(name, 0.0) / amount for name, amount in extra.items()]
        # A small epsilon: Ray stores fractional resources in 1/10000 units (0.3 / 0.1 is 2.9999...).
        total += int(min(fits) + 1e-9) if fits else 0
    return total


def even_share(nodes: list[dict[str, float]], workers: int, extra: dict[str, float]) -> int:
    """The most whole CPUs each of `workers` workers can take when each sits on one node (0: not even 1)."""
    most = int(max((node.get("CPU", 0.0) for node in nodes), default=0))
    for share in range(most, 0, -1):
        if worker_slots(nodes, share, extra) >= workers:
            return share
    return 0


def plan_workers(
    train: TrainSection,
    gpus: int,
    cpus: float | None,
    cpus_per_worker: float | None = None,
    nodes: list[dict[str, float]] | None = None,
) -> WorkerPlan:
    """The workers of one training run on a cluster of `gpus` GPUs and `cpus` CPUs (None: not checked).
    `nodes` (each node's resources, when known) keeps a CPU worker's share within what one node holds."""
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
    if not use_gpu and (train.liger or train.attention_needs_gpu):
        problems.append(
            "train.liger / flash and flex attention run on GPUs and the workers get none; set train.liger: false "
            "and train.attn_implementation: auto on CPUs"
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
        if nodes:
            # ... of the nodes it may use (those with the custom resources it asks for; all nodes when
            # none declares them yet: an autoscaler may add such nodes), a share one node can grant.
            usable = [n for n in nodes if all(n.get(k, 0.0) >= v for k, v in train.worker_resources.items())]
            extra = train.worker_resources if usable else {}
            share = max(1, min(share, even_share(usable or nodes, workers, extra)))
    return WorkerPlan(use_gpu=use_gpu, cpus_per_worker=share, problems=tuple(problems))
