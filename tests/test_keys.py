from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gateway.db import open_db
from gateway.keys import KeyError_, KeyStore, load_key_secret
from gateway.settings import Settings


@pytest.fixture
def store(db_path: str) -> KeyStore:
    return KeyStore(open_db(db_path), b"server-secret")


def test_create_authenticate_and_hash_only(store: KeyStore, db_path: str) -> None:
    info, secret = store.create("acme")
    assert secret.startswith("gw-") and len(secret) == 46
    principal = store.authenticate(secret)
    assert principal is not None and (principal.key_id, principal.name) == (info.id, "acme")
    raw = Path(db_path).read_bytes() + Path(db_path + "-wal").read_bytes()
    assert secret.encode() not in raw
    assert store.hash(secret).encode() in raw


def test_hash_is_keyed(db_path: str) -> None:
    db = open_db(db_path)
    a, b = KeyStore(db, b"one"), KeyStore(db, b"two")
    assert a.hash("gw-x") != b.hash("gw-x")


def test_unknown_malformed_and_revoked_keys_fail(store: KeyStore) -> None:
    info, secret = store.create("acme")
    assert store.authenticate("gw-" + "A" * 43) is None
    assert store.authenticate("not-a-key") is None
    assert store.authenticate("") is None
    store.revoke(info.id)
    assert store.authenticate(secret) is None
    assert not store.get("acme").active


def test_rotate_replaces_the_secret(store: KeyStore) -> None:
    info, old = store.create("acme")
    rotated, new = store.rotate("acme")
    assert rotated.id == info.id and new != old
    assert store.authenticate(old) is None
    assert store.authenticate(new) is not None


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
