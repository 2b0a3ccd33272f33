from __future__ import annotations

import asyncio
import time

import pytest

from gateway.db import is_postgres
from gateway.ledger import Ledger, PendingRow, Settlement
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
    # 200 pending rows and 200 settlements; SQLite rolls up in a statement of its own.
    assert sum(batches) == (400 if is_postgres(db_path) else 600)
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
    assert err is not None  # the foreign key
    assert {r["id"] for r in ledger_rows(db_path)} == {"req_1", "req_2"}


@pytest.mark.parametrize("engine", ["sqlite"])  # PostgreSQL pipelines each batch instead
def test_sequential_requests_share_one_commit_each(db_path: str) -> None:
    """A settlement lingers for the next pending row: one commit per request, not two."""

    async def run() -> list[int]:
        await _with_key(db_path)
        batches: list[int] = []
        ledger = Ledger(db_path, on_commit=lambda s, n: batches.append(n))
        ledger.start()
        for i in range(20):
            await ledger.pending(_row(i))
            ledger.settle(Settlement(f"req_{i}", 200))
        await ledger.close()
        return batches

    batches = asyncio.run(run())
    assert sum(batches) == 60  # pending, settle and rollup for each
    assert len(batches) <= 21
    assert {r["state"] for r in ledger_rows(db_path)} == {"settled"}


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
