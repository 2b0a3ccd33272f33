from __future__ import annotations

import asyncio
import errno
import itertools
import os
import queue
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gateway import journal
from gateway.db import SQLITE, is_postgres, open_db
from gateway.ledger import LINGER, Ledger, PendingRow, Settlement
from tests.conftest import ENGINES, ledger_rows


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return str(request.param)


def _row(i: int) -> PendingRow:
    return PendingRow(f"req_{i}", 1, "m", "/chat/completions", False, time.time())


async def _with_key(db_path: str) -> None:
    from gateway.db import open_db

    db = open_db(db_path)
    db.execute("INSERT INTO keys (id, name, prefix, hash, created_at) VALUES (1, 'k', 'p', 'h', 0)")
    db.close()


@pytest.mark.parametrize("engine", ["postgresql"])  # SQLite journals instead: see below
def test_pending_is_committed_before_it_returns_and_settles_later(db_path: str) -> None:
    async def run() -> None:
        await _with_key(db_path)
        commits: list[int] = []
        ledger = Ledger(db_path, on_commit=lambda s, n: commits.append(n))
        ledger.start()
        await ledger.pending(_row(1))
        # Another connection sees the row at once: it would survive a kill from here on.
        assert [r["state"] for r in ledger_rows(db_path)] == ["pending"]
        ledger.settle(Settlement("req_1", 200, prompt_tokens=10, completion_tokens=3))
        await ledger.close()
        assert commits

    asyncio.run(run())
    (row,) = ledger_rows(db_path)
    assert (row["state"], row["status"], row["prompt_tokens"], row["completion_tokens"]) == (
        "settled",
        200,
        10,
        3,
    )


_KILLED_AFTER_PENDING = """
import asyncio, os, signal, sqlite3, sys, time
from gateway.ledger import Ledger, PendingRow

async def main():
    ledger = Ledger(sys.argv[1])
    ledger.start()
    # Another process holds the database's write lock: no commit can happen from here on.
    lock = sqlite3.connect(sys.argv[1], isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    row = PendingRow("req_1", 1, "m", "/chat/completions", False, time.time(), 7, 9)
    if sys.argv[2] == "now":
        assert ledger.pending_now(row)  # the request path's way: durable without a coroutine
    else:
        await ledger.pending(row)
    os.kill(os.getpid(), signal.SIGKILL)  # killed the moment pending() returned

asyncio.run(main())
"""


@pytest.mark.parametrize("engine", ["sqlite"])  # PostgreSQL: committed before it returns, above
@pytest.mark.parametrize("way", ["await", "now"])
def test_a_pending_row_survives_a_kill_the_moment_it_returns_without_a_commit(db_path: str, way: str) -> None:
    """SQLite: pending() (or pending_now()) returns once the row is in the journal, not after a
    commit; a process killed right then leaves the row to the next start, which bills it."""
    import subprocess
    import sys

    asyncio.run(_with_key(db_path))
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_PENDING, db_path, way], capture_output=True, timeout=60
    )
    assert child.returncode == -9, child.stderr.decode()
    assert ledger_rows(db_path) == []  # nothing was committed
    assert Ledger(db_path).recover(lambda model, at, i, o: 1000 * i + o) == 1
    (row,) = ledger_rows(db_path)
    assert (row["id"], row["state"], row["estimated"]) == ("req_1", "recovered", 1)
    assert (row["prompt_tokens"], row["completion_tokens"], row["cost_micros"]) == (7, 9, 7009)
    assert not list(Path(db_path).parent.glob("*-ledger.*"))  # the journal was replayed, and gone
    assert Ledger(db_path).recover() == 0


def test_pending_now_journals_where_a_journal_makes_a_row_durable_and_else_does_nothing(db_path: str) -> None:
    """SQLite journals: pending_now() makes the row durable itself. PostgreSQL commits: it does
    nothing and says so, and pending() commits as before."""

    async def run() -> None:
        await _with_key(db_path)
        ledger = Ledger(db_path)
        ledger.start()
        assert ledger.pending_now(_row(1)) is not is_postgres(db_path)
        if is_postgres(db_path):
            assert ledger_rows(db_path) == []  # nothing was queued
            await ledger.pending(_row(1))
        ledger.settle(Settlement("req_1", 200))
        await ledger.close()

    asyncio.run(run())
    assert [(r["id"], r["state"]) for r in ledger_rows(db_path)] == [("req_1", "settled")]


