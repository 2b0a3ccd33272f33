"""The ledger database: SQLite (embedded, one host) or PostgreSQL (shared by replicas).

Every module talks to a :class:`Database`: ``execute``/``query`` with SQLite's ``?`` and
``:name`` placeholders (translated for PostgreSQL), ``transaction()``, and ``afetchone`` for the
reads on the request path (inline on SQLite, on an async pool on PostgreSQL). The few SQL
fragments that differ between the engines live on :class:`Dialect`.

SQLite runs in WAL with ``synchronous=NORMAL``: a commit survives the process being killed (it
is in the WAL file before ``commit()`` returns), readers never wait for the writer, and commits
do not fsync one by one. A power cut may lose the last commits; a SIGKILL loses nothing.
"""

from __future__ import annotations

import abc
import contextlib
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any


def _sqlite_utils() -> ModuleType:
    """sqlite-utils, kept from importing numpy. It imports numpy where installed (mistral-common
    installs it) only to accept numpy values, which the gateway never writes, and numpy would
    cost every gateway process 12 MB, a tenth of a second at start and a BLAS thread pool.
    A process that imported numpy before keeps it (and sqlite-utils sees it); numpy stays
    importable afterwards."""
    hold_back = "sqlite_utils" not in sys.modules and "numpy" not in sys.modules
    if hold_back:
        sys.modules["numpy"] = None  # type: ignore[assignment]  # import numpy -> ImportError
    try:
        import sqlite_utils
    finally:
        if hold_back:
            del sys.modules["numpy"]
    return sqlite_utils


if TYPE_CHECKING:
    import sqlite_utils
else:
    sqlite_utils = _sqlite_utils()

__all__ = [
    "ROLLUP_UPSERT",
    "SCHEMA_VERSION",
    "SQLITE",
    "Database",
    "Dialect",
    "IntegrityError",
    "SQLiteDatabase",
    "is_postgres",
    "open_db",
]

Params = Sequence[Any] | dict[str, Any]


class IntegrityError(Exception):
    """A uniqueness or reference constraint refused a write (either engine)."""


