"""API keys: where they come from, how a request's key is checked, and the id it is counted under.

Keys come from an environment variable (comma-separated) and/or a secret file (one per line). A key
is never logged or reported: metrics and /v1/stats name it by `key_id`, a short hash.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path


def load_keys(env_name: str | None, file: str | None) -> list[str]:
    keys = []
    if env_name and os.environ.get(env_name):
        keys += [k.strip() for k in os.environ[env_name].split(",") if k.strip()]
    if file:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"serve.access.api_keys_file: no file at {path}")
        keys += [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return keys


def key_id(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:10]


def check(authorization: str | None, keys: list[str]) -> str | None:
    """The key id of a valid `Authorization: Bearer <key>` header; None when the API is open.
    Raises PermissionError (with the reason) for a missing or wrong key."""
    if not keys:
        return None
    if not authorization or not authorization.lower().startswith("bearer "):
        raise PermissionError("missing API key: send `Authorization: Bearer <key>`")
    given = authorization[7:].strip()
    for key in keys:
        if hmac.compare_digest(given.encode(), key.encode()):  # constant time: no timing oracle on keys
            return key_id(key)
    raise PermissionError("invalid API key")
