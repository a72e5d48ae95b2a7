"""Node-local scratch for the Trainer's checkpoints, and handing exactly those checkpoints to Ray Train.

The Hugging Face trainer saves `checkpoint-<step>/` folders into its `output_dir`; Ray Train then copies
each one to durable storage (the run directory), where a resume finds it. The `output_dir` is scratch
on the worker's node, and it must belong to one run and one attempt only:

    <node temp dir>/raytune_app/scratch/<run key>/<attempt id>/
        checkpoint-<step>/     what the trainer saves (all ranks of the node write into the same folder:
                               DeepSpeed writes each rank's optimizer shard beside the others)
        restored/              a durable checkpoint copied back for a resume

- The run key is a hash of the run's output location, so two runs of the same recipe (other names, other
  output folders) never share a folder, and each Tune trial (its own output folder) has its own.
- The attempt id is drawn by world rank 0 and broadcast when the workers start, so a worker group that
  Ray Train restarts after a failure, or a `--resume` after a killed driver, starts from an empty folder:
  nothing a dead attempt left behind is read again (the resume itself reads only the durable checkpoint).
- Earlier attempts of the same run on this node are removed when an attempt starts (a SIGKILL leaves
  them behind), and an attempt removes its own folder when it ends, failed or not. On a cluster a restarted
  group may not come back to a node whose worker died (Ray Train places it where there is room): the train
  stage removes the run's scratch on every node once the run ends (`remove_on_every_node`).
- One worker per node (the lowest world rank there: `node_leader`) makes and removes the folder.

`ReportSavedCheckpoint` replaces Ray's RayTrainReportCallback, which reports the highest-numbered
checkpoint folder it finds in `output_dir` whatever wrote it: ours reports the folder of the step just
saved, and refuses one whose trainer state names another step.

Runs inside Ray Train workers (`raytune_app.train.worker`); `run_scratch` is plain Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid

from raytune_app import console

# Inside a Ray Train checkpoint, the Hugging Face checkpoint folder (the name Ray's own callback uses, so
# checkpoints written before this module existed resume too).
CHECKPOINT_NAME = "checkpoint"


class CheckpointMismatch(RuntimeError):
    """A checkpoint folder whose trainer state is not the step the trainer just saved."""


def run_scratch(out_dir: str) -> str:
    """This node's scratch folder for the run whose outputs go to `out_dir` (a local path or a URI)."""
    from raytune_app import storage

    key = hashlib.sha256(storage.absolute(out_dir).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "raytune_app", "scratch", key)


def _distributed():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def barrier() -> None:
    """Wait for every worker (no-op with one)."""
    dist = _distributed()
    if dist is not None:
        dist.barrier()


def all_gather(value) -> list:
    """`value` from every worker, by world rank (a one-item list with one worker)."""
    dist = _distributed()
    if dist is None:
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def node_leader(node_id: str) -> bool:
    """Whether this worker is the first (lowest world rank) of the workers on its Ray node: the one that
    makes and removes the node's scratch folder. Grouped by Ray node id rather than by Ray Train's local
    rank, which groups workers by IP address: nodes that share an address (several raylets on one machine,
    as a simulated cluster has) would otherwise have one local rank 0 between them, and the other nodes'
    scratch would be neither emptied at the start nor removed at the end."""
    nodes = all_gather(node_id)
    dist = _distributed()
    return nodes.index(node_id) == (dist.get_rank() if dist is not None else 0)


def start_attempt(out_dir: str, leader: bool, device=None) -> str:
    """A fresh, empty scratch folder for this attempt, the same on every worker of a node; earlier
    attempts of this run on the node are removed first (by the node's `leader`: node_leader)."""
    attempt = [uuid.uuid4().hex[:12]]
    dist = _distributed()
    if dist is not None:
        # Rank 0's id wins, so the workers of one node share a folder (see the module docstring).
        dist.broadcast_object_list(attempt, src=0, device=device)
    root = run_scratch(out_dir)
    folder = os.path.join(root, attempt[0])
    if leader:
        if os.path.isdir(root):
            for stale in os.listdir(root):
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        os.makedirs(folder)
    barrier()
    return folder


def end_attempt(folder: str, leader: bool) -> None:
    """Remove this attempt's scratch (and the run's folder once empty), on the node's leader. Every worker
    must have finished with it: call after a barrier on success; on failure the group is going down anyway."""
    if not leader:
        return
    shutil.rmtree(folder, ignore_errors=True)
    try:
        os.rmdir(os.path.dirname(folder))
    except OSError:
        pass  # another attempt of the run is starting on this node, or the folder is already gone


def saved_step(checkpoint_dir: str) -> int | None:
    """The step recorded in a Hugging Face checkpoint's trainer state (None where this node has none:
    only world rank 0 writes it)."""
    path = os.path.join(checkpoint_dir, "trainer_state.json")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)["global_step"]


def report_callback():
    """A TrainerCallback that reports each saved checkpoint, with the metrics logged so far, to Ray Train."""
    import ray.train
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class ReportSavedCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            # Every rank has finished writing its part of this step's folder before any rank copies it.
            barrier()
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if not os.path.isdir(folder):
                raise CheckpointMismatch(
                    f"the trainer reported a save at step {state.global_step} but {folder} is missing"
                )
            recorded = saved_step(folder)
            if state.is_world_process_zero and recorded is None:
                raise CheckpointMismatch(
                    f"{folder} has no trainer_state.json; the save at step {state.global_step} is incomplete"
                )
            if recorded is not None and recorded != state.global_step:
                raise CheckpointMismatch(
                    f"{folder} holds the trainer state of step {recorded}, not of step {state.global_step} just saved; "
                    "refusing to report it (another run's files in this scratch folder?)"
                )
            metrics: dict = {}
            for entry in state.log_history:
                metrics.update(entry)
            with tempfile.TemporaryDirectory(dir=args.output_dir) as staging:
                shutil.copytree(folder, os.path.join(staging, CHECKPOINT_NAME))
                ray.train.report(metrics=metrics, checkpoint=ray.train.Checkpoint.from_directory(staging))

    return ReportSavedCheckpoint()


def remove_on_every_node(out_dirs: list[str]) -> None:
    """Remove the scratch of these runs on every node of the cluster: for runs whose workers were killed
    rather than ended (Tune trials stopped by ASHA), which leave their attempt folders behind. Housekeeping:
    never raises."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def remove(paths: list[str]) -> None:
        for path in paths:
            shutil.rmtree(run_scratch(path), ignore_errors=True)

    try:
        nodes = [node["NodeID"] for node in ray.nodes() if node.get("Alive")]
        strategy = lambda node: NodeAffinitySchedulingStrategy(node, soft=False)  # noqa: E731
        ray.get([remove.options(scheduling_strategy=strategy(node)).remote(out_dirs) for node in nodes], timeout=120)
    except Exception as exc:  # a node that went away, a slow node: the next attempt of a run cleans up too
        console.logger("train").warning(f"could not remove scratch folders ({type(exc).__name__}: {exc})")
