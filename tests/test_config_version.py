"""The configuration version, and the key and price caches it keeps exact."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.config_version import ConfigVersion
from gateway.db import SQLiteDatabase, open_db
from gateway.keys import KeyStore, load_key_secret
from gateway.limits import PlanStore
from gateway.prices import DEFAULT_MODEL, Price, PriceBook
from tests.conftest import ENGINES, settled_rows

SECRET = b"test-secret"


def _version(db: Any) -> int:
    return int(db.execute("SELECT n FROM config_version").fetchone()[0])


@pytest.mark.parametrize("engine", ENGINES)
def test_every_change_to_keys_plans_and_prices_bumps_the_version(db_path: str) -> None:
    db = open_db(db_path)
    keys, plans, prices = KeyStore(db, SECRET), PlanStore(db), PriceBook(db)
    changes = [
        lambda: plans.create("gold", {"rpm": 10}),
        lambda: keys.create("acme", plan="gold"),
        lambda: keys.update("acme", limits={"tpm": 5}),
        lambda: plans.update("gold", {"rpm": 20}),
        lambda: keys.rotate("acme"),
        lambda: keys.revoke("acme"),
        lambda: prices.set("m", Price(1, 2, 3), effective_from=10),
        lambda: db.execute("UPDATE prices SET input_per_m = 5"),
        lambda: db.execute("DELETE FROM prices"),
        lambda: db.execute("DELETE FROM keys"),
        lambda: plans.delete("gold"),
    ]
    seen = [_version(db)]
    for change in changes:
        change()
        seen.append(_version(db))
    assert all(after > before for before, after in itertools.pairwise(seen)), seen
    # Reads and usage writes do not: the caches stay warm under traffic.
    keys.list(), prices.current(), plans.list()
    assert _version(db) == seen[-1]


@pytest.fixture
def sqlite_db(tmp_path: Any) -> Iterator[SQLiteDatabase]:
    db = open_db(str(tmp_path / "gateway.db"))
    assert isinstance(db, SQLiteDatabase)
    yield db
    db.close()


class _Reads:
    """The statements a connection runs (sqlite3's trace callback)."""

    def __init__(self, db: SQLiteDatabase) -> None:
        self.sql: list[str] = []
        db.conn.set_trace_callback(self.sql.append)

    def take(self) -> list[str]:
        taken, self.sql[:] = list(self.sql), []
        return taken


def test_on_a_wal_file_the_version_is_read_only_after_a_commit(
    sqlite_db: SQLiteDatabase, tmp_path: Any
) -> None:
    other = open_db(str(tmp_path / "gateway.db"))  # another process's connection
    version = ConfigVersion(sqlite_db)
    assert version.current() == _version(sqlite_db)
    reads = _Reads(sqlite_db)

    async def scenario() -> None:
        for _ in range(3):
            version.current(), version.current()
            await asyncio.sleep(0)
        assert reads.take() == []  # nothing committed anywhere: the cached version stands
        # A commit that leaves the version alone (the ledger's writer, say) costs one read.
        other.execute("INSERT INTO meta VALUES ('a', 'b')")
        assert version.current() == _version(other)
        assert version.current() == _version(other)
        assert reads.take() == ["SELECT n FROM config_version"]
        # A change to keys, plans or prices is seen at once, without waiting for an iteration.
        before = version.current()
        PlanStore(other).create("gold", {"rpm": 10})
        assert version.current() == _version(other) > before

    asyncio.run(scenario())


def test_the_version_follows_every_commit_through_checkpoints_and_wal_restarts(
    sqlite_db: SQLiteDatabase, tmp_path: Any
) -> None:
    """Each step commits on another connection (or checkpoints its log, which a later commit
    then restarts from the beginning): the cached version must equal the database's, always."""
    version = ConfigVersion(sqlite_db)
    other = open_db(str(tmp_path / "gateway.db"))
    prices = PriceBook(other)
    rng = random.Random(11)
    steps = [
        lambda i: prices.set("m", Price(i, 0, 0), effective_from=float(i)),
        lambda i: other.execute("INSERT INTO meta VALUES (?, 'x')", [f"n{i}"]),
        lambda i: other.execute("PRAGMA wal_checkpoint(TRUNCATE)"),
        lambda i: other.execute("PRAGMA wal_checkpoint(RESTART)"),
        lambda i: other.execute("UPDATE config_version SET n = n + 1"),
    ]
    for i in range(300):
        rng.choice(steps)(i)
        assert version.current() == _version(other), i


def test_a_version_another_thread_read_after_its_commit_saves_the_requests_a_read(
    sqlite_db: SQLiteDatabase, tmp_path: Any
) -> None:
    """The ledger's writer refreshes the version on its own connection after each commit: its
    commits then cost current() no read. A change after a refresh is still seen at once."""
    writer = open_db(str(tmp_path / "gateway.db"))  # the writer thread's connection
    assert isinstance(writer, SQLiteDatabase)
    version = ConfigVersion(sqlite_db)
    version.current()
    reads = _Reads(sqlite_db)
    writer.execute("INSERT INTO meta VALUES ('a', 'b')")  # a ledger commit
    version.refresh(writer.conn)
    assert version.current() == _version(writer)
    assert reads.take() == []
    PlanStore(writer).create("gold", {"rpm": 10})  # a change after the refresh: read afresh
    assert version.current() == _version(writer)
    assert reads.take() == ["SELECT n FROM config_version"]


def test_a_refresh_inside_an_open_transaction_publishes_nothing(
    sqlite_db: SQLiteDatabase, tmp_path: Any
) -> None:
    """A connection inside a transaction reads its snapshot: a version from there under the
    header of now could be older than the header says."""
    writer, other = open_db(str(tmp_path / "gateway.db")), open_db(str(tmp_path / "gateway.db"))
    assert isinstance(writer, SQLiteDatabase)
    version = ConfigVersion(sqlite_db)
    version.current()
    writer.execute("BEGIN")
    _version(writer)  # the snapshot is taken
    PlanStore(other).create("gold", {"rpm": 10})
    version.refresh(writer.conn)
    writer.execute("COMMIT")
    assert version.current() == _version(other)


def test_refreshes_from_another_connection_never_leave_a_stale_version(
    sqlite_db: SQLiteDatabase, tmp_path: Any
) -> None:
    """Commits, checkpoints and refreshes on other connections in random order, some refreshes
    published late (after further commits): current() must equal the database's version always."""
    version = ConfigVersion(sqlite_db)
    version.current()
    writer, other = open_db(str(tmp_path / "gateway.db")), open_db(str(tmp_path / "gateway.db"))
    assert isinstance(writer, SQLiteDatabase)
    prices = PriceBook(other)
    rng = random.Random(5)
    late: list[tuple[bytes, int]] = []

    def refresh_late(i: int) -> None:  # read now, published after the next steps
        version.refresh(writer.conn)
        late.append(version._seen)

    steps = [
        lambda i: writer.execute("INSERT INTO meta VALUES (?, 'x')", [f"n{i}"]),
        lambda i: version.refresh(writer.conn),
        refresh_late,
        lambda i: setattr(version, "_seen", late.pop(0)) if late else None,
        lambda i: prices.set("m", Price(i, 0, 0), effective_from=float(i)),
        lambda i: other.execute("UPDATE config_version SET n = n + 1"),
        lambda i: other.execute("PRAGMA wal_checkpoint(RESTART)"),
    ]
    for i in range(400):
        rng.choice(steps)(i)
        assert version.current() == _version(other), i


def test_without_a_wal_index_the_version_is_read_once_per_event_loop_iteration() -> None:
    db = open_db(":memory:")
    version = ConfigVersion(db)
    assert isinstance(db, SQLiteDatabase)
    reads = _Reads(db)

    async def scenario() -> list[int]:
        counts = []
        for _ in range(3):
            version.current(), version.current(), version.current()
            counts.append(len([sql for sql in reads.take() if "config_version" in sql]))
            await asyncio.sleep(0)  # the next iteration reads again
        return counts

    assert asyncio.run(scenario()) == [1, 1, 1]


def test_a_cached_key_follows_changes_made_by_another_process(
    sqlite_db: SQLiteDatabase, tmp_path: Any
) -> None:
    store = KeyStore(sqlite_db, SECRET, version=ConfigVersion(sqlite_db))
    other = open_db(str(tmp_path / "gateway.db"))  # the CLI: another connection
    other_keys = KeyStore(other, SECRET)
    PlanStore(other).create("gold", {"rpm": 10})
    _, key = other_keys.create("acme", limits={"tpm": 100})
    reads = _Reads(sqlite_db)

    async def scenario() -> None:
        first = await store.authenticate(key)
        assert first is not None and first.limits.tpm == 100
        assert any("FROM keys" in sql for sql in reads.take())
        await asyncio.sleep(0)
        hashed: list[str] = []
        store.hash = lambda k: hashed.append(k) or KeyStore.hash(store, k)  # type: ignore[method-assign]
        assert await store.authenticate(key) == first
        assert reads.take() == []  # nothing committed since: the cache answered,
        assert hashed == []  # without even an HMAC
        assert await store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
        assert len(hashed) == 1  # a near miss is not a hit

        assert store.cached(key) == first  # the request path's answer from memory, no coroutine
        assert store.cached(key[:-1] + ("A" if key[-1] != "A" else "B")) is None

        for change, check in [
            (lambda: other_keys.update("acme", limits={"tpm": 7}), lambda p: p.limits.tpm == 7),
            (lambda: other_keys.update("acme", plan="gold"), lambda p: p.limits.rpm == 10),
            (lambda: PlanStore(other).update("gold", {"rpm": 11}), lambda p: p.limits.rpm == 11),
            (lambda: other_keys.revoke("acme"), lambda p: p is None),
        ]:
            await asyncio.sleep(0)
            change()
            await asyncio.sleep(0)
            assert store.cached(key) is None  # changed since: memory answers nothing, ...
            principal = await store.authenticate(key)  # ... the store reads afresh
            assert check(principal)
            assert store.cached(key) == principal  # and memory has it again (revoked: nothing)

    asyncio.run(scenario())


_MODELS = ["m", "n", DEFAULT_MODEL]


def _set_a_price(other: PriceBook, rng: random.Random) -> None:
    """A random price from another connection (the CLI), unless one is set at that moment."""
    model, when = rng.choice(_MODELS), float(rng.randrange(0, 1000))
    if not [p for p in other.history() if p.model == model and p.effective_from == when]:
        other.set(model, Price(rng.randrange(100), rng.randrange(100), rng.randrange(100)), when)


def _a_lookup(rng: random.Random) -> tuple[str | None, float]:
    """A model (priced, the default, none, or unpriced) and a moment, before to after them all."""
    return rng.choice([*_MODELS, None, "unpriced"]), float(rng.randrange(-10, 1100))


def test_cached_prices_match_the_database_at_every_moment(sqlite_db: SQLiteDatabase, tmp_path: Any) -> None:
    cached = PriceBook(sqlite_db, version=ConfigVersion(sqlite_db))
    other = PriceBook(open_db(str(tmp_path / "gateway.db")))
    rng = random.Random(7)

    async def scenario() -> None:
        for _ in range(40):
            _set_a_price(other, rng)
            await asyncio.sleep(0)
            for _ in range(25):
                asked, at = _a_lookup(rng)
                from_memory = cached.cached_at(asked, at)  # the request path's, without a coroutine
                assert await cached.price_at(asked, at) == other.at(asked, at), (asked, at)
                assert from_memory in (None, other.at(asked, at)), (asked, at)
                assert cached.cached_at(asked, at) == other.at(asked, at), (asked, at)

    asyncio.run(scenario())


@pytest.mark.parametrize("engine", ["postgresql"])
def test_on_postgresql_prices_cached_under_the_keys_version_match_the_database(db_path: str) -> None:
    """PostgreSQL keeps no version in memory: each request's key is read with the version, and
    its price is cached under that version. Prices set from another connection (the CLI, another
    replica), each followed by requests: every answer is the database's at that moment."""
    db = open_db(db_path)
    book = PriceBook(db)
    other = PriceBook(open_db(db_path))
    rng = random.Random(11)
    reads: list[int] = []
    read = db.afetchall

    async def counted(sql: str, params: Any = ()) -> Any:
        reads.append(1)
        return await read(sql, params)

    db.afetchall = counted  # type: ignore[method-assign]
    asked: list[int] = []

    async def scenario() -> None:
        for _ in range(30):
            _set_a_price(other, rng)
            for _ in range(10):
                version = _version(other._db)  # as the key's statement reads it
                name, at = _a_lookup(rng)
                assert await book.price_at(name, at, version) == other.at(name, at), (name, at)
                asked.append(1)

    asyncio.run(scenario())
    assert 0 < len(reads) < len(asked) / 2, (len(reads), len(asked))  # cached; read after changes


Proxied = tuple[TestClient, list[httpx.Request], Any, KeyStore]


@pytest.fixture
def proxy_app(make_settings: Any) -> Iterator[Proxied]:
    """A gateway in front of a mock backend that answers 11 prompt and 5 output tokens, and
    another connection to its database (the CLI, in another process)."""
    seen: list[httpx.Request] = []

    def backend(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, json={"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 5}}
        )

    settings = make_settings()
    other = open_db(settings.db)
    app = create_app(settings, transport=httpx.MockTransport(backend))
    with TestClient(app) as client:
        yield client, seen, other, KeyStore(other, load_key_secret(settings))


def _post(client: TestClient, key: str) -> httpx.Response:
    body = {"model": "mistralai/Mistral-7B-Instruct-v0.3", "messages": [{"role": "user", "content": "hi"}]}
    return client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


@pytest.mark.parametrize("engine", ["postgresql"])
def test_on_postgresql_a_request_reads_its_price_only_after_a_change(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each request's key read carries the version: the price is read on the first request and
    after a change, not on every request (it was a round trip each, a fifth of a replica's
    throughput)."""
    from gateway.postgres import PostgresDatabase

    reads: list[str] = []
    read = PostgresDatabase.afetchall

    async def counted(self: PostgresDatabase, sql: str, params: Any = ()) -> Any:
        reads.append(sql)
        return await read(self, sql, params)

    monkeypatch.setattr(PostgresDatabase, "afetchall", counted)
    settings = make_settings()
    other = open_db(settings.db)
    backend = lambda r: httpx.Response(200, json={"choices": [], "usage": {"prompt_tokens": 11}})  # noqa: E731
    with TestClient(create_app(settings, transport=httpx.MockTransport(backend))) as client:
        _, key = KeyStore(other, load_key_secret(settings)).create("acme", limits={"rpm": 1000})
        PriceBook(other).set("*", Price(1_000_000, 0, 0), effective_from=0)
        for _ in range(5):
            assert _post(client, key).status_code == 200
        assert len(reads) == 1
        PriceBook(other).set("*", Price(2_000_000, 0, 0), effective_from=1)
        for _ in range(5):
            assert _post(client, key).status_code == 200
        assert len(reads) == 2
    assert [r["cost_micros"] for r in settled_rows(other.target)] == [11] * 5 + [22] * 5


@pytest.mark.parametrize("engine", ENGINES)
def test_a_revocation_elsewhere_applies_to_the_very_next_proxied_request(proxy_app: Proxied) -> None:
    client, seen, other, keys = proxy_app
    _, key = keys.create("acme", limits={"rpm": 1000})
    for _ in range(6):
        assert _post(client, key).status_code == 200  # the key is read once, then cached
    keys.revoke("acme")  # the CLI, in another process
    refused = _post(client, key)
    assert refused.status_code == 401 and len(seen) == 6  # never forwarded
    assert len(settled_rows(other.target)) == 6  # and no ledger row for it


@pytest.mark.parametrize("engine", ENGINES)
def test_a_price_or_limit_changed_elsewhere_applies_to_the_next_request(proxy_app: Proxied) -> None:
    client, seen, other, keys = proxy_app
    _, key = keys.create("acme", limits={"tpm": 100_000})
    PriceBook(other).set("*", Price(1_000_000, 0, 0), effective_from=0)
    assert _post(client, key).status_code == 200
    PriceBook(other).set("*", Price(3_000_000, 0, 0), effective_from=1)
    assert _post(client, key).status_code == 200
    costs = [r["cost_micros"] for r in settled_rows(other.target)]
    assert costs == [11, 33]  # 11 prompt tokens at 1, then 3, micro-units per token
    keys.update("acme", limits={"tpm": 10})  # too small for the request (its prompt + output cap)
    refused = _post(client, key)
    assert refused.status_code == 429 and refused.json()["error"]["param"] == "tpm"
    assert len(seen) == 2
