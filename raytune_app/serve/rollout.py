"""The challenger's rollout state, kept where a router restart finds it: the registry, then Ray's GCS.

    rollout = Rollout(registry={"tracking_uri", "name", "version"} or None, app="toy")
    event = rollout.restore()        # at router start: a rollback already decided for this challenger, or None
    rollout.remember(event)          # when the router rolls the challenger back
    moved = rollout.move_alias(reason)   # registry alias moved off the challenger; raises when unreachable

The registry alias is the source of truth: the plan (serve/app.py) fixed the challenger's version when the
app was built; a router (re)starting asks the registry whether `@challenger` still names that version and
whether the version carries `retired_from.challenger` (store.retire writes it). If not, the challenger was
rolled back, and the router sends it no traffic, whatever its spec says. A rollback whose alias move failed
(registry unreachable) is also recorded in Ray's GCS key-value store (it outlives a router replica, not
the cluster), so a router restarted before the move succeeds still knows, and retries the move.
Ray appears only in the key-value calls; everything else is plain Python.
"""

from __future__ import annotations

import json
import logging

logger = logging.getLogger("ray.serve")
NAMESPACE = "raytune"


def _kv():
    """Ray's GCS key-value store when this process is connected to Ray, else None (unit tests)."""
    try:
        from ray.experimental import internal_kv

        return internal_kv if internal_kv._internal_kv_initialized() else None
    except Exception:
        return None


class Rollout:
    def __init__(self, registry: dict | None, app: str, label: str | None = None):
        self.registry, self.label = registry, label
        version = registry["version"] if registry else label
        self.key = f"rollback/{app}/{registry['name'] if registry else '-'}/{version}".encode()

    def restore(self) -> dict | None:
        """The rollback event of this challenger if one was decided before (this router or an earlier one)."""
        kv = _kv()
        if kv is not None:
            try:
                raw = kv._internal_kv_get(self.key, namespace=NAMESPACE)
            except Exception as exc:
                logger.warning("could not read the rollout state from Ray's GCS: %s", exc)
                raw = None
            if raw:
                return json.loads(raw) | {"restored": True}
        if not self.registry:
            return None
        from raytune_app.registry import store

        reg = self.registry
        try:
            client = store.client(reg["tracking_uri"])
            current = client.get_registered_model(reg["name"]).aliases.get("challenger")
            retired = client.get_model_version(reg["name"], reg["version"]).tags.get("retired_from.challenger")
        except Exception as exc:  # an unreachable registry does not keep the app from starting
            logger.warning(
                "could not read %s's aliases at start (%s); serving the planned challenger", reg["name"], exc
            )
            return None
        if retired is None and str(current) == str(reg["version"]):
            return None
        why = retired or f"the registry's challenger alias names {current or 'nothing'}, not version {reg['version']}"
        return {
            "event": "rollback",
            "challenger": f"{reg['name']}/{reg['version']}",
            "reason": why,
            "registry": {"moved": True, "why": "found at start"},
            "restored": True,
        }

    def remember(self, event: dict) -> None:
        kv = _kv()
        if kv is None:
            return
        try:
            kv._internal_kv_put(self.key, json.dumps(event, default=str).encode(), overwrite=True, namespace=NAMESPACE)
        except Exception as exc:
            logger.warning("could not record the rollback in Ray's GCS: %s", exc)

    def move_alias(self, reason: str) -> dict:
        """Move the registry's challenger alias off this version (store.retire); raises when that fails."""
        from raytune_app.registry import store

        reg = self.registry
        if not reg:
            raise RuntimeError("no challenger registry to move the alias in")
        return store.retire(reg["tracking_uri"], reg["name"], "challenger", reg["version"], reason)
