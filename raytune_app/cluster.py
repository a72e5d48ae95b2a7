"""Joining Ray: the one place the CLI and the Ray job entrypoints (jobs/*.py) connect to a cluster.

    raytune-app train --recipe R             # CLI: joins $RAY_ADDRESS / a `ray start` cluster, else starts a local Ray
    ray job submit ... -- python jobs/train.py --recipe R    # job: joins the job's cluster, never starts one

Inside `ray job submit` the job supervisor sets RAY_ADDRESS (the cluster's GCS address) and
RAY_JOB_CONFIG_JSON_ENV_VAR for the driver, so a bare `ray.init()` joins that cluster. An entrypoint
started by hand (`python jobs/train.py` on a head node) joins the running cluster with
`address="auto"` and fails with a clear message when there is none: a job entrypoint never starts a
second, local Ray. `run_job` then runs the same `raytune-app` command the CLI runs (same parser, same
validation before any Ray work, same exit codes), so there is no second implementation of a stage.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

# Set by run_job: this process is a job entrypoint, which must join an existing cluster.
_JOIN_ONLY = False


class NoCluster(RuntimeError):
    """A job entrypoint found no running Ray cluster to join."""


def in_ray_job() -> bool:
    """True inside a driver started by the Ray job supervisor (`ray job submit`, RayJob, JobSubmissionClient)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def connect(output_dir: Optional[str] = None) -> None:
    """Join the cluster this process belongs to (see the module docstring); a no-op when Ray is up.
    `output_dir`: the recipe's run.output_dir, checked against the cluster's node count."""
    import ray

    if ray.is_initialized():
        return
    if in_ray_job() or os.environ.get("RAY_ADDRESS"):
        # No address and no num_cpus: Ray reads RAY_ADDRESS, which the job supervisor (or the user) set.
        ray.init(logging_level="WARNING", log_to_driver=True)
    elif _JOIN_ONLY:
        try:
            ray.init(address="auto", logging_level="WARNING", log_to_driver=True)
        except ConnectionError as exc:
            raise NoCluster(f"no running Ray cluster to join ({str(exc).splitlines()[0]}). Job entrypoints run on a "
                            "cluster: `ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/<x>.py "
                            "...`; for a local run use `raytune-app <stage>`") from None
    else:
        ray.init(logging_level="WARNING", log_to_driver=True)
    if output_dir is not None and "://" not in output_dir:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if len(nodes) > 1:
            # Ray Train checkpoints, prepared data and adapters are read back by other nodes.
            print(f"[raytune-app] note: run.output_dir {output_dir} is a local path and the cluster has {len(nodes)} "
                  "nodes; it must be a shared mount (NFS) on every node, or use s3:// / gs:// so any node can read "
                  "earlier stages and resume from checkpoints", flush=True)


def run_job(command: str, argv: Optional[list[str]] = None) -> int:
    """What each jobs/<stage>.py runs: `raytune-app <command> ARGV` joined to the existing cluster.

    The arguments are the CLI's (`--recipe FILE`, `key.sub=value` overrides, stage flags); the exit code
    is the CLI's (2: invalid recipe, reported before any Ray work; 4: bad data), so `ray job status`
    shows FAILED with the reason in `ray job logs`.
    """
    global _JOIN_ONLY
    from raytune_app import cli

    _JOIN_ONLY = True
    argv = list(sys.argv[1:] if argv is None else argv)
    where = "inside Ray job " + os.environ.get("RAY_JOB_ID", "") if in_ray_job() else "joining the running cluster"
    print(f"[raytune-app] job entrypoint: raytune-app {command} {' '.join(argv)} ({where.strip()})", flush=True)
    try:
        return cli.main([command, *argv])
    except NoCluster as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
