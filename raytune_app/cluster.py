"""Joining Ray: the one place the CLI and the Ray job entrypoints (jobs/*.py) connect to a cluster.

    raytune-app train --recipe R             # CLI: joins $RAY_ADDRESS / a `ray start` cluster, else starts a local Ray
    ray job submit ... -- python jobs/train.py --recipe R    # job: joins the job's cluster, never starts one

Inside `ray job submit` the job supervisor sets RAY_ADDRESS (the cluster's GCS address) and
RAY_JOB_CONFIG_JSON_ENV_VAR for the driver, so a bare `ray.init()` joins that cluster. An entrypoint
started by hand (`python jobs/train.py` on a head node) joins the running cluster with
`address="auto"` and fails with a clear message when there is none: a job entrypoint never starts a
second, local Ray. `cli.run_job` then runs the same `raytune-app` command the CLI runs (same parser, same
validation before any Ray work, same exit codes), so there is no second implementation of a stage.

On a joined cluster whose GPU worker group autoscales from zero, a recipe that says its workers take
GPUs (`train.use_gpu: true`) first asks the autoscaler for them (`request_resources`) and waits until
they are up, since the stages size themselves by the GPUs the cluster has when they start.
"""

from __future__ import annotations

import os

from raytune_app import console
from raytune_app.errors import ClusterError

# Set by join_only (cli.run_job): this process is a job entrypoint, which must join an existing cluster.
_JOIN_ONLY = False


class NoCluster(ClusterError):
    """A job entrypoint found no running Ray cluster to join."""


