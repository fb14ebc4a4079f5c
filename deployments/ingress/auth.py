"""API keys for the HTTP API: ``Authorization: Bearer <key>`` checked in constant time.

The keys live in an environment variable of the router's process (named by ``router.api_keys_env``,
several keys separated by commas so one can be rotated out while the next is already accepted); the
config only names the variable, so no secret is written into a config file. The Python handle API is
inside the Ray cluster and needs no key (the cluster itself is closed by Ray's token authentication).
"""

from __future__ import annotations

import hashlib
import hmac
import os

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class ApiKeys:
    def __init__(self, keys: list[str]):
        if not keys:
            raise ValueError("no API keys given")
        # Digests compare in constant time whatever the keys' lengths.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @classmethod
    def from_env(cls, name: str) -> ApiKeys:
        keys = [k.strip() for k in os.environ.get(name, "").split(",") if k.strip()]
        if not keys:
            raise RuntimeError(
                f"router.api_keys_env names the environment variable {name!r}, but it is unset or empty in "
                "the router's process: set it on every node (comma-separated keys) or remove api_keys_env"
            )
        return cls(keys)

    def accepts(self, authorization: str | None) -> bool:
        """True for ``Bearer <one of the keys>``; every key is compared, so timing says nothing."""
        scheme, _, token = (authorization or "").partition(" ")
        presented = hashlib.sha256(token.strip().encode()).digest()
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(digest, presented)
        return matched and scheme.lower() == "bearer"


def exposure_problem(host: str | None, authenticated: bool, allow_unauthenticated: bool) -> str | None:
    """Why an app may not start: it listens beyond loopback, takes no API keys, and was not told it may."""
    if authenticated or allow_unauthenticated or host is None or host in LOOPBACK_HOSTS:
        return None
    return (
        f"the HTTP proxy listens on {host!r}, beyond loopback, and the models config sets no "
        "router.api_keys_env: anyone who reaches it could use the service. Set router.api_keys_env (the name "
        "of an environment variable holding the keys), or router.allow_unauthenticated: true if meant."
    )
