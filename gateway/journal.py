"""The ledger's journal: a request's pending record made durable without waiting for a commit.

A line is copied into a segment file mapped into memory (``mmap``, shared). Once copied, it is in
the kernel's page cache and survives the process being killed (SIGKILL, the OOM killer, a crash):
the durability of a SQLite commit in WAL mode with ``synchronous=NORMAL``, which the ledger uses,
and like it not proof against a power cut. So the proxy journals a request's pending row and
forwards it at once; the ledger's writer thread inserts the row behind it, and a gateway that
starts after a crash replays the lines whose rows never reached the database
(:meth:`gateway.ledger.Ledger.recover`).

A copy instead of a ``write()``: no system call on the event loop, and no handing the
interpreter lock to the writer thread mid-request (a ``write()`` releases it; measured at 12 µs
of CPU per request under load, against under a microsecond for the copy).

The journal is a series of segment files, ``<database>-ledger.<n>``, each allocated on disk in
full when it starts (:data:`SEGMENT_BYTES`; a full disk is an ``OSError`` then, never a fault
mid-copy). Unused space reads as zero bytes, which JSON lines never contain: a line is whole
only up to its newline and before the first zero byte. The writer commits rows in the order
they were journaled, so once it has committed a row of segment *n*, every row of the segments
before *n* is in the database and their files are deleted. A clean shutdown deletes them all.

One gateway process per SQLite file (as for the ledger's recovery): the journal is that
process's own.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

__all__ = ["SEGMENT_BYTES", "Journal"]

log = logging.getLogger("gateway.journal")

# About 7,000 pending rows: what a start after a crash replays at most beyond the uncommitted;
# allocated on disk whole as each segment starts.
SEGMENT_BYTES = 1 << 20


class Journal:
    """Append on the event loop's thread (:meth:`append`); release from the writer's."""

    def __init__(self, base: str) -> None:
        self._base = base
        self._map: mmap.mmap | None = None
        self._segment = 0
        self._size = 0  # bytes used in the current segment
        self._released = 0  # segments below this number are deleted
        # A row failed to commit: keep every file, for the next start to replay.
        self.keep = False

    def _path(self, segment: int) -> Path:
        return Path(f"{self._base}.{segment}")

    def segments(self) -> list[int]:
        """The segment numbers on disk, oldest first."""
        base = Path(self._base)
        prefix = base.name + "."
        try:
            names = os.listdir(base.parent)
        except FileNotFoundError:
            return []
        return sorted(
            int(name[len(prefix) :])
            for name in names
            if name.startswith(prefix) and name[len(prefix) :].isdigit()
        )

    def entries(self) -> Iterator[list[Any]]:
        """Every whole line on disk, oldest first. A torn line (the process killed mid-copy, a
        power cut) is skipped with a warning: its request was never forwarded, or was and is
        lost with the page cache, as a commit would be."""
        for segment in self.segments():
            written = self._path(segment).read_bytes().split(b"\0", 1)[0]
            lines = written.split(b"\n")
            for number, line in enumerate(lines, 1):
                if number == len(lines) and not line:
                    break  # after the last newline: nothing
                try:
                    if number == len(lines):
                        raise ValueError("no newline")  # cut short mid-copy
                    entry = json.loads(line)
                    if not isinstance(entry, list):
                        raise ValueError("not a list")
                except ValueError:
                    log.warning("skipping a torn journal line (%s, line %d)", self._path(segment), number)
                    continue
                yield entry

    def open(self) -> None:
        """Start a new segment after any left on disk (replay and delete those first)."""
        existing = self.segments()
        self._segment = self._released = existing[-1] + 1 if existing else 0
        self._map = self._allocate(self._segment, SEGMENT_BYTES)
        self._size = 0

    def _allocate(self, segment: int, size: int) -> mmap.mmap:
        fd = os.open(self._path(segment), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _reserve_blocks(fd, size)  # the blocks now: ENOSPC here, not SIGBUS on a copy
            return mmap.mmap(fd, size)
        except OSError:
            self._path(segment).unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)  # the mapping keeps the file open

    def append(self, entry: tuple[Any, ...]) -> int:
        """Write one entry; returns its segment. Raises OSError if the disk refused it."""
        assert self._map is not None, "Journal.open() was not called"
        line = orjson.dumps(entry) + b"\n"  # text fields are valid Unicode (validation checks)
        end = self._size + len(line)
        if end > len(self._map):
            # The next segment (big enough for an outsized line); on failure nothing changes.
            fresh = self._allocate(self._segment + 1, max(SEGMENT_BYTES, len(line)))
            self._map.close()
            self._map, self._segment, self._size, end = fresh, self._segment + 1, 0, len(line)
        self._map[self._size : end] = line
        self._size = end
        return self._segment

    def release_before(self, segment: int) -> None:
        """Every row journaled before ``segment`` is committed: delete those files."""
        if self.keep:
            return
        while self._released < segment:
            self._path(self._released).unlink(missing_ok=True)
            self._released += 1

    def remove_all(self) -> None:
        """Delete every segment on disk (all of them replayed, or committed)."""
        for segment in self.segments():
            self._path(segment).unlink(missing_ok=True)

    def close(self, *, committed: bool) -> None:
        """Stop appending; with ``committed`` (every row is in the database) delete the files."""
        if self._map is not None:
            self._map.close()
            self._map = None
        if committed and not self.keep:
            self.remove_all()


def _reserve_blocks(fd: int, size: int) -> None:
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
    else:  # macOS: zeros written are blocks taken
        os.pwrite(fd, bytes(size), 0)
