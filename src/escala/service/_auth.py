"""API keys: made once, shown once, stored as a hash.

Keys are 256 random bits, so a plain SHA-256 is the right hash: slow password hashes
(scrypt, argon2) exist to protect guessable secrets, and they would cost every request
tens of milliseconds of CPU on the event loop for no gain.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

from ..store import ApiKey, Store

__all__ = ["Authenticator", "hash_key", "new_key"]

PREFIX = "esk_"


def new_key() -> str:
    """Return a fresh API key (``esk_`` and 43 URL-safe characters)."""
    return PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """Return the hex SHA-256 of a key: what the store keeps."""
    return hashlib.sha256(key.encode()).hexdigest()


class Authenticator:
    """Map a presented key to its record, from a cache of the store's keys.

    The cache is refreshed every ``refresh`` seconds, and at most once a second when an
    unknown key is presented, so a key added with ``escala keys add`` while the server
    runs works at once, a removed one stops working within ``refresh`` seconds, and a
    client guessing keys cannot make the server read the store on every request.
    """

    def __init__(
        self, store: Store, *, refresh: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._store = store
        self._refresh = refresh
        self._clock = clock
        self._by_hash: dict[str, ApiKey] = {}
        self._by_user: dict[str, ApiKey] = {}
        self._loaded_at = -float("inf")

    async def load(self) -> None:
        """Read every key record from the store."""
        records = await self._store.keys()
        self._by_hash = {k.key_hash: k for k in records}
        self._by_user = {k.user: k for k in records}
        self._loaded_at = self._clock()

    async def check(self, key: str) -> ApiKey | None:
        """Return the record of a valid key, or ``None``."""
        digest = hash_key(key)
        age = self._clock() - self._loaded_at
        if age > self._refresh or (digest not in self._by_hash and age > 1.0):
            await self.load()
        record = self._by_hash.get(digest)
        # the dict lookup already matched; compare again in constant time so that the
        # answer's timing says nothing about how much of a hash was right
        if record is not None and hmac.compare_digest(record.key_hash, digest):
            return record
        return None

    def record_of(self, user: str) -> ApiKey | None:
        """Return the cached record of a user (their weight and rate), if any."""
        return self._by_user.get(user)
