"""The durable usage ledger: one row per request that reaches the backend.

Life of a row: ``pending`` is made durable *before* the request is forwarded, so a request the
backend may serve survives the gateway being killed a moment later; it is ``settled`` with the
backend's usage afterwards; rows still pending when a gateway starts are marked ``recovered``
(billed as estimates) by :meth:`Ledger.recover`.

On SQLite the pending record is a line appended to the ledger's journal (:mod:`gateway.journal`,
one system call, as durable as a commit here), and the request goes on at once; one writer
thread puts rows into the database behind the requests, in batches: the event loop wakes it
:data:`LINGER` seconds after a batch's first operation (a timer: a request never wakes a thread
itself, nor hands it the interpreter while it waits for its backend), and it commits what
gathered together. A request
that settled within the batch is inserted settled (one row written, not written and updated). A
process killed within that moment leaves its pending rows in the journal and its settlements
unwritten: the next start replays the journal, and recovers those rows like any other.

Without a journal (an in-memory database) and on PostgreSQL, :meth:`Ledger.pending` waits for
its row's commit instead, and the event loop never touches the disk for a write either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.db import ROLLUP_UPSERT, SQLITE, SQLiteDatabase, is_postgres, open_db
from gateway.errors import LedgerUnavailable
from gateway.journal import Journal

__all__ = ["Ledger", "PendingRow", "Settlement", "new_request_id"]

log = logging.getLogger("gateway.ledger")

MAX_BATCH = 1024
# How long the writer lets operations gather before a commit that nobody waits for: a kill
# within it leaves the batch's settlements unwritten (their rows are recovered as estimates).
LINGER = 0.02
# How long a batch is retried while the database refuses writes (locked by another process
# beyond its busy timeout, disk full) before its operations are tried one by one and the
# failures dropped (their journal is kept for the next start).
WRITE_PATIENCE = 30.0
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
# A request pending and settled within one batch: the row it would have become, in one write.
_INSERT_SETTLED = (
    "INSERT INTO requests (id, key_id, model, route, stream, started_at, owner, state, status, "
    "upstream_ms, first_byte_ms, duration_ms, prompt_tokens, completion_tokens, tool_tokens, "
    "estimated, error, counted_prompt_tokens, cost_micros, reserved_tokens) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, 'settled', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
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

_ROLLUP_MANY = SQLITE.rollup_many()

# SQLite's queue: (statement, parameters, who waits for its commit, journal segment of a pending row).
Op = tuple[str, tuple[Any, ...], "asyncio.Future[Any] | None", int | None]


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
        # SQLite: the writer thread sleeps on _wake; the loop puts None there LINGER after a
        # batch's first operation (_armed while that timer is set; both touched on the loop only).
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._armed = False
        self._loop_thread: int | None = None
        self._after_commit: Callable[[Any], None] | None = None
        self._aqueue: asyncio.Queue[Any] | None = None
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._on_commit = on_commit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cost: Callable[[str | None, float, int, int], int] | None = None
        self._settle_sql = _SETTLE
        self.replica_timeout = replica_timeout
        self._journal = Journal(target + "-ledger") if not self._postgres and target != ":memory:" else None

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
            self._replay(db)
            return _recover(db, cost, time.time() - self.replica_timeout if self._postgres else None)
        finally:
            db.close()

    def _replay(self, db: Any) -> int:
        """Put the journal's rows that never reached the database in as pending, then delete the
        journal. Returns how many rows were missing."""
        if self._journal is None or not self._journal.segments():
            return 0
        missing = 0
        with db.transaction():
            for entry in self._journal.entries():
                try:
                    missing += db.execute(_INSERT, entry).rowcount
                except Exception as exc:  # a line this gateway cannot write stays unbillable
                    log.error("cannot replay a journaled pending row: %s (%s)", exc, entry)
        self._journal.remove_all()
        if missing:
            log.warning("replayed %d pending row(s) from the ledger's journal", missing)
        return missing

    def start(self, *, after_commit: Callable[[Any], None] | None = None) -> None:
        """Start the writer. SQLite: ``after_commit`` runs on the writer thread after each of
        its commits, with its connection (the configuration version reads itself there)."""
        self._after_commit = after_commit
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
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
        if self._journal is not None:
            self._replay(db)  # rows a caller that skipped recover() would otherwise leave behind
            self._journal.open()
        self._thread = threading.Thread(target=self._run, args=(db,), name="ledger-writer", daemon=True)
        self._thread.start()

    def _put(self, op: Any) -> None:
        if self._aqueue is not None:
            self._aqueue.put_nowait(op)
            return
        self._queue.put(op)  # nobody sleeps on this queue: no system call, no thread woken
        if op is _STOP or op[2] is not None:
            self._wake.put(None)  # somebody waits for this commit, or for the writer to stop
        elif not self._armed:
            self._arm()

    def _arm(self) -> None:
        """Wake the writer LINGER seconds from now, from the event loop: the operations that
        arrive meanwhile share its commit. The timer itself is set in the loop's next step: a
        request's first operation comes before it is forwarded, and setting a timer, cold,
        costs three times what scheduling a call does."""
        loop = self._loop
        if loop is None or threading.get_ident() != self._loop_thread or loop.is_closed():
            self._wake.put(None)  # not on the loop (or none left to keep a timer): at once
            return
        self._armed = True
        loop.call_soon(self._set_timer)

    def _set_timer(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            self._kick()
            return
        loop.call_later(LINGER, self._kick)

    def _kick(self) -> None:
        self._armed = False
        self._wake.put(None)

    async def pending(self, row: PendingRow) -> None:
        """Make the pending row durable: journaled (SQLite), or committed (no journal, PostgreSQL).

        Raises :class:`LedgerUnavailable` if it cannot be: the request must not be forwarded."""
        if self.pending_now(row):
            return
        assert self._loop is not None, "Ledger.start() was not called"
        params = pending_params(row, self.instance)
        future: asyncio.Future[None] = self._loop.create_future()
        self._put((_INSERT, params, future) if self._postgres else (_INSERT, params, future, None))
        await future

    def pending_now(self, row: PendingRow) -> bool:
        """:meth:`pending` where a journal makes the row durable at once, without a coroutine
        (the request path's usual case): True once it is; False, having done nothing, where
        only a commit can (then await :meth:`pending`). Raises as :meth:`pending` does."""
        if self._journal is None:
            return False
        assert self._loop is not None, "Ledger.start() was not called"
        params = pending_params(row, self.instance)
        try:
            segment = self._journal.append(params)
        except OSError as exc:
            log.error("cannot journal a pending row: %s", exc)
            raise LedgerUnavailable("The usage ledger is unavailable; retry shortly.") from exc
        self._put((_INSERT, params, None, segment))
        return True

    def settle(self, s: Settlement) -> None:
        """Queue the settlement; never blocks and never raises (safe in ``finally`` and on cancel)."""
        params = settle_params(s)
        self._put((self._settle_sql, params, None) if self._postgres else (_SETTLE, params, None, None))

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
            if self._journal is not None:
                self._journal.close(committed=True)

    # SQLite: the writer thread
    def _run(self, db: SQLiteDatabase) -> None:
        conn = db.conn
        stop = False
        while not stop:
            self._wake.get()  # a batch has gathered, somebody waits for a commit, or close()
            full = True
            while full and not stop:
                batch: list[Any] = []
                self._drain(batch)
                # A full batch leaves a backlog: drain on. Else what arrives from now on (even
                # during this commit) has a timer of its own set on the loop: it waits for that.
                full = len(batch) >= MAX_BATCH
                if _STOP in batch:
                    stop = True
                    batch = [op for op in batch if op is not _STOP]
                if batch:
                    self._write(conn, _coalesce(batch))
                    self._committed(conn)
        conn.close()

    def _committed(self, conn: Any) -> None:
        if self._after_commit is not None:
            try:
                self._after_commit(conn)
            except Exception as exc:  # the hook only saves readers work: never stop the writer
                log.warning("after a ledger commit: %s", exc)

    def _drain(self, batch: list[Any]) -> None:
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def _write(self, conn: Any, batch: list[Op]) -> None:
        t0 = time.perf_counter()
        errors: dict[int, BaseException] = {}
        if not _commit_patiently(conn, batch):
            # One bad operation must not sink its neighbours: retry them one by one.
            for i, op in enumerate(batch):
                try:
                    _apply_all(conn, [op])
                except Exception as err:
                    log.error("ledger write failed: %s (%s)", err, op[1])
                    errors[i] = err
        if self._on_commit is not None:
            self._on_commit(time.perf_counter() - t0, len(batch))
        if self._journal is not None:
            if any(batch[i][3] is not None for i in errors):
                self._journal.keep = True  # the next start replays that row
            segments = [op[3] for op in batch if op[3] is not None]
            if segments:
                self._journal.release_before(max(segments))
        waiting = [(op[2], errors.get(i)) for i, op in enumerate(batch) if op[2] is not None]
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


def pending_params(row: PendingRow, owner: str) -> tuple[Any, ...]:
    """The parameters of the pending row's insert (and of its journal line)."""
    reserved = None
    if row.prompt_estimate is not None or row.output_estimate is not None:
        reserved = (row.prompt_estimate or 0) + (row.output_estimate or 0)
    return (
        row.id,
        row.key_id,
        row.model,
        row.route,
        int(row.stream),
        row.started_at,
        row.prompt_estimate,
        reserved,
        owner,
    )


def settle_params(s: Settlement) -> tuple[Any, ...]:
    """The parameters of the settlement's update (the request's id last)."""
    return (
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


def _coalesce(batch: list[Op]) -> list[Op]:
    """The batch with each request pending and settled in it written as one settled row."""
    pending_at: dict[str, int] = {}
    out: list[Op] = []
    for op in batch:
        sql = op[0]
        if sql is _INSERT:
            pending_at[op[1][0]] = len(out)
        elif sql is _SETTLE:
            i = pending_at.pop(op[1][-1], None)
            if i is not None:
                pending = out[i]
                # The pending row's columns up to started_at, its owner, then the settlement's.
                params = (*pending[1][:6], pending[1][8], *op[1][:-1])
                out[i] = (_INSERT_SETTLED, params, pending[2], pending[3])
                continue
        out.append(op)
    return out


def _commit_patiently(conn: Any, batch: list[Op]) -> bool:
    """Commit the batch in one transaction; False if it failed for good. A database that refuses
    writes for a while (locked beyond its busy timeout, a full disk) is waited for, up to
    :data:`WRITE_PATIENCE`: the batch's requests were journaled and forwarded already."""
    delay, started = 0.05, time.monotonic()
    while True:
        try:
            conn.execute("BEGIN")
            if not _apply_sets(conn, batch):
                _apply_all(conn, batch)
            conn.execute("COMMIT")
            return True
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if not isinstance(exc, sqlite3.OperationalError) or time.monotonic() - started >= WRITE_PATIENCE:
                return False
            log.error("ledger write failed, retrying in %.2fs: %s", delay, exc)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _apply_all(conn: Any, ops: list[Op]) -> None:
    """Run the operations; the rows that became settled are added to the daily rollup, in one
    statement for them all (a statement per row was two fifths of the writer's work)."""
    settled = []
    for sql, params, *_ in ops:
        if conn.execute(sql, params).rowcount > 0:
            if sql is _SETTLE:
                settled.append(params[-1])
            elif sql is _INSERT_SETTLED:
                settled.append(params[0])
    if settled:
        conn.execute(_ROLLUP_MANY, (orjson.dumps(settled).decode(),))


# SQLite's default limit on one statement's parameters (3.32 and later).
_MAX_VARIABLES = 32766
# Which rows the batch expects: none of its settled inserts' ids present yet, and every row it
# settles still pending.
_EXPECTED = (
    "SELECT (SELECT count(*) FROM requests WHERE id IN (SELECT value FROM json_each(?))), "
    "(SELECT count(*) FROM requests WHERE state = 'pending' AND id IN (SELECT value FROM json_each(?)))"
)
# settle_params' order: the settlement's columns, the request's id last.
_SETTLE_COLUMNS = (
    "status",
    "upstream_ms",
    "first_byte_ms",
    "duration_ms",
    "prompt_tokens",
    "completion_tokens",
    "tool_tokens",
    "estimated",
    "error",
    "counted_prompt_tokens",
    "cost_micros",
    "reserved_tokens",
    "id",
)
# _SETTLE for one row of values; _rows_statement repeats the row.
_SETTLE_MANY = (
    f"WITH s ({', '.join(_SETTLE_COLUMNS)}) AS (VALUES ({', '.join(['?'] * len(_SETTLE_COLUMNS))})) "
    f"UPDATE requests SET state = 'settled', {', '.join(f'{c} = s.{c}' for c in _SETTLE_COLUMNS[:-1])} "
    "FROM s WHERE requests.id = s.id AND requests.state = 'pending'"
)


# The most rows one statement writes. Chunks are powers of two (a batch of 45 rows: 32, 8, 4, 1),
# so the connection's statement cache holds at most a few sizes of each statement, not one
# prepared statement (up to megabytes for a thousand rows) per batch size seen.
_MAX_ROWS = 256


@functools.lru_cache(maxsize=64)
def _rows_statement(sql: str, n: int) -> str:
    """``sql``, written for one row of values (``VALUES (...)``), with ``n`` rows of them."""
    head, rest = sql.split("VALUES ", 1)
    row = rest[: rest.index(")") + 1]  # a row holds parameters and string literals, no parentheses
    return f"{head}VALUES {', '.join([row] * n)}{rest[len(row) :]}"


def _execute_rows(conn: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """The rows in chunks of a power of two rows each, under SQLite's parameter limit."""
    most = min(_MAX_ROWS, _MAX_VARIABLES // len(rows[0]))
    start = 0
    while start < len(rows):
        n = 1 << (min(most, len(rows) - start).bit_length() - 1)
        chunk = rows[start : start + n]
        conn.execute(_rows_statement(sql, n), [v for row in chunk for v in row])
        start += n


def _apply_sets(conn: Any, ops: list[Op]) -> bool:
    """The batch in a handful of statements (each kind of write as one), not one per operation.

    Each statement is a hand-off of the interpreter lock: SQLite runs without it, and this thread
    must win it back from the busy event loop, which stalls the loop while it does (and longer
    when the two cores are shared with other processes). A statement per operation made the
    writer cost the event loop about a fifth of a request's CPU under load.

    Returns False, having written nothing, when a row is not where the batch expects it (a
    settled insert's id already present, a settled row no longer pending, an id twice): the
    caller then applies the operations one by one, which decide row by row."""
    pending: list[tuple[Any, ...]] = []
    settled: list[tuple[Any, ...]] = []
    settles: list[tuple[Any, ...]] = []
    for sql, params, *_ in ops:
        if sql is _INSERT:
            pending.append(params)
        elif sql is _INSERT_SETTLED:
            settled.append(params)
        elif sql is _SETTLE:
            settles.append(params)
        else:
            return False
    ids = [p[0] for p in settled] + [p[-1] for p in settles]
    if ids:
        if len(set(ids)) != len(ids):
            return False
        present, still_pending = conn.execute(
            _EXPECTED,
            (orjson.dumps(ids[: len(settled)]).decode(), orjson.dumps(ids[len(settled) :]).decode()),
        ).fetchone()
        if present or still_pending != len(settles):
            return False
    if pending:
        _execute_rows(conn, _INSERT, pending)
    if settled:
        _execute_rows(conn, _INSERT_SETTLED, settled)
    if settles:
        _execute_rows(conn, _SETTLE_MANY, settles)
    if ids:
        conn.execute(_ROLLUP_MANY, (orjson.dumps(ids).decode(),))
    return True


def _resolve_all(waiting: list[tuple[asyncio.Future[Any], BaseException | None]]) -> None:
    for future, exc in waiting:
        if future.done():
            continue
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)
