"""The durable usage ledger: one row per request that reaches the backend.

Life of a row: ``pending`` is written and committed *before* the request is forwarded, so a
request the backend may serve is on disk even if the gateway is killed a moment later; it is
``settled`` with the backend's usage afterwards; rows still pending when a gateway starts are
marked ``recovered`` (billed as estimates) by :meth:`Ledger.recover`.

All writes go through one writer thread that commits in batches (group commit): the event
loop never touches the disk for a write, and a burst of requests shares one commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.db import ROLLUP, open_db

__all__ = ["Ledger", "PendingRow", "Settlement"]

log = logging.getLogger("gateway.ledger")

MAX_BATCH = 1024
_STOP = object()


@dataclass(slots=True)
class PendingRow:
    id: str
    key_id: int
    model: str | None
    route: str
    stream: bool
    started_at: float
    # What the request may cost, kept so that a row the process never settled can be billed:
    # the prompt (counted, or estimated from the body) and the output cap.
    prompt_estimate: int | None = None
    output_estimate: int | None = None


@dataclass(slots=True)
class Settlement:
    id: str
    status: int
    upstream_ms: float | None = None
    first_byte_ms: float | None = None
    duration_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tool_tokens: int | None = None
    estimated: bool = False
    error: str | None = None
    counted_prompt_tokens: int | None = None
    cost_micros: int | None = None
    reserved_tokens: int | None = None


_INSERT = (
    "INSERT INTO requests (id, key_id, model, route, stream, state, started_at, prompt_tokens, "
    "reserved_tokens) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?)"
)
_SETTLE = (
    "UPDATE requests SET state = 'settled', status = ?, upstream_ms = ?, first_byte_ms = ?, "
    "duration_ms = ?, prompt_tokens = ?, completion_tokens = ?, tool_tokens = ?, estimated = ?, "
    "error = ?, counted_prompt_tokens = ?, cost_micros = ?, reserved_tokens = ? WHERE id = ?"
)


class Ledger:
    """Owns the writer thread. Use :meth:`start` / :meth:`close` (the app's lifespan does)."""

    def __init__(
        self,
        path: str,
        *,
        on_commit: Callable[[float, int], None] | None = None,
    ) -> None:
        self._path = path
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._on_commit = on_commit
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def recover(self, cost: Callable[[str | None, float, int, int], int] | None = None) -> int:
        """Bill rows left pending by a process that died, at their reserved estimate.

        The backend may have served them: the prompt estimate and the output cap stand in for the
        usage it never reported, ``cost`` prices them (model, started_at, input, output), and the
        rows are marked ``recovered`` and ``estimated``. Returns how many.
        """
        db = open_db(self._path)
        try:
            rows = db.execute(
                "SELECT id, model, started_at, coalesce(prompt_tokens, 0), coalesce(reserved_tokens, 0) "
                "FROM requests WHERE state = 'pending'"
            ).fetchall()
            with db.conn:
                db.execute("BEGIN")
                for request_id, model, started_at, prompt, reserved in rows:
                    output = max(0, reserved - prompt)
                    db.execute(
                        "UPDATE requests SET state = 'recovered', estimated = 1, completion_tokens = ?, "
                        "cost_micros = ?, error = 'gateway stopped before the request settled' WHERE id = ?",
                        [output, cost(model, started_at, prompt, output) if cost else None, request_id],
                    )
                    db.execute(ROLLUP, [request_id])
            return len(rows)
        finally:
            db.conn.close()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        db = open_db(self._path, check_same_thread=False)
        self._thread = threading.Thread(target=self._run, args=(db,), name="ledger-writer", daemon=True)
        self._thread.start()

    async def pending(self, row: PendingRow) -> None:
        """Write the pending row and wait until it is committed."""
        assert self._loop is not None, "Ledger.start() was not called"
        future: asyncio.Future[None] = self._loop.create_future()
        reserved = None
        if row.prompt_estimate is not None or row.output_estimate is not None:
            reserved = (row.prompt_estimate or 0) + (row.output_estimate or 0)
        params = (
            row.id,
            row.key_id,
            row.model,
            row.route,
            int(row.stream),
            row.started_at,
            row.prompt_estimate,
            reserved,
        )
        self._queue.put((_INSERT, params, future))
        await future

    def settle(self, s: Settlement) -> None:
        """Queue the settlement; never blocks and never raises (safe in ``finally`` and on cancel)."""
        params = (
            s.status,
            s.upstream_ms,
            s.first_byte_ms,
            s.duration_ms,
            s.prompt_tokens,
            s.completion_tokens,
            s.tool_tokens,
            int(s.estimated),
            s.error,
            s.counted_prompt_tokens,
            s.cost_micros,
            s.reserved_tokens,
            s.id,
        )
        self._queue.put((_SETTLE, params, None))
        self._queue.put((ROLLUP, (s.id,), None))

    async def close(self) -> None:
        """Commit everything queued, then stop the writer."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def _run(self, db: Any) -> None:
        conn = db.conn
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is _STOP or _STOP in batch:
                stop = True
                batch = [op for op in batch if op is not _STOP]
            if batch:
                self._write(conn, batch)
        conn.close()

    def _write(
        self, conn: Any, batch: list[tuple[str, tuple[Any, ...], asyncio.Future[None] | None]]
    ) -> None:
        t0 = time.perf_counter()
        try:
            conn.execute("BEGIN")
            for sql, params, _ in batch:
                conn.execute(sql, params)
            conn.execute("COMMIT")
            errors: dict[int, BaseException] = {}
        except Exception:
            conn.execute("ROLLBACK")
            # One bad operation must not sink its neighbours: retry them one by one.
            errors = {}
            for i, (sql, params, _) in enumerate(batch):
                try:
                    conn.execute(sql, params)
                except Exception as err:
                    log.error("ledger write failed: %s (%s)", err, params)
                    errors[i] = err
        if self._on_commit is not None:
            self._on_commit(time.perf_counter() - t0, len(batch))
        loop = self._loop
        assert loop is not None
        for i, (_, _, future) in enumerate(batch):
            if future is not None:
                # A closed loop means nobody is waiting any more.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_resolve, future, errors.get(i))


def _resolve(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)
