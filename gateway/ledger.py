"""The durable usage ledger: one row per request that reaches the backend.

Life of a row: ``pending`` is written and committed *before* the request is forwarded, so a
request the backend may serve is on disk even if the gateway is killed a moment later; it is
``settled`` with the backend's usage afterwards; rows still pending when a gateway starts are
marked ``recovered`` (billed as estimates) by :meth:`Ledger.recover`.

All writes go through one writer thread that commits in batches (group commit): the event
loop never touches the disk for a write, and a burst of requests shares one commit. A batch of
settlements alone (nobody waits on it) lingers up to :data:`SETTLE_LINGER` seconds for the next
pending row, so that sequential requests cost one commit each, not two; a process killed in
that moment leaves those rows pending, recovered at the next start like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.db import ROLLUP_UPSERT, SQLITE, SQLiteDatabase, is_postgres, open_db

__all__ = ["Ledger", "PendingRow", "Settlement", "new_request_id"]

log = logging.getLogger("gateway.ledger")

MAX_BATCH = 1024
SETTLE_LINGER = 0.02
_STOP = object()


def new_request_id() -> str:
    """``req_`` + 12 hex digits of milliseconds + 12 random: unique, and in time order, so that
    the ledger's primary key grows at one end instead of touching a random page per insert.

    The random part is not a secret (ids are shown to their own caller), so it comes from
    ``random`` (reseeded in forked workers) rather than a system call per request."""
    return f"req_{time.time_ns() // 1_000_000:012x}{random.getrandbits(48):012x}"


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
    "reserved_tokens, owner) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
)
# The pending row of a request whose key and price came from caches: written only while the
# configuration version is the one they were read under (see gateway/config_version.py).
_INSERT_IF_CURRENT = (
    "INSERT INTO requests (id, key_id, model, route, stream, state, started_at, prompt_tokens, "
    "reserved_tokens, owner) SELECT ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ? "
    "WHERE (SELECT n FROM config_version) = ? ON CONFLICT (id) DO NOTHING"
)
_SETTLE = (
    "UPDATE requests SET state = 'settled', status = ?, upstream_ms = ?, first_byte_ms = ?, "
    "duration_ms = ?, prompt_tokens = ?, completion_tokens = ?, tool_tokens = ?, estimated = ?, "
    "error = ?, counted_prompt_tokens = ?, cost_micros = ?, reserved_tokens = ? "
    "WHERE id = ? AND state = 'pending'"
)
_PENDING_OF = (
    "SELECT id, model, started_at, coalesce(prompt_tokens, 0), coalesce(reserved_tokens, 0) FROM requests "
)
_RECOVER = (
    "UPDATE requests SET state = 'recovered', estimated = 1, completion_tokens = ?, cost_micros = ?, "
    "error = 'gateway stopped before the request settled' WHERE id = ? AND state = 'pending'"
)
# PostgreSQL settles and rolls up in one statement: a retried batch can never count a row twice.
_SETTLE_ROLLUP_PG = (
    "WITH s AS (" + _SETTLE + " RETURNING key_id, started_at, model, prompt_tokens, tool_tokens, "
    "completion_tokens, cost_micros) "
    "INSERT INTO usage_daily SELECT key_id, {day}, coalesce(model, ''), 1, coalesce(prompt_tokens, 0), "
    "coalesce(tool_tokens, 0), coalesce(completion_tokens, 0), coalesce(cost_micros, 0) FROM s "
    "WHERE prompt_tokens IS NOT NULL OR completion_tokens IS NOT NULL {upsert}"
)

Op = tuple[str, tuple[Any, ...], "asyncio.Future[Any] | None"]


class Ledger:
    """Owns the writer. Use :meth:`start` / :meth:`close` (the app's lifespan does).

    SQLite: a writer thread. PostgreSQL: an async task on a connection of its own, which also
    keeps this replica's heartbeat and recovers the rows of replicas that went silent.
    """

    def __init__(
        self,
        target: str,
        *,
        on_commit: Callable[[float, int], None] | None = None,
        instance: str | None = None,
        replica_timeout: float = 30.0,
    ) -> None:
        self._target = target
        self._postgres = is_postgres(target)
        self.instance = instance or uuid.uuid4().hex[:16]
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._aqueue: asyncio.Queue[Any] | None = None
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._on_commit = on_commit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cost: Callable[[str | None, float, int, int], int] | None = None
        self._settle_sql = _SETTLE
        self._rollup_sql = SQLITE.rollup()
        self.replica_timeout = replica_timeout

    @property
    def queue_depth(self) -> int:
        return self._aqueue.qsize() if self._aqueue is not None else self._queue.qsize()

    def recover(self, cost: Callable[[str | None, float, int, int], int] | None = None) -> int:
        """Bill rows left pending by a process that died, at their reserved estimate.

        The backend may have served them: the prompt estimate and the output cap stand in for the
        usage it never reported, ``cost`` prices them (model, started_at, input, output), and the
        rows are marked ``recovered`` and ``estimated``. Returns how many.

        SQLite has one gateway process per file, so every pending row is an orphan. On PostgreSQL
        only rows of replicas silent for ``replica_timeout`` are (and rows from before
        replicas were tracked); the writer repeats this while it runs.
        """
        self._cost = cost
        db = open_db(self._target)
        try:
            return _recover(db, cost, time.time() - self.replica_timeout if self._postgres else None)
        finally:
            db.close()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._postgres:
            from gateway.postgres import POSTGRES

            self._settle_sql = _SETTLE_ROLLUP_PG.format(
                day=POSTGRES.day_of.format("started_at"), upsert=ROLLUP_UPSERT
            )
            self._aqueue = asyncio.Queue()
            self._task = asyncio.create_task(self._run_async(), name="ledger-writer")
            return
        db = open_db(self._target, check_same_thread=False)
        assert isinstance(db, SQLiteDatabase)
        self._thread = threading.Thread(target=self._run, args=(db,), name="ledger-writer", daemon=True)
        self._thread.start()

    def _put(self, op: Any) -> None:
        if self._aqueue is not None:
            self._aqueue.put_nowait(op)
        else:
            self._queue.put(op)

    async def pending(self, row: PendingRow, *, version: int | None = None) -> bool:
        """Write the pending row and wait until it is committed; True if it was written.

        With ``version`` (SQLite only), the row is written only if the configuration version is
        still that one when it commits; False means it moved, and nothing was written."""
        assert self._loop is not None, "Ledger.start() was not called"
        future: asyncio.Future[bool | None] = self._loop.create_future()
        reserved = None
        if row.prompt_estimate is not None or row.output_estimate is not None:
            reserved = (row.prompt_estimate or 0) + (row.output_estimate or 0)
        params: tuple[Any, ...] = (
            row.id,
            row.key_id,
            row.model,
            row.route,
            int(row.stream),
            row.started_at,
            row.prompt_estimate,
            reserved,
            self.instance,
        )
        if version is not None and not self._postgres:
            self._put((_INSERT_IF_CURRENT, (*params, version), future))
        else:
            self._put((_INSERT, params, future))
        return (await future) is not False

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
        self._put((self._settle_sql, params, None))
        if not self._postgres:
            self._put((self._rollup_sql, (s.id,), None))

    async def close(self) -> None:
        """Commit everything queued, then stop the writer."""
        if self._task is not None:
            self._put(_STOP)
            await self._task
            self._task = None
        if self._thread is not None:
            self._put(_STOP)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    # SQLite: the writer thread
    def _run(self, db: SQLiteDatabase) -> None:
        conn = db.conn
        stop = False
        while not stop:
            batch = [self._queue.get()]
            self._drain(batch)
            if all(op is not _STOP and op[2] is None for op in batch):
                try:
                    batch.append(self._queue.get(timeout=SETTLE_LINGER))
                except queue.Empty:
                    pass
                else:
                    self._drain(batch)
            if _STOP in batch:
                stop = True
                batch = [op for op in batch if op is not _STOP]
            if batch:
                self._write(conn, batch)
        conn.close()

    def _drain(self, batch: list[Any]) -> None:
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def _write(self, conn: Any, batch: list[Op]) -> None:
        t0 = time.perf_counter()
        errors: dict[int, BaseException] = {}
        try:
            conn.execute("BEGIN")
            written = [_apply(conn, op) for op in batch]
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            # One bad operation must not sink its neighbours: retry them one by one.
            written = []
            for i, op in enumerate(batch):
                try:
                    written.append(_apply(conn, op))
                except Exception as err:
                    log.error("ledger write failed: %s (%s)", err, op[1])
                    errors[i] = err
                    written.append(False)
        if self._on_commit is not None:
            self._on_commit(time.perf_counter() - t0, len(batch))
        waiting = [(op[2], errors.get(i), written[i]) for i, op in enumerate(batch) if op[2] is not None]
        if waiting:
            assert self._loop is not None
            # One wake-up of the event loop for the whole batch; a closed loop means nobody
            # is waiting any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_resolve_all, waiting)

    # PostgreSQL: the writer task
    async def _run_async(self) -> None:
        from gateway.postgres import AsyncWriter

        assert self._aqueue is not None
        writer = AsyncWriter(self._target, self.instance, self._on_commit)
        next_beat = 0.0
        beat = self.replica_timeout / 3
        stop = False
        try:
            while not stop:
                if time.monotonic() >= next_beat:
                    await writer.heartbeat(self._recover_silent)
                    next_beat = time.monotonic() + beat
                try:
                    first = await asyncio.wait_for(self._aqueue.get(), beat)
                except TimeoutError:
                    continue
                batch = [first]
                while len(batch) < MAX_BATCH and not self._aqueue.empty():
                    batch.append(self._aqueue.get_nowait())
                if _STOP in batch:
                    stop = True
                    batch = [op for op in batch if op is not _STOP]
                if batch:
                    await writer.write(batch)
        finally:
            await writer.close()

    def _recover_silent(self, db: Any) -> int:
        return _recover(db, self._cost, time.time() - self.replica_timeout)


def _recover(
    db: Any, cost: Callable[[str | None, float, int, int], int] | None, silent_since: float | None
) -> int:
    """Recover pending rows: all (``silent_since`` None) or those of replicas silent since then."""
    if silent_since is None:
        where = "WHERE state = 'pending'"
        params: list[Any] = []
    else:
        where = (
            "WHERE state = 'pending' AND (owner IS NULL OR owner NOT IN "
            "(SELECT instance FROM replicas WHERE seen_at >= ?))"
        )
        params = [silent_since]
    rows = db.execute(_PENDING_OF + where, params).fetchall()
    if not rows:
        return 0
    rollup = db.dialect.rollup()
    recovered = 0
    with db.transaction():
        for request_id, model, started_at, prompt, reserved in rows:
            output = max(0, reserved - prompt)
            cursor = db.execute(
                _RECOVER,
                [output, cost(model, started_at, prompt, output) if cost else None, request_id],
            )
            if cursor.rowcount:  # another replica may have recovered it first
                db.execute(rollup, [request_id])
                recovered += 1
    return recovered


def _apply(conn: Any, op: Op) -> bool:
    """Run one operation; whether it wrote (only a conditional insert may not)."""
    sql, params, _ = op
    cursor = conn.execute(sql, params)
    return cursor.rowcount > 0 if sql is _INSERT_IF_CURRENT else True


def _resolve_all(waiting: list[tuple[asyncio.Future[Any], BaseException | None, bool]]) -> None:
    for future, exc, written in waiting:
        if future.done():
            continue
        if exc is None:
            future.set_result(written)
        else:
            future.set_exception(exc)
