"""Does every node of the cluster see the run directory? A check run before a stage's work on a multi-node cluster.

Called by prepare, train, tune, evaluate and serve (after their cheap checks, before any worker, trial or
replica starts). The stages hand files to each other through the run directory across nodes: prepare's write
tasks put Parquet parts there from whichever node they ran on, Ray Train's rank 0 writes checkpoints and
weights that the driver (and, after a lost node, workers elsewhere) read back, replicas load adapters from
it. A node that sees another folder at that path (a volume not mounted there, a node-local disk, a bucket it
has no credentials for) makes a run fail late and far from its cause: a missing checkpoint after an hour of
training, a prepared split with parts missing. So, up front:

1. the driver writes a token file in `<run dir>/.node-check-<token>/`;
2. one task on every alive node (0 CPUs, pinned to the node) reads it back and writes a reply beside it;
3. the driver reads every reply.

A node that cannot read the token, reads another file, or whose reply the driver cannot see stops the run
with one `NotShared` error naming each such node (id, host, address), the path and what must be shared
(README "Multi-node: what every node must see"). A node whose task does not answer in `TIMEOUT_S` (a node
still starting its first worker on a busy machine) is reported as a warning, not an error: this is a check
of the filesystem, not of the node's health. One node: nothing to check. A run directory checked once for
the same set of nodes is not checked again in this process (`raytune-app run` goes through five stages).
Only the nodes alive at the start are checked: a node an autoscaler adds later is not (a job whose recipe
takes GPUs waits for its GPU nodes before the stage starts: raytune_app/cluster.py).
"""

from __future__ import annotations

import os
import uuid

from raytune_app import console, storage
from raytune_app.errors import ClusterError

# Seconds to wait for every node's answer; a 0-CPU task starts a worker process on each node (a few
# seconds on an idle node; tens of seconds on 2 busy cores).
TIMEOUT_S = float(os.environ.get("RAYTUNE_NODE_CHECK_S", 120))

README_SECTION = 'README.md, "Multi-node: what every node must see"'

_checked: set[tuple[str, frozenset[str]]] = set()  # (run dir, alive node ids) found shared in this process


class NotShared(ClusterError):
    """One or more nodes do not see the run directory the driver writes to."""


def _look(token_path: str, token: str, reply_path: str) -> tuple[str, str | None]:
    """On one node: (this node's id, None) when it reads `token` at `token_path` and can write `reply_path`;
    else (id, what went wrong)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    try:
        found = storage.read_text(token_path)
    except Exception as exc:  # any failure to read is the answer, not an error of the check
        return node, f"cannot read it ({type(exc).__name__}: {exc})"
    if found != token:
        return node, "finds another file at that path than the one the driver wrote (a different folder)"
    try:
        storage.write_text(reply_path, node)
    except Exception as exc:
        return node, f"reads it but cannot write beside it ({type(exc).__name__}: {exc})"
    return node, None


def _describe(node: dict) -> str:
    return f"node {node['NodeID']} (host {node.get('NodeManagerHostname', '?')}, {node.get('NodeManagerAddress', '?')})"


def check(run_dir: str, field: str = "run.output_dir") -> None:
    """Raise NotShared when a node of the cluster does not see `run_dir` as the driver does (module docstring).
    `field` names the recipe option the folder comes from, for the message."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
    if len(nodes) < 2:
        return
    folder = storage.absolute(run_dir)
    key = (folder, frozenset(nodes))
    if key in _checked:
        return
    log = console.logger()
    token = uuid.uuid4().hex
    probe_dir = storage.join(folder, f".node-check-{token}")
    token_path = storage.join(probe_dir, "token")
    storage.write_text(token_path, token)
    try:
        look = ray.remote(num_cpus=0, max_retries=0)(_look)
        pending = {
            look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(
                token_path, token, storage.join(probe_dir, node_id)
            ): node_id
            for node_id in nodes
        }
        done, late = ray.wait(list(pending), num_returns=len(pending), timeout=TIMEOUT_S)
        problems = []
        for ref in done:
            try:
                node_id, problem = ray.get(ref)
            except Exception as exc:  # the node went away while it was asked: not a filesystem problem
                log.warning(f"could not check {_describe(nodes[pending[ref]])}: {type(exc).__name__}")
                continue
            reply = storage.join(probe_dir, node_id)
            if problem is None and not (storage.exists(reply) and storage.read_text(reply) == node_id):
                problem = f"reads it, but the reply it wrote ({reply}) is not there for the driver"
            if problem is not None:
                problems.append(f"{_describe(nodes[node_id])} {problem}")
        for ref in late:
            ray.cancel(ref, force=True)
            log.warning(
                f"{_describe(nodes[pending[ref]])} did not answer the shared-folder check within {TIMEOUT_S:.0f} s "
                f"(RAYTUNE_NODE_CHECK_S); going on without it"
            )
    finally:
        try:
            storage.remove(probe_dir)
        except OSError:
            pass
    if problems:
        driver = _describe(nodes.get(ray.get_runtime_context().get_node_id(), {"NodeID": "?"}))
        raise NotShared(
            f"{field} ({folder}) is not shared by every node of the cluster. The driver (on {driver}) wrote "
            f"{token_path}, and\n  "
            + "\n  ".join(problems)
            + "\nEvery node must see the run directory at the same path: prepared data, checkpoints and weights "
            "written on one node are read on another. Mount one shared filesystem (NFS, a ReadWriteMany volume "
            f"such as /mnt/shared) at that path on every node, or set {field} to a bucket (s3://..., gs://...) "
            f"that every node can reach; see {README_SECTION}."
        )
    _checked.add(key)