def test_concurrent_writers_share_commits(db_path: str) -> None:
    async def run() -> list[int]:
        await _with_key(db_path)
        batches: list[int] = []
        ledger = Ledger(db_path, on_commit=lambda s, n: batches.append(n))
        ledger.start()
        await asyncio.gather(*(ledger.pending(_row(i)) for i in range(200)))
        for i in range(200):
            ledger.settle(Settlement(f"req_{i}", 200))
        await ledger.close()
        return batches

    batches = asyncio.run(run())
    # 200 pending rows and 200 settlements (SQLite writes a request settled within a batch once).
    assert sum(batches) == 400 if is_postgres(db_path) else 200 <= sum(batches) <= 400
    assert len(batches) < 400  # group commit: fewer transactions than writes
    assert {r["state"] for r in ledger_rows(db_path)} == {"settled"}


def test_recover_marks_leftover_pending_rows(db_path: str) -> None:
    async def run() -> None:
        await _with_key(db_path)
        ledger = Ledger(db_path)
        ledger.start()
        await ledger.pending(_row(1))
        await ledger.pending(_row(2))
        ledger.settle(Settlement("req_2", 200))
        await ledger.close()

    asyncio.run(run())
    assert Ledger(db_path).recover() == 1
    rows = {r["id"]: r for r in ledger_rows(db_path)}
    assert rows["req_1"]["state"] == "recovered" and rows["req_1"]["estimated"] == 1
    assert rows["req_2"]["state"] == "settled"
    assert Ledger(db_path).recover() == 0


def test_a_repeated_pending_write_is_harmless(db_path: str) -> None:
    """A batch sent again after a lost connection must not fail or duplicate anything."""

    async def run() -> None:
        await _with_key(db_path)
        ledger = Ledger(db_path)
        ledger.start()
        await ledger.pending(_row(1))
        await ledger.pending(_row(1))
        await ledger.close()

    asyncio.run(run())
    assert [r["id"] for r in ledger_rows(db_path)] == ["req_1"]


def test_a_bad_write_does_not_sink_its_batch(db_path: str) -> None:
    async def run() -> BaseException | None:
        await _with_key(db_path)
        ledger = Ledger(db_path)
        ledger.start()
        await ledger.pending(_row(1))
        # A row for a key that does not exist breaks a foreign key; its neighbour still lands.
        orphan = PendingRow("req_orphan", 999, "m", "/chat/completions", False, time.time())
        results = await asyncio.gather(
            ledger.pending(orphan), ledger.pending(_row(2)), return_exceptions=True
        )
        await ledger.close()
        return results[0] if isinstance(results[0], BaseException) else None

    err = asyncio.run(run())
    if is_postgres(db_path):
        assert err is not None  # the foreign key, reported to the request that waited
    else:
        # Journaled, so already forwarded: the journal is kept for the next start to retry.
        assert err is None and list(Path(db_path).parent.glob("*-ledger.*"))
    assert {r["id"] for r in ledger_rows(db_path)} == {"req_1", "req_2"}


@pytest.mark.parametrize("engine", ["sqlite"])  # PostgreSQL pipelines each batch instead
def test_sequential_requests_share_commits(db_path: str) -> None:
    """Requests a few milliseconds apart: the writer lets each batch gather for LINGER, and a
    request that settled within its batch is one insert, so commits are fewer than requests."""

    async def run() -> list[int]:
        await _with_key(db_path)
        batches: list[int] = []
        ledger = Ledger(db_path, on_commit=lambda s, n: batches.append(n))
        ledger.start()
        for i in range(20):
            await ledger.pending(_row(i))
            await asyncio.sleep(0.004)  # the backend
            ledger.settle(Settlement(f"req_{i}", 200, prompt_tokens=1))
        await ledger.close()
        return batches

    batches = asyncio.run(run())
    assert len(batches) <= 10
    assert sum(batches) < 40  # pending and settle written apart only across a batch's edge
    assert {r["state"] for r in ledger_rows(db_path)} == {"settled"}
    db = open_db(db_path)
    assert db.execute("SELECT sum(requests), sum(input_tokens) FROM usage_daily").fetchone() == (20, 20)


