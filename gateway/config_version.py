"""The configuration version: what lets the request path cache keys and prices exactly.

Triggers in the database bump one counter on every change to keys, plans and prices, whoever
makes it (the gateway, the admin API, the CLI in another process, plain SQL). A cache entry
tagged with the version it was read under is good while the version holds, so a revocation or a
limit change still applies from the next request, at the cost of reading one integer.

On a file in WAL mode, :meth:`ConfigVersion.current` asks SQLite only when the database has
changed. Every commit, by any connection of any process, rewrites the WAL-index header (the
first 48 bytes of the ``-shm`` file, in SQLite's documented format: change counter, last frame,
checksums); the gateway maps that page read-only and compares the header with the one the
cached version was read under. Unchanged, the version holds: a 48-byte copy from memory, with
no system call and the interpreter lock kept. A read transaction instead takes file locks,
rereads pages after another connection's commit, and releases the interpreter lock to the
ledger's writer thread while SQLite runs (measured under load: 15 to 20 µs per request). The
header is copied before the version is read, so a commit landing in between costs one more read,
never a stale version. The ledger's writer commits every few tens of milliseconds, and reads the
version the same way right after each commit, on its own thread (:meth:`ConfigVersion.refresh`):
its commits, which change the header but never the version, cost the requests no read.

Without a ``-shm`` file (an in-memory database, another journal mode) the version is read at
most once per event-loop iteration. Every request is authenticated in an iteration that starts
after its bytes were read, so the version it sees was read after it arrived.

Either way a change committed before a request arrives always applies to it.

Only SQLite uses it: a read there is a few microseconds in-process, while on PostgreSQL the
version costs the same network round trip as the rows it would save.
"""

from __future__ import annotations

import asyncio
import mmap
import os
from typing import Any, Generic, TypeVar

from gateway.db import Database, SQLiteDatabase

__all__ = ["CACHE_SIZE", "ConfigVersion", "VersionedCache"]

K = TypeVar("K")
V = TypeVar("V")

# The first copy of the WAL-index header: https://www.sqlite.org/walformat.html#the_wal_index_header
# (a commit writes the second copy, then this one, so this one changing means the commit is done).
WAL_INDEX_HEADER = 48
_VERSION = "SELECT n FROM config_version"
# Cache keys come from requests (key hashes, model names): past this many the cache starts over.
CACHE_SIZE = 10_000


class ConfigVersion:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._memo: int | None = None
        self._index: mmap.mmap | None = None  # the WAL index, when the database is a file in WAL mode
        self._probed = False
        # The WAL-index header, and the version read after it was copied: one tuple, replaced
        # whole, as the ledger's writer thread publishes one too (refresh).
        self._seen: tuple[bytes, int] = (b"", 0)

    def current(self) -> int:
        """The version now: read afresh if the database may have changed since the last read."""
        index = self._index
        if index is not None:
            stamp = index[:WAL_INDEX_HEADER]
            seen, version = self._seen
            if stamp != seen:
                # Read after the header: a commit in between makes the next call read again.
                version = self._read()
                self._seen = (stamp, version)
            return version
        if self._memo is not None:
            return self._memo
        version = self._read()
        if not self._probed:
            self._probed = True
            self._index = _wal_index_of(self._db)  # after a read: this connection has it open
            if self._index is not None:
                return self.current()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return version  # no loop, no iterations to share it with
        self._memo = version
        loop.call_soon(self._forget)
        return version

    def refresh(self, conn: Any) -> None:
        """Read the version on ``conn`` (another thread's connection to the same file, such as
        the ledger writer's right after its commit), under the header copied before it, and keep
        the pair for :meth:`current`. As safe as a read by current() itself: the version is
        read after the header, so it is never older than the header says."""
        index = self._index
        if index is None or conn.in_transaction:
            return  # (inside a transaction the read would see its snapshot, perhaps older)
        stamp = index[:WAL_INDEX_HEADER]
        self._seen = (stamp, int(conn.execute(_VERSION).fetchone()[0]))

    def _read(self) -> int:
        return int(self._db.execute(_VERSION).fetchone()[0])

    def _forget(self) -> None:
        self._memo = None


# The WAL indexes mapped, by device and inode, with the descriptor each was mapped from. Never
# closed (nor is the duplicate the mapping keeps): closing any descriptor of a file drops every
# POSIX lock the process holds on it, and SQLite's connections hold theirs on this one.
_INDEXES: dict[tuple[int, int], tuple[int, mmap.mmap]] = {}


def _wal_index_of(db: Database) -> mmap.mmap | None:
    """The database's ``-shm`` file mapped read-only, if the database is a file in WAL mode and
    the connection has the file open (the first connection to open it may truncate it, so a
    mapping made before could fault); else None."""
    if not isinstance(db, SQLiteDatabase) or db.target == ":memory:":
        return None
    if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        return None
    path = db.target + "-shm"
    try:
        st = os.stat(path)
        known = _INDEXES.get((st.st_dev, st.st_ino))
        if known is not None:
            return known[1]
        if st.st_size < WAL_INDEX_HEADER:
            return None
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        index = mmap.mmap(fd, WAL_INDEX_HEADER, mmap.MAP_SHARED, mmap.PROT_READ)
    except (OSError, ValueError):
        return None
    _INDEXES[(st.st_dev, st.st_ino)] = (fd, index)
    return index


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
