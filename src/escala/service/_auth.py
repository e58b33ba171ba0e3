"""API keys: made once, shown once, stored as a hash.

Keys are 256 random bits, so a plain SHA-256 is the right hash: slow password hashes
(scrypt, argon2) exist to protect guessable secrets, and they would cost every request
tens of milliseconds of CPU on the event loop for no gain.
"""

from __future__ import annotations

import asyncio
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

    Keys are added and removed in the store (``escala keys``), which every node reads:
    the cache is read again when it is over ``refresh`` seconds old at a request, so a
    key added or removed while servers run works, or stops working, within ``refresh``
    seconds on every node, and a client guessing keys cannot make a server read the
    store more than once a ``refresh``. One read at a time: the requests that find the
    cache stale together wait for the same read, so a flood of requests costs the store
    one read, not one each.
    """

    def __init__(
        self, store: Store, *, refresh: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._store = store
        self._refresh = refresh
        self._clock = clock
        self._by_hash: dict[str, ApiKey] = {}
        self._by_user: dict[str, ApiKey] = {}
        self._loaded_at = -float("inf")
        self._loading: asyncio.Future[None] | None = None

    async def load(self) -> None:
        """Read every key record from the store (joining a read already under way).

        Raises:
            StoreError: the store cannot be read; the cache stays as it was.
        """
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._read())
            # a read nobody waits for any more (its requests went away) must not log
            # "exception never retrieved"
            self._loading.add_done_callback(_retrieved)
        loading = self._loading
        # shielded: one caller going away must not cancel the read the others wait for
        await asyncio.shield(loading)

    async def _read(self) -> None:
        began = self._clock()  # the cache is as old as the read's start, not its end
        try:
            records = await self._store.keys()
            self._by_hash = {k.key_hash: k for k in records}
            self._by_user = {k.user: k for k in records}
            self._loaded_at = began
        finally:
            self._loading = None

    async def check(self, key: str) -> ApiKey | None:
        """Return the record of a valid key, or ``None``.

        Raises:
            StoreError: the cache was stale and the store cannot be read.
        """
        if self._clock() - self._loaded_at > self._refresh:
            await self.load()
        digest = hash_key(key)
        record = self._by_hash.get(digest)
        # the dict lookup already matched; compare again in constant time so that the
        # answer's timing says nothing about how much of a hash was right
        if record is not None and hmac.compare_digest(record.key_hash, digest):
            return record
        return None

    def record_of(self, user: str) -> ApiKey | None:
        """Return the cached record of a user (their weight and rate), if any."""
        return self._by_user.get(user)


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