class _Wakes(queue.SimpleQueue[None]):
    """The writer's wake-ups, with the thread each came from."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def put(self, item: None, block: bool = True, timeout: float | None = None) -> None:
        self.threads.append(threading.get_ident())
        super().put(item)


@pytest.mark.parametrize("engine", ["sqlite"])
def test_a_request_never_wakes_the_writer_the_event_loop_does_once_per_batch(db_path: str) -> None:
    """pending and settle only queue: LINGER after a batch's first operation a timer on the event
    loop wakes the writer, so no request makes a system call to wake a thread, nor hands the
    interpreter to it while it waits for its backend. The batch commits without another call."""

    async def run() -> tuple[list[float], list[int], int, float]:
        await _with_key(db_path)
        commits: list[float] = []
        committed = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_commit(seconds: float, n: int) -> None:
            commits.append(time.monotonic())
            loop.call_soon_threadsafe(committed.set)

        ledger = Ledger(db_path, on_commit=on_commit)
        wakes = ledger._wake = _Wakes()
        ledger.start()
        first = time.monotonic()
        for i in range(10):
            await ledger.pending(_row(i))
            ledger.settle(Settlement(f"req_{i}", 200, prompt_tokens=1))
        assert wakes.threads == [] and commits == []  # ten requests in: nothing woken yet
        await asyncio.wait_for(committed.wait(), 5)
        woken = list(wakes.threads)
        await ledger.close()
        return commits, woken, threading.get_ident(), first

    commits, woken, loop_thread, first = asyncio.run(run())
    assert woken == [loop_thread]  # one wake, from the loop's timer
    assert commits[0] - first >= LINGER * 0.9
    assert {r["state"] for r in ledger_rows(db_path)} == {"settled"}


@pytest.mark.parametrize("engine", ["sqlite"])
def test_a_batchs_first_operation_leaves_its_timer_to_the_loops_next_step(db_path: str) -> None:
    """A request's first ledger operation comes before it is forwarded: it only schedules a
    call, and the timer is set in the loop's next step (once the request is on its way)."""

    async def run() -> None:
        await _with_key(db_path)
        loop = asyncio.get_running_loop()
        timers: list[float] = []
        call_later = loop.call_later

        def recorded(delay: float, callback: Any, *args: Any, **kwargs: Any) -> Any:
            timers.append(delay)
            return call_later(delay, callback, *args, **kwargs)

        loop.call_later = recorded  # type: ignore[method-assign]
        ledger = Ledger(db_path)
        ledger.start()
        assert ledger.pending_now(_row(1))
        assert timers == []  # nothing set while the request is on its way
        await asyncio.sleep(0)
        assert timers == [LINGER]  # set in the next step
        assert ledger.pending_now(_row(2))
        await asyncio.sleep(0)
        assert timers == [LINGER]  # one timer for the batch
        await ledger.close()

    asyncio.run(run())
    assert [r["state"] for r in ledger_rows(db_path)] == ["pending", "pending"]


