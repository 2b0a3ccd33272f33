"""The configuration version: what lets the request path cache keys and prices exactly.

Triggers in the database bump one counter on every change to keys, plans and prices, whoever
makes it (the gateway, the admin API, the CLI in another process, plain SQL). A cache entry
tagged with the version it was read under is good while the version holds, so a revocation or a
limit change still applies from the next request, at the cost of reading one integer.

:meth:`ConfigVersion.current` reads it at most once per event-loop iteration. Every request is
authenticated in an iteration that starts after its bytes were read, so the version it sees was
read after it arrived: a change committed before a request arrives always applies to it. The
read costs most right after a commit by another connection (SQLite then rereads its pages): the
ledger's writer commits a batch every few tens of milliseconds, not one per request, so most
iterations read an unchanged database.

Only SQLite uses it: a read there is a few microseconds in-process, while on PostgreSQL the
version costs the same network round trip as the rows it would save.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

from gateway.db import Database

__all__ = ["CACHE_SIZE", "ConfigVersion", "VersionedCache"]

K = TypeVar("K")
V = TypeVar("V")

# Cache keys come from requests (key hashes, model names): past this many the cache starts over.
CACHE_SIZE = 10_000


class ConfigVersion:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._memo: int | None = None

    def current(self) -> int:
        """The version now (memoised until the event loop's next iteration)."""
        if self._memo is not None:
            return self._memo
        version = int(self._db.execute("SELECT n FROM config_version").fetchone()[0])
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return version  # no loop, no iterations to share it with
        self._memo = version
        loop.call_soon(self._forget)
        return version

    def _forget(self) -> None:
        self._memo = None


class VersionedCache(Generic[K, V]):
    """Entries good while the version they were read under holds; bounded by :data:`CACHE_SIZE`."""

    def __init__(self) -> None:
        self._entries: dict[K, tuple[int, V]] = {}

    def get(self, key: K, version: int) -> V | None:
        hit = self._entries.get(key)
        return hit[1] if hit is not None and hit[0] == version else None

    def put(self, key: K, version: int, value: V) -> None:
        if len(self._entries) >= CACHE_SIZE:
            self._entries.clear()
        self._entries[key] = (version, value)
