from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.app import create_app
from gateway.db import is_postgres, open_db
from gateway.emulator.app import create_emulator_app
from gateway.emulator.seed import SEED_MESSAGES, SEED_MODEL, SEED_TOOLS
from gateway.journal import Journal
from gateway.keys import KeyStore, load_key_secret
from gateway.settings import Settings
from tests.servers import ServerThread
from tests.stores import PostgresServer, RedisServer

__all__ = [
    "CORPUS",
    "ENGINES",
    "SEED_MESSAGES",
    "SEED_MODEL",
    "SEED_TOOLS",
    "corpus_tools",
    "ledger_rows",
    "settled_rows",
]

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "seal_tools.jsonl"


ENGINES = ("sqlite", "postgresql")


@pytest.fixture
def engine() -> str:
    """The ledger's engine; modules whose tests must hold on both override this with ENGINES."""
    return "sqlite"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def db_path(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The test's ledger: a SQLite file, or a fresh database on the session's PostgreSQL."""
    if engine == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        return server.create_database()
    return str(tmp_path / "gateway.db")


@pytest.fixture
def make_settings(db_path: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {"db": db_path, "upstream_url": "http://upstream.test/v1/openai"}
        return Settings(**{**base, **overrides})

    return make


@pytest.fixture
def new_key(make_settings: Callable[..., Settings]) -> Callable[[str], str]:
    """Mint a key in the test database; returns its secret."""

    def mint(name: str = "acme") -> str:
        settings = make_settings()
        db = open_db(settings.db)
        try:
            return KeyStore(db, load_key_secret(settings)).create(name)[1]
        finally:
            db.close()

    return mint


@pytest.fixture(scope="session")
def emulator() -> Iterator[ServerThread]:
    with ServerThread(create_emulator_app()) as server:
        yield server


@pytest.fixture
def live_gateway(
    make_settings: Callable[..., Settings], emulator: ServerThread
) -> Callable[..., ServerThread]:
    """Start the gateway on a real loopback port in front of the emulator (stopped after the test)."""
    started: list[ServerThread] = []

    def start(**overrides: Any) -> ServerThread:
        settings = make_settings(upstream_url=emulator.url + "/v1/openai", **overrides)
        server = ServerThread(create_app(settings)).__enter__()
        started.append(server)
        return server

    yield start  # type: ignore[misc]
    for server in started:
        server.__exit__(None, None, None)


def ledger_rows(db_path: str) -> list[dict[str, Any]]:
    db = open_db(db_path, migrate=False)
    try:
        return list(db.query("SELECT * FROM requests ORDER BY started_at"))
    finally:
        db.close()


def settled_rows(db_path: str, timeout: float = 10) -> list[dict[str, Any]]:
    """The ledger once every request it knows of is settled: a running gateway writes a row a
    few tens of milliseconds after its response (the ledger's writer lets a batch gather), so
    its rows are read through this. On SQLite every forwarded request is first a line of the
    ledger's journal: each must be in the database, none pending."""
    deadline = time.monotonic() + timeout
    journal = None if is_postgres(db_path) else Journal(db_path + "-ledger")
    while True:
        rows = ledger_rows(db_path)
        known = {r["id"] for r in rows}
        journaled = {entry[0] for entry in journal.entries()} if journal is not None else set()
        if (journaled <= known and all(r["state"] != "pending" for r in rows)) or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


def corpus_tools(n: int, offset: int = 0) -> list[dict[str, Any]]:
    with CORPUS.open() as fh:
        lines = fh.readlines()
    return [json.loads(lines[(offset + i) % len(lines)]) for i in range(n)]