@pytest.mark.parametrize("engine", ["sqlite"])
def test_under_steady_traffic_commits_stay_linger_apart(db_path: str) -> None:
    """Operations keep arriving while the writer commits (each commit takes 5 ms here): they
    wait for the next timer, not for the commit to end, so commits stay about LINGER apart
    instead of a small one following each."""

    async def run() -> list[float]:
        await _with_key(db_path)
        commits: list[float] = []

        def on_commit(seconds: float, n: int) -> None:
            commits.append(time.monotonic())
            time.sleep(0.005)  # a slow disk: the loop goes on queueing meanwhile

        ledger = Ledger(db_path, on_commit=on_commit)
        ledger.start()
        for i in range(150):
            await ledger.pending(_row(i))
            ledger.settle(Settlement(f"req_{i}", 200, prompt_tokens=1))
            await asyncio.sleep(0.001)
        await ledger.close()
        return commits

    commits = asyncio.run(run())
    apart = [b - a for a, b in itertools.pairwise(commits[:-1])]  # the last: close()'s own
    assert len(apart) >= 3, apart
    assert len([gap for gap in apart if gap < LINGER / 2]) <= 1, apart  # one hiccup at most


@pytest.mark.parametrize("engine", ["sqlite"])
def test_after_commit_runs_on_the_writer_thread_with_its_connection(db_path: str) -> None:
    seen: list[tuple[int, int]] = []

    def after(conn: Any) -> None:  # what the commit wrote is visible on the connection given
        seen.append((threading.get_ident(), conn.execute("SELECT count(*) FROM requests").fetchone()[0]))

    async def run() -> int:
        await _with_key(db_path)
        ledger = Ledger(db_path)
        ledger.start(after_commit=after)
        for i in range(3):
            await ledger.pending(_row(i))
        await ledger.close()
        return threading.get_ident()

    loop_thread = asyncio.run(run())
    assert seen and seen[-1][1] == 3
    assert all(thread != loop_thread for thread, _ in seen)


def _ops(rng: random.Random, n: int) -> list[Any]:
    """Pending and settle operations for n requests, interleaved as concurrent requests are."""
    events: list[tuple[float, int, Any]] = []
    for i in range(n):
        start = rng.random()
        prompt = rng.choice([None, rng.randrange(1, 500)])
        output = rng.choice([None, rng.randrange(1, 100)])
        row = PendingRow(
            f"req_{i:04d}",
            rng.choice([1, 2]),
            rng.choice(["m", "n", None]),
            "/chat/completions",
            rng.random() < 0.3,
            1_700_000_000 + rng.randrange(200_000),
            prompt,
            output,
        )
        served = rng.random() < 0.8
        settlement = Settlement(
            row.id,
            rng.choice([200, 200, 400, 499, 502]),
            upstream_ms=rng.choice([None, rng.random() * 10]),
            first_byte_ms=rng.choice([None, 1.5]),
            duration_ms=rng.random() * 20,
            prompt_tokens=rng.randrange(1, 900) if served else None,
            completion_tokens=rng.randrange(0, 90) if served else None,
            tool_tokens=rng.choice([None, rng.randrange(0, 50)]),
            estimated=rng.random() < 0.2,
            error=rng.choice([None, "interrupted: CancelledError"]),
            counted_prompt_tokens=rng.choice([None, 12]),
            cost_micros=rng.choice([None, rng.randrange(10_000)]),
            reserved_tokens=rng.choice([None, 600]),
        )
        events.append((start, 0, row))
        if rng.random() < 0.9:  # some never settle in this stretch (long streams)
            events.append((start + rng.random() * rng.choice([0.01, 0.01, 0.3]), 1, settlement))
    return [e[2] for e in sorted(events, key=lambda e: (e[0], e[1]))]


def _apply_one_by_one(conn: Any, op: Any) -> None:
    """The reference: each operation on its own, and each row that became settled rolled up."""
    from gateway.ledger import _SETTLE

    if conn.execute(op[0], op[1]).rowcount > 0 and op[0] is _SETTLE:
        conn.execute(SQLITE.rollup(), (op[1][-1],))


