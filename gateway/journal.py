"""The ledger's journal: a request's pending record made durable without waiting for a commit.

Appending a line to a file is one ``write()`` system call. Once it returns, the line is in the
kernel's page cache and survives the process being killed (SIGKILL, the OOM killer, a crash):
the durability of a SQLite commit in WAL mode with ``synchronous=NORMAL``, which the ledger uses,
and like it not proof against a power cut. So the proxy journals a request's pending row and
forwards it at once; the ledger's writer thread inserts the row behind it, and a gateway that
starts after a crash replays the lines whose rows never reached the database
(:meth:`gateway.ledger.Ledger.recover`).

The journal is a series of segment files, ``<database>-ledger.<n>``; a new one starts once the
current one passes :data:`SEGMENT_BYTES`. The writer commits rows in the order they were
journaled, so once it has committed a row of segment *n*, every row of the segments before *n*
is in the database and their files are deleted. A clean shutdown deletes them all.

One gateway process per SQLite file (as for the ledger's recovery): the journal is that
process's own.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

__all__ = ["SEGMENT_BYTES", "Journal"]

log = logging.getLogger("gateway.journal")

# About 7,000 pending rows: what a start after a crash replays at most beyond the uncommitted.
SEGMENT_BYTES = 1 << 20


class Journal:
    """Append on the event loop's thread (:meth:`append`); release from the writer's."""

    def __init__(self, base: str) -> None:
        self._base = base
        self._fd = -1
        self._segment = 0
        self._size = 0
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
        """Every whole line on disk, oldest first. A torn line (a power cut, a full disk
        mid-write) is skipped with a warning: its request was never forwarded, or was and is
        lost with the page cache, as a commit would be."""
        for segment in self.segments():
            with self._path(segment).open("rb") as lines:
                for number, line in enumerate(lines, 1):
                    try:
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
        self._start_segment()

    def _start_segment(self) -> None:
        self._fd = os.open(self._path(self._segment), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = 0

    def append(self, entry: tuple[Any, ...]) -> int:
        """Write one entry; returns its segment. Raises OSError if the disk refused it."""
        line = orjson.dumps(entry) + b"\n"  # text fields are valid Unicode (validation checks)
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]
        segment = self._segment
        self._size += len(line)
        if self._size >= SEGMENT_BYTES:
            os.close(self._fd)
            self._segment += 1
            self._start_segment()
        return segment

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
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if committed and not self.keep:
            self.remove_all()
