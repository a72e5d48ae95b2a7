"""API keys: where they come from, how a request's key is checked, and the id it is counted under.

Keys come from an environment variable (comma-separated) and/or a secret file (one per line; a file with no
key is an error). With no key at all the API is open, which is refused on a non-loopback host unless
serve.access.allow_open says so (`require_keys`). A key is never logged or reported: metrics and
/v1/stats name it by `key_id`, a short hash.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path


class OpenAccessError(ValueError):
    """The app would serve anyone on a network-reachable address without asking for a key."""


def load_keys(env_name: str | None, file: str | None) -> list[str]:
    """Accepted keys from the environment variable and the file. A file that exists but holds no key (empty,
    or only comments) is an error: it is a secret that failed to mount, not a wish for an open API."""
    keys = []
    if env_name and os.environ.get(env_name):
        keys += [k.strip() for k in os.environ[env_name].split(",") if k.strip()]
    if file:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"serve.access.api_keys_file: no file at {path}")
        found = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        found = [k for k in found if not k.startswith("#")]
        if not found:
            raise ValueError(
                f"serve.access.api_keys_file: {path} holds no API key (empty, or only comments); put one key per "
                "line, or remove the setting"
            )
        keys += found
    return keys


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def require_keys(keys: list[str], host: str, allow_open: bool) -> None:
    """Refuse an open API on a non-loopback address unless serve.access.allow_open says it is meant."""
    if keys or allow_open or is_loopback(host):
        return
    raise OpenAccessError(
        f"serve.host is {host}, reachable from other machines, and no API key is configured (serve.access: "
        "api_keys_env / api_keys_file). Set a key (e.g. RAYTUNE_API_KEYS, visible to the Serve replicas too), "
        "serve on 127.0.0.1, or set serve.access.allow_open: true to serve without keys on purpose."
    )


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