def test_a_request_settled_within_its_batch_is_written_as_if_inserted_then_settled(tmp_path: Path) -> None:
    """The writer's coalescing and its one rollup per batch change how many statements are run,
    never what the rows and the daily rollup hold."""
    from gateway.ledger import _INSERT, _SETTLE, _apply_all, _coalesce, pending_params, settle_params

    ops = [
        (_INSERT, pending_params(e, "i"), None, None)
        if isinstance(e, PendingRow)
        else (_SETTLE, settle_params(e), None, None)
        for e in _ops(random.Random(9), 300)
    ]
    rng = random.Random(3)
    cuts = sorted(rng.sample(range(1, len(ops)), 20))  # batches of random sizes
    batches = [ops[a:b] for a, b in zip([0, *cuts], [*cuts, len(ops)], strict=True)]
    results = []
    for coalesce in (False, True):
        db = open_db(str(tmp_path / f"{coalesce}.db"))
        for key_id in (1, 2):
            db.execute(
                "INSERT INTO keys (id, name, prefix, hash, created_at) VALUES (?, ?, 'p', ?, 0)",
                [key_id, f"k{key_id}", f"h{key_id}"],
            )
        written = 0
        for batch in batches:
            ops_written = _coalesce(batch) if coalesce else batch
            written += len(ops_written)
            with db.transaction():
                if coalesce:
                    _apply_all(db.conn, ops_written)
                else:
                    for op in ops_written:
                        _apply_one_by_one(db.conn, op)
        rows = [dict(r) for r in db.query("SELECT * FROM requests ORDER BY id")]
        daily = [dict(r) for r in db.query("SELECT * FROM usage_daily ORDER BY key_id, day, model")]
        results.append((rows, daily, written))
        db.close()
    (rows, daily, separately), (rows_c, daily_c, coalesced) = results
    assert rows == rows_c and daily == daily_c
    assert len(rows) == 300 and {r["state"] for r in rows} == {"pending", "settled"} and daily
    assert coalesced < separately * 0.7  # most pairs fell within one batch


def _keyed_db(path: Path) -> Any:
    db = open_db(str(path))
    for key_id in (1, 2):
        db.execute(
            "INSERT INTO keys (id, name, prefix, hash, created_at) VALUES (?, ?, 'p', ?, 0)",
            [key_id, f"k{key_id}", f"h{key_id}"],
        )
    return db


def _state(db: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows = [dict(r) for r in db.query("SELECT * FROM requests ORDER BY id")]
    daily = [dict(r) for r in db.query("SELECT * FROM usage_daily ORDER BY key_id, day, model")]
    return rows, daily


def _batches(n: int, seed: int, cuts: int) -> list[list[Any]]:
    from gateway.ledger import _INSERT, _SETTLE, _coalesce, pending_params, settle_params

    ops = [
        (_INSERT, pending_params(e, "i"), None, None)
        if isinstance(e, PendingRow)
        else (_SETTLE, settle_params(e), None, None)
        for e in _ops(random.Random(seed), n)
    ]
    at = sorted(random.Random(seed + 1).sample(range(1, len(ops)), cuts))
    return [_coalesce(ops[a:b]) for a, b in zip([0, *at], [*at, len(ops)], strict=True)]


@pytest.mark.parametrize("max_variables", [32766, 100])
def test_a_batch_written_set_by_set_holds_what_one_by_one_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_variables: int
) -> None:
    """Each kind of write as one statement (chunked under SQLite's parameter limit): the same rows
    and the same daily rollup as the operations applied one by one, in a handful of statements
    per batch whatever its size."""
    from gateway import ledger
    from gateway.ledger import _apply_all, _apply_sets

    monkeypatch.setattr(ledger, "_MAX_VARIABLES", max_variables)  # 100: at most 8 rows a statement
    batches = _batches(400, 21, 12)
    results = []
    sizes: set[int] = set()
    statement = ledger._rows_statement

    def recorded(sql: str, n: int) -> str:
        sizes.add(n)
        return statement(sql, n)

    monkeypatch.setattr(ledger, "_rows_statement", recorded)
    for sets in (False, True):
        db = _keyed_db(tmp_path / f"{sets}.db")
        statements: list[str] = []
        db.conn.set_trace_callback(statements.append)
        for batch in batches:
            statements.clear()
            with db.transaction():
                if sets:
                    assert _apply_sets(db.conn, batch)
                else:
                    _apply_all(db.conn, batch)
            if sets:
                writes = [s for s in statements if s.startswith(("INSERT INTO requests", "WITH s "))]
                if max_variables > 1000:
                    # One statement per power of two in each kind's row count (45 rows: 32, 8, 4, 1).
                    kinds = [
                        sum(op[0] is sql for op in batch) for sql in (ledger._INSERT, ledger._INSERT_SETTLED)
                    ]
                    kinds.append(sum(op[0] is ledger._SETTLE for op in batch))
                    assert len(writes) == sum(n.bit_count() for n in kinds), (kinds, len(writes))
        results.append(_state(db))
        db.close()
    assert results[0] == results[1]
    # Few sizes of each statement, so the connection's statement cache stays small.
    assert sizes <= {1 << i for i in range(9)} and max(sizes) <= (64 if max_variables > 1000 else 8)
    rows, daily = results[1]
    assert len(rows) == 400 and {r["state"] for r in rows} == {"pending", "settled"} and daily


