from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from gateway.db import is_postgres, open_db
from gateway.keys import KeyError_, KeyStore, Principal, load_key_secret
from gateway.settings import Settings
from tests.conftest import ENGINES


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return str(request.param)


def _auth(store: KeyStore, key: str) -> Principal | None:
    async def run() -> Principal | None:
        try:
            return await store.authenticate(key)
        finally:
            # Close the read pool in the loop that owns it: asyncio.run cannot always cancel
            # psycopg_pool's workers (they survive a cancel while connecting) and would wait forever.
            await store._db.aclose()

    return asyncio.run(run())


@pytest.fixture
def store(db_path: str) -> KeyStore:
    return KeyStore(open_db(db_path), b"server-secret")


def test_create_authenticate_and_hash_only(store: KeyStore, db_path: str) -> None:
    info, secret = store.create("acme")
    assert secret.startswith("gw-") and len(secret) == 46
    principal = _auth(store, secret)
    assert principal is not None and (principal.key_id, principal.name) == (info.id, "acme")
    if is_postgres(db_path):
        # Every byte PostgreSQL holds of the table, as text.
        db = open_db(db_path)
        raw = str(db.query("SELECT * FROM keys")).encode()
        db.close()
    else:
        raw = Path(db_path).read_bytes() + Path(db_path + "-wal").read_bytes()
    assert secret.encode() not in raw
    assert store.hash(secret).encode() in raw


def test_hash_is_keyed(db_path: str) -> None:
    db = open_db(db_path)
    a, b = KeyStore(db, b"one"), KeyStore(db, b"two")
    assert a.hash("gw-x") != b.hash("gw-x")


def test_unknown_malformed_and_revoked_keys_fail(store: KeyStore) -> None:
    info, secret = store.create("acme")
    assert _auth(store, "gw-" + "A" * 43) is None
    assert _auth(store, "not-a-key") is None
    assert _auth(store, "") is None
    store.revoke(info.id)
    assert _auth(store, secret) is None
    assert not store.get("acme").active


def test_rotate_replaces_the_secret(store: KeyStore) -> None:
    info, old = store.create("acme")
    rotated, new = store.rotate("acme")
    assert rotated.id == info.id and new != old
    assert _auth(store, old) is None
    assert _auth(store, new) is not None


def test_names_are_unique_and_checked(store: KeyStore) -> None:
    store.create("acme")
    with pytest.raises(KeyError_, match="already exists"):
        store.create("acme")
    with pytest.raises(KeyError_, match="invalid key name"):
        store.create("bad name!")
    with pytest.raises(KeyError_, match="no key"):
        store.revoke("999")


def test_secret_file_is_created_once_with_owner_only_mode(tmp_path: Path) -> None:
    settings = Settings(db=str(tmp_path / "g.db"))
    first = load_key_secret(settings)
    assert load_key_secret(settings) == first
    mode = stat.S_IMODE(os.stat(settings.key_secret_file).st_mode)
    assert mode == 0o600
    assert load_key_secret(Settings(db=settings.db, key_secret="explicit")) == b"explicit"


@pytest.mark.parametrize("engine", ["postgresql"])  # SQLite: the file test above
def test_replicas_share_one_secret_on_postgresql(engine: str, db_path: str) -> None:
    """Every replica (and the CLI on any host) must hash keys alike without a shared file."""
    first = load_key_secret(Settings(db=db_path))
    second = load_key_secret(Settings(db=db_path))
    assert first == second and len(first) == 64
    db = open_db(db_path)
    key_secret = db.execute("SELECT value FROM meta WHERE name = 'key_secret'").fetchone()[0]
    db.close()
    assert key_secret.encode() == first
