"""The SQLite file: opening it the same way everywhere, and its schema migrations.

WAL with ``synchronous=NORMAL``: a commit survives the process being killed (it is in the
WAL file before ``commit()`` returns), readers never wait for the writer, and commits do not
fsync one by one. A power cut may lose the last commits; a SIGKILL loses nothing.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlite_utils

__all__ = ["ROLLUP", "SCHEMA_VERSION", "open_db"]

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
)

# Adds one settled row (by id) to the daily rollup; a row without usage is no billed request.
ROLLUP = """INSERT INTO usage_daily
    SELECT key_id, strftime('%Y-%m-%d', started_at, 'unixepoch'), coalesce(model, ''), 1,
           coalesce(prompt_tokens, 0), coalesce(tool_tokens, 0), coalesce(completion_tokens, 0),
           coalesce(cost_micros, 0)
    FROM requests WHERE id = ? AND (prompt_tokens IS NOT NULL OR completion_tokens IS NOT NULL)
    ON CONFLICT (key_id, day, model) DO UPDATE SET
        requests = requests + excluded.requests,
        input_tokens = input_tokens + excluded.input_tokens,
        tool_tokens = tool_tokens + excluded.tool_tokens,
        output_tokens = output_tokens + excluded.output_tokens,
        cost_micros = cost_micros + excluded.cost_micros"""
SCHEMA_VERSION = len(MIGRATIONS)


def open_db(path: str, *, migrate: bool = True, check_same_thread: bool = True) -> sqlite_utils.Database:
    """Open (creating if needed) the gateway's database with the pragmas every connection needs."""
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=check_same_thread, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = NORMAL")
    db = sqlite_utils.Database(conn)
    if path != ":memory:":
        db.enable_wal()
    if migrate:
        _migrate(conn)
    return db


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