def test_a_batch_finding_a_row_not_as_expected_writes_nothing_and_goes_one_by_one(tmp_path: Path) -> None:
    """A settlement whose row was recovered meanwhile, or a settled insert whose id is already in:
    the set-by-set write declines before writing anything, and the writer applies the batch one
    operation at a time, which settles and rolls up only what changed (no row counted twice)."""
    from gateway.ledger import _INSERT, _SETTLE, _apply_sets, _commit_patiently, _recover, pending_params

    db = _keyed_db(tmp_path / "l.db")
    row, other = _row(1), _row(2)
    db.execute(_INSERT, pending_params(row, "i"))
    assert _recover(db, None, None) == 1  # req_1 is recovered (and rolled up) before it settles
    before = _state(db)
    late = (_SETTLE, settle_params_of("req_1"), None, None)
    fresh = (_INSERT, pending_params(other, "i"), None, None)
    with db.transaction():
        assert not _apply_sets(db.conn, [fresh, late])
    assert _state(db) == before  # declined: nothing written
    assert _commit_patiently(db.conn, [fresh, late])
    rows, daily = _state(db)
    assert [(r["id"], r["state"]) for r in rows] == [("req_1", "recovered"), ("req_2", "pending")]
    assert daily == before[1]  # the late settlement changed nothing, so nothing was rolled up again


def settle_params_of(request_id: str) -> tuple[Any, ...]:
    from gateway.ledger import settle_params

    return settle_params(Settlement(request_id, 200, prompt_tokens=5, completion_tokens=1))


def test_journal_segments_are_deleted_once_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "SEGMENT_BYTES", 1_000)  # a dozen rows each
    target = str(tmp_path / "gateway.db")

    def segments() -> list[str]:
        return sorted(p.name for p in tmp_path.glob("gateway.db-ledger.*"))

    async def run() -> list[str]:
        await _with_key(target)
        ledger = Ledger(target)
        ledger.start()
        for i in range(100):
            await ledger.pending(_row(i))
            ledger.settle(Settlement(f"req_{i}", 200))
        assert len(segments()) >= 4  # written faster than the writer's linger
        deadline = time.monotonic() + 10
        while len(segments()) > 1 and time.monotonic() < deadline:  # noqa: ASYNC110 (polling files)
            await asyncio.sleep(0.01)
        left = segments()
        await ledger.close()
        return left

    assert len(asyncio.run(run())) == 1  # the one still written to
    assert segments() == []  # a clean stop leaves none
    assert len(ledger_rows(target)) == 100


def test_a_torn_journal_line_is_skipped_and_the_rest_replayed(tmp_path: Path) -> None:
    target = str(tmp_path / "gateway.db")
    asyncio.run(_with_key(target))
    whole = b'["req_1", 1, "m", "/chat/completions", 0, 1.5, 3, 4, "x"]\n'
    # A segment is allocated whole (zeros); a copy cut short leaves part of a line, or (copied
    # tail first) its end with zeros before it.
    cut = b'["req_2", 1, "m", "/chat/com'
    tail_first = b'["req_3", 1, "m"' + b"\0" * 20 + b', 3, 4, "x"]\n'
    (tmp_path / "gateway.db-ledger.0").write_bytes(whole + cut + b"\0" * 4000)
    (tmp_path / "gateway.db-ledger.1").write_bytes(whole.replace(b"req_1", b"req_4") + tail_first + whole)
    assert Ledger(target).recover() == 2
    assert [r["id"] for r in ledger_rows(target)] == ["req_1", "req_4"]
    assert not list(tmp_path.glob("gateway.db-ledger.*"))