def in_ray_job() -> bool:
    """True inside a driver started by the Ray job supervisor (`ray job submit`, RayJob, JobSubmissionClient)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def start_local(**options) -> None:
    """`ray.init` of a new local Ray whose own processes know its address.

    A Ray process that needs its cluster's address and was given none looks for one: RAY_ADDRESS, else the
    newest `ray start` cluster, else the only GCS process running. With two Rays on one machine (two runs
    at once, a run beside the test suite, a `ray start` cluster left up) that finds the other one or fails,
    and Ray Train's placement-group cleaner, which asks the State API whether its controller still lives,
    can read "no such actor" from the other cluster and remove a live run's placement group, killing its
    training workers (seen here: a quickstart started beside a DSS experiment restarted the experiment's
    training). So the GCS port is chosen here and RAY_ADDRESS is set while Ray starts: its GCS and raylet
    keep that environment and every worker they start inherits it. This process's own environment is
    restored afterwards (a command it runs later still starts or joins a Ray of its own choosing)."""
    import socket

    import ray

    with socket.socket() as probe:  # a free port, handed to the GCS at once (the same race `ray start` has)
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    pinned = {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}"}
    saved = {key: os.environ.get(key) for key in pinned}
    os.environ.update(pinned)
    try:
        ray.init(address="local", **options)  # "local" starts a Ray; RAY_ADDRESS is for its processes only
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _ray_start_cluster() -> str | None:
    """The address of a `ray start` cluster on this machine (the one a bare `ray.init()` joins), if any."""
    try:
        from ray._private.services import find_bootstrap_address

        return find_bootstrap_address(None)
    except Exception:  # a Ray without this (private) helper: say none, and start a local Ray
        return None


def connect(recipe=None, command: str | None = None) -> None:
    """Join the cluster this process belongs to (see the module docstring); a no-op when Ray is up.

    With a recipe, on a cluster that was joined (not started here): warn when run.output_dir is node-local
    on a multi-node cluster, and scale the GPU worker group up to what `command` needs first (an autoscaling
    group may be at zero nodes, and the stages size themselves by the GPUs they see)."""
    import ray

    if ray.is_initialized():
        return
    # Ray's own console output (its logs, what its workers print) goes to the run's log file; our lines
    # from the workers to the console (raytune_app/console.py).
    console.quiet_libraries(ray_data=False)
    options = {"log_to_driver": True, **console.ray_init_logging()}
    joined = True
    if in_ray_job() or os.environ.get("RAY_ADDRESS", "local") != "local":  # RAY_ADDRESS=local: a new local Ray
        # No address and no num_cpus: Ray reads RAY_ADDRESS, which the job supervisor (or the user) set.
        ray.init(**options)
    elif _JOIN_ONLY:
        try:
            ray.init(address="auto", **options)
        except ConnectionError as exc:
            raise NoCluster(
                f"no running Ray cluster to join ({str(exc).splitlines()[0]}). Job entrypoints run on a "
                "cluster: `ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/<x>.py "
                "...`; for a local run use `raytune-app <stage>`"
            ) from None
    else:
        # The CLI on a laptop: a running `ray start` cluster if there is one, else a new local Ray (no
        # autoscaler to ask for GPUs; the stages' own checks report what is missing).
        # A busy machine can make a new local Ray miss its fixed start-up windows (its agents 15 s, the node
        # 30 s; ray-project/ray#65983): one more try.
        joining = _ray_start_cluster()
        for attempt in range(2):
            try:
                if joining:
                    ray.init(**options)
                else:
                    start_local(**options)
                break
            except (ConnectionError, TimeoutError, RuntimeError, OSError) as exc:
                raise NoCluster(
                    f"could not start a local Ray ({type(exc).__name__}: {str(exc).splitlines()[0]}); this is about "
                    "the machine, not the recipe: check free memory and /tmp space, or start one with `ray start "
                    "--head`"
                ) from exc
            except Exception as exc:  # Ray raises a bare Exception when its node does not come up in time
                if "timed out during startup" not in str(exc):
                    raise
                ray.shutdown()
                if attempt == 1:
                    raise NoCluster(
                        f"a local Ray did not come up in time, twice ({str(exc).splitlines()[0]}): the machine is busy "
                        "or short of memory; try again, or start one with `ray start --head` and run again"
                    ) from exc
                console.logger().warning("the local Ray did not come up in time (a busy machine?); trying again")
        joined = False
    console.route_ray_output()
    console.quiet_libraries()
    if recipe is None or not joined:
        return
    output_dir = recipe.run.output_dir
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if "://" not in output_dir and len(nodes) > 1:
        # Ray Train checkpoints, prepared data and adapters are read back by other nodes.
        console.logger().info(
            f"note: run.output_dir {output_dir} is a local path and the cluster has {len(nodes)} "
            "nodes; it must be a shared mount (NFS) on every node, or use s3:// / gs:// so any node can read "
            "earlier stages and resume from checkpoints"
        )
    wanted = gpus_wanted(recipe, command)
    if wanted:
        wait_for_gpus(wanted)


def gpus_wanted(recipe, command: str | None = None) -> int:
    """GPUs a stage (or, for `run`, the largest of run.stages) reserves at once, when the recipe says it takes
    GPUs (train.use_gpu: true; a vllm teacher). `auto` follows what the cluster has, so it asks for none."""
    stages = recipe.run.stages if command in (None, "run") else [command]
    trains = [recipe.chain_step(i).train for i in range(len(recipe.chain))] if recipe.chain else [recipe.train]
    on_gpu = [t for t in trains if t.use_gpu is True]
    wanted = 0
    if on_gpu and ("train" in stages or "tune" in stages):
        wanted = max(t.workers for t in on_gpu)
    if on_gpu and "evaluate" in stages and isinstance(recipe.evaluate.replicas, int):
        wanted = max(wanted, recipe.evaluate.replicas)
    if "distill" in stages and recipe.distill.teacher.backend == "vllm":
        wanted = max(wanted, recipe.distill.teacher.replicas)
    return wanted


# GPUs per training node in cluster/ (8 x A100 / H100): a request is split into bundles of this size so the
# autoscaler starts whole training nodes (ZeRO-2 all-reduce stays inside a node) rather than serving nodes.
GPUS_PER_TRAINING_NODE = 8


def wait_for_gpus(wanted: int, timeout_s: float | None = None) -> None:
    """Ask the autoscaler for `wanted` GPUs and wait until the cluster has them (RAYTUNE_GPU_WAIT_S, default
    1800 s); the request is withdrawn afterwards, so idle nodes still scale down after the job."""
    import time

    import ray
    from ray.autoscaler.sdk import request_resources

    have = int(ray.cluster_resources().get("GPU", 0))
    if have >= wanted:
        return
    timeout_s = float(os.environ.get("RAYTUNE_GPU_WAIT_S", 1800)) if timeout_s is None else timeout_s
    bundles, left = [], wanted
    while left > 0:
        bundles.append({"GPU": min(left, GPUS_PER_TRAINING_NODE)})
        left -= bundles[-1]["GPU"]
    console.logger().info(
        f"the cluster has {have} GPU(s), this stage needs {wanted}: asking the autoscaler for "
        f"{bundles} and waiting up to {timeout_s:.0f} s"
    )
    request_resources(bundles=bundles)
    began = last = time.time()
    try:
        while True:
            have = int(ray.cluster_resources().get("GPU", 0))
            if have >= wanted:
                console.logger().info(f"{have} GPU(s) up after {time.time() - began:.0f} s")
                return
            if time.time() - began > timeout_s:
                raise NoCluster(
                    f"the cluster still has {have} GPU(s) after {timeout_s:.0f} s, this stage needs {wanted}: "
                    "check the GPU worker group's max_workers / quota (`ray status`), or set "
                    "RAYTUNE_GPU_WAIT_S to wait longer"
                )
            if time.time() - last >= 30:
                console.logger().info(f"waiting for GPUs: {have}/{wanted} after {time.time() - began:.0f} s")
                last = time.time()
            time.sleep(min(5.0, max(0.1, timeout_s - (time.time() - began))))
    finally:
        request_resources(bundles=[])


def join_only() -> None:
    """Make this process a job entrypoint: `connect` joins an existing cluster and never starts one
    (called by cli.run_job, which each jobs/<stage>.py runs)."""
    global _JOIN_ONLY
    _JOIN_ONLY = True