# Each entry moves the schema one version up; never edit an entry that has shipped.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE keys (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            hash TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            revoked_at REAL
        )""",
        """CREATE TABLE requests (
            id TEXT PRIMARY KEY,
            key_id INTEGER NOT NULL REFERENCES keys(id),
            model TEXT,
            route TEXT NOT NULL,
            stream INTEGER NOT NULL DEFAULT 0,
            state TEXT NOT NULL,
            status INTEGER,
            started_at REAL NOT NULL,
            upstream_ms REAL,
            first_byte_ms REAL,
            duration_ms REAL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            tool_tokens INTEGER,
            estimated INTEGER NOT NULL DEFAULT 0,
            error TEXT
        )""",
        "CREATE INDEX requests_key_time ON requests(key_id, started_at)",
        "CREATE INDEX requests_pending ON requests(state) WHERE state = 'pending'",
    ),
    (
        # The gateway's own count of the whole prompt: the cross-check against the backend's.
        "ALTER TABLE requests ADD COLUMN counted_prompt_tokens INTEGER",
    ),
    (
        # Quotas: named plans, per-key overrides, prices with effective dates (integer micro-units).
        """CREATE TABLE plans (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            tokens_per_day INTEGER,
            tokens_per_month INTEGER,
            spend_per_month INTEGER,
            rpm INTEGER,
            tpm INTEGER,
            max_concurrent INTEGER,
            created_at REAL NOT NULL
        )""",
        "ALTER TABLE keys ADD COLUMN plan_id INTEGER REFERENCES plans(id)",
        "ALTER TABLE keys ADD COLUMN tokens_per_day INTEGER",
        "ALTER TABLE keys ADD COLUMN tokens_per_month INTEGER",
        "ALTER TABLE keys ADD COLUMN spend_per_month INTEGER",
        "ALTER TABLE keys ADD COLUMN rpm INTEGER",
        "ALTER TABLE keys ADD COLUMN tpm INTEGER",
        "ALTER TABLE keys ADD COLUMN max_concurrent INTEGER",
        """CREATE TABLE prices (
            id INTEGER PRIMARY KEY,
            model TEXT NOT NULL,
            input_per_m INTEGER NOT NULL,
            tool_per_m INTEGER NOT NULL,
            output_per_m INTEGER NOT NULL,
            effective_from REAL NOT NULL,
            UNIQUE (model, effective_from)
        )""",
        "ALTER TABLE requests ADD COLUMN cost_micros INTEGER",
        "ALTER TABLE requests ADD COLUMN reserved_tokens INTEGER",
    ),
    (
        # Daily rollup per key and model, kept by the ledger writer as rows settle: a month of
        # daily usage is ~30 rows per model to read, however big the ledger grows.
        """CREATE TABLE usage_daily (
            key_id INTEGER NOT NULL,
            day TEXT NOT NULL,
            model TEXT NOT NULL,
            requests INTEGER NOT NULL,
            input_tokens INTEGER NOT NULL,
            tool_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            cost_micros INTEGER NOT NULL,
            PRIMARY KEY (key_id, day, model)
        ) WITHOUT ROWID""",
        "CREATE INDEX usage_daily_day ON usage_daily(day)",
        "CREATE INDEX requests_time ON requests(started_at)",
        """INSERT INTO usage_daily
           SELECT key_id, strftime('%Y-%m-%d', started_at, 'unixepoch'), coalesce(model, ''), count(*),
                  sum(coalesce(prompt_tokens, 0)), sum(coalesce(tool_tokens, 0)),
                  sum(coalesce(completion_tokens, 0)), sum(coalesce(cost_micros, 0))
           FROM requests
           WHERE state != 'pending' AND (prompt_tokens IS NOT NULL OR completion_tokens IS NOT NULL)
           GROUP BY 1, 2, 3""",
    ),
    (
        # Replicas: facts they must agree on (the key-hash secret, on PostgreSQL), which process
        # owns a pending row, and when each process was last alive (so that another replica can
        # recover the rows of one that died).
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "ALTER TABLE requests ADD COLUMN owner TEXT",
        "CREATE TABLE replicas (instance TEXT PRIMARY KEY, seen_at REAL NOT NULL)",
    ),
    (
        # A counter every change to keys, plans or prices bumps, whoever makes it (the gateway,
        # the CLI, plain SQL): the request path caches keys and prices for as long as it holds.
        "CREATE TABLE config_version (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL)",
        "INSERT INTO config_version VALUES (1, 0)",
        *(
            f"CREATE TRIGGER {table}_{op.lower()}_bumps AFTER {op} ON {table} "
            "BEGIN UPDATE config_version SET n = n + 1; END"
            for table in ("keys", "plans", "prices")
            for op in ("INSERT", "UPDATE", "DELETE")
        ),
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)

# Rollup upsert shared by both engines: the target table is named on the right-hand side, which
# PostgreSQL requires and SQLite accepts.
ROLLUP_UPSERT = """ON CONFLICT (key_id, day, model) DO UPDATE SET
        requests = usage_daily.requests + excluded.requests,
        input_tokens = usage_daily.input_tokens + excluded.input_tokens,
        tool_tokens = usage_daily.tool_tokens + excluded.tool_tokens,
        output_tokens = usage_daily.output_tokens + excluded.output_tokens,
        cost_micros = usage_daily.cost_micros + excluded.cost_micros"""

_BILLED = "(prompt_tokens IS NOT NULL OR completion_tokens IS NOT NULL)"


@dataclass(frozen=True)
class Dialect:
    """The SQL that differs between the engines."""

    name: str
    # The UTC day ('YYYY-MM-DD') of a unix-time expression, and back to the day's start.
    day_of: str
    day_start: str
    # floor() of a non-negative float expression, as an integer.
    floor: str

    def rollup(self) -> str:
        """Adds one settled row (by id) to the daily rollup; a row without usage is no billed request."""
        return f"""INSERT INTO usage_daily
    SELECT key_id, {self.day_of.format("started_at")}, coalesce(model, ''), 1,
           coalesce(prompt_tokens, 0), coalesce(tool_tokens, 0), coalesce(completion_tokens, 0),
           coalesce(cost_micros, 0)
    FROM requests WHERE id = ? AND {_BILLED}
    {ROLLUP_UPSERT}"""

    def rollup_many(self) -> str:
        """Adds the settled rows whose ids are in a JSON array to the daily rollup, in one
        statement (SQLite's json_each): what :meth:`rollup` does for each of them."""
        return f"""INSERT INTO usage_daily
    SELECT key_id, {self.day_of.format("started_at")}, coalesce(model, ''), count(*),
           sum(coalesce(prompt_tokens, 0)), sum(coalesce(tool_tokens, 0)),
           sum(coalesce(completion_tokens, 0)), sum(coalesce(cost_micros, 0))
    FROM requests WHERE id IN (SELECT value FROM json_each(?)) AND {_BILLED}
    GROUP BY 1, 2, 3
    {ROLLUP_UPSERT}"""


SQLITE = Dialect(
    name="sqlite",
    day_of="strftime('%Y-%m-%d', {}, 'unixepoch')",
    day_start="CAST(strftime('%s', {}) AS INTEGER)",
    floor="CAST({} AS INTEGER)",
)


class Database(abc.ABC):
    """What the gateway needs of a database connection, on either engine."""

    dialect: Dialect
    target: str

    @abc.abstractmethod
    def execute(self, sql: str, params: Params = ()) -> Any:
        """Run one statement (autocommit unless inside :meth:`transaction`); a DB-API cursor."""

    def query(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        cursor = self.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    @abc.abstractmethod
    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """Everything inside commits together, or not at all."""

    async def afetchone(self, sql: str, params: Params = ()) -> tuple[Any, ...] | None:
        """One row, for the request path: never blocks the event loop for a network round trip."""
        row = self.execute(sql, params).fetchone()
        return None if row is None else tuple(row)

    async def afetchall(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """Every row, for the request path (as :meth:`afetchone`)."""
        return [tuple(row) for row in self.execute(sql, params).fetchall()]

    async def aclose(self) -> None:  # noqa: B027 - only engines with a read pool have one to close
        """Release what :meth:`afetchone` opened."""

    @abc.abstractmethod
    def close(self) -> None: ...


class SQLiteDatabase(Database):
    dialect = SQLITE

    def __init__(self, target: str, db: sqlite_utils.Database) -> None:
        self.target = target
        self.db = db
        self.conn: sqlite3.Connection = db.conn

    def execute(self, sql: str, params: Params = ()) -> Any:
        try:
            return self.conn.execute(sql, params)
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc

    def query(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        return list(self.db.query(sql, params))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


def is_postgres(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


def open_db(target: str, *, migrate: bool = True, check_same_thread: bool = True) -> Database:
    """Open the gateway's database: a SQLite file (created if needed) or a PostgreSQL URL."""
    if is_postgres(target):
        from gateway.postgres import open_postgres

        return open_postgres(target, migrate=migrate)
    if target != ":memory:":
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(target, check_same_thread=check_same_thread, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = NORMAL")
    db = sqlite_utils.Database(conn)
    if target != ":memory:":
        db.enable_wal()
    if migrate:
        _migrate(conn)
    return SQLiteDatabase(target, db)


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema version {version} is newer than this gateway's ({SCHEMA_VERSION})"
            )
        for statements in MIGRATIONS[version:]:
            for sql in statements:
                conn.execute(sql)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
