"""Give back the resources of trials that Ray Tune stopped: their Ray Train workers' placement groups.

When ASHA stops a trial (or Ctrl-C interrupts the search), Tune ends the trial's actor; the Ray Train
controller that actor started dies with it, and so do the Train workers, but the placement group the
controller reserved for the workers stays until the driver exits: Ray ties a placement group to its
creator's *job*, not to the actor that created it. Ray Train's own PlacementGroupCleaner is meant to
remove it, but it asks the dashboard's state API whether the controller lives, which fails on a
cluster started without a dashboard and on a machine running several Ray clusters (seen here: the
next trials then wait forever for CPUs nobody uses). So the tune driver removes, after trials end,
every placement group whose creating actor is dead -- the rule Train's cleaner applies -- and ends
the cleaner actors of dead controllers on its node, which are detached and otherwise stay (~200 MB
each).

Reads the GCS tables directly: the creator of a placement group and the owner of an actor are not
in the public dict forms, and the state API needs the dashboard.
"""

from __future__ import annotations

import time

from raytune_app import console

_NIL_ACTOR = b"\xff"  # an ActorID of all 0xff bytes: the group was created by a driver, not an actor
_last_sweep = 0.0


def release_orphaned_placement_groups(min_interval_s: float = 0.0) -> int:
    """Remove placement groups whose creating actor has died, and the Train cleaner actors left by
    dead controllers; returns how many groups. Cheap to call often; never raises."""
    try:
        return _sweep(min_interval_s)
    except Exception as exc:  # housekeeping must never fail a search
        console.logger("tune").warning(f"could not sweep leftover placement groups ({type(exc).__name__}: {exc})")
        return 0


def _sweep(min_interval_s: float) -> int:
    global _last_sweep
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    now = time.monotonic()
    if now - _last_sweep < min_interval_s or not ray.is_initialized():
        return 0
    _last_sweep = now
    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        info = gcs_pb2.PlacementGroupTableData.FromString(raw)
        created_by_actor = bool(info.creator_actor_id) and set(info.creator_actor_id) != set(_NIL_ACTOR)
        if (
            info.state != gcs_pb2.PlacementGroupTableData.REMOVED
            and not info.is_detached
            and created_by_actor
            and info.creator_actor_dead
            and not info.creator_job_dead
        ):
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(info.placement_group_id)))
            removed += 1
    _end_orphaned_cleaners(state)
    return removed


def _end_orphaned_cleaners(state) -> None:
    """End the PlacementGroupCleaner actors whose Train controller (their creator) is dead. They are
    unnamed and detached, so no handle can be had: their process is stopped, on this node (Train
    places them on the head node, where the tune driver runs under `ray job submit` too)."""
    import os
    import signal

    import ray

    here = ray.get_runtime_context().get_node_id()
    actors = state.actor_table(None).values()
    where = lambda a, key: (a[key]["IPAddress"], a[key]["Port"])  # noqa: E731
    controllers: dict[tuple, set] = {}
    for actor in actors:
        if actor["ActorClassName"] == "TrainController":
            controllers.setdefault(where(actor, "Address"), set()).add(actor["State"])
    for actor in actors:
        if actor["ActorClassName"] != "PlacementGroupCleaner" or actor["State"] != "ALIVE":
            continue
        states = controllers.get(where(actor, "OwnerAddress"), set())
        # A worker port can be reused: only when every controller seen at that address is dead.
        if states == {"DEAD"} and actor["Address"]["NodeID"] == here and actor["Pid"]:
            try:
                os.kill(actor["Pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