def test_the_journal_allocates_each_segment_whole_and_reads_back_only_what_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "SEGMENT_BYTES", 4096)
    j = journal.Journal(str(tmp_path / "gateway.db-ledger"))
    j.open()
    assert j.append(("req_1", 1, "m")) == 0
    assert (tmp_path / "gateway.db-ledger.0").stat().st_size == 4096  # the blocks are taken now
    assert list(j.entries()) == [["req_1", 1, "m"]]  # a reader sees the copy at once
    big = ("req_2", 1, "m" * 5000)  # longer than a segment: one of its own
    assert j.append(big) == 1 and j.append(("req_3", 1, "m")) == 2
    assert list(j.entries()) == [["req_1", 1, "m"], list(big), ["req_3", 1, "m"]]
    j.close(committed=False)
    assert [e[0] for e in journal.Journal(str(tmp_path / "gateway.db-ledger")).entries()] == [
        "req_1",
        "req_2",
        "req_3",
    ]


def test_a_segment_the_disk_refuses_fails_the_append_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "SEGMENT_BYTES", 200)
    j = journal.Journal(str(tmp_path / "gateway.db-ledger"))
    j.open()
    j.append(("req_1", "x" * 100))
    real = os.posix_fallocate

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal.os, "posix_fallocate", full)
    with pytest.raises(OSError):
        j.append(("req_2", "x" * 100))  # needs the next segment
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gateway.db-ledger.0"]  # none half-made
    monkeypatch.setattr(journal.os, "posix_fallocate", real)
    assert j.append(("req_3", "x" * 100)) == 1  # space again: on it goes
    assert [e[0] for e in j.entries()] == ["req_1", "req_3"]
    j.close(committed=True)
    assert list(tmp_path.iterdir()) == []


def test_request_ids_are_unique_and_in_time_order() -> None:
    from gateway.ledger import new_request_id

    ids = []
    for _ in range(3):
        ids += [new_request_id() for _ in range(1000)]
        time.sleep(0.002)
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 28 and i.startswith("req_") for i in ids)
    stamps = [i[4:16] for i in ids]
    assert stamps == sorted(stamps)


def test_a_batch_the_database_refuses_for_a_while_is_retried_whole(tmp_path: Path) -> None:
    """Locked beyond the busy timeout, or a full disk: the journaled rows are kept and retried,
    not dropped one by one (their requests are already forwarded)."""
    from gateway.ledger import _INSERT, _SETTLE, pending_params, settle_params

    target = str(tmp_path / "gateway.db")
    asyncio.run(_with_key(target))
    db = open_db(target)

    class LockedAWhile:
        """The writer's connection, refusing every statement for 0.2 s as a locked file does."""

        until = time.monotonic() + 0.2
        refused = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(db.conn, name)

        def execute(self, sql: str, params: Any = ()) -> Any:
            if time.monotonic() < self.until:
                self.refused += 1
                raise sqlite3.OperationalError("database is locked")
            return db.conn.execute(sql, params)

    ledger = Ledger(target)
    batch = [
        (_INSERT, pending_params(_row(1), "i"), None, 0),
        (_SETTLE, settle_params(Settlement("req_1", 200, prompt_tokens=3)), None, None),
    ]
    conn = LockedAWhile()
    ledger._write(conn, batch)
    assert conn.refused >= 2
    assert [(r["id"], r["state"]) for r in ledger_rows(target)] == [("req_1", "settled")]
    assert db.execute("SELECT requests, input_tokens FROM usage_daily").fetchall() == [(1, 3)]
