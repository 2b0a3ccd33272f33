"""Customer API keys: minted once, stored only as a keyed hash, looked up per request.

A key is ``gw-`` followed by 43 URL-safe characters (256 random bits). The database keeps
``HMAC-SHA256(server_secret, key)``: a stolen database alone does not let anyone test guesses.
Lookup is by that hash on an indexed column, so revocation applies from the next request.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from gateway.settings import Settings

__all__ = ["KeyError_", "KeyInfo", "KeyStore", "Principal", "load_key_secret"]

KEY_PREFIX = "gw-"
_KEY_RE = re.compile(r"^gw-[A-Za-z0-9_-]{43}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class KeyError_(Exception):
    """A key operation cannot be done (unknown key, duplicate name, bad name)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the customer key a request authenticated with."""

    key_id: int
    name: str


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: int
    name: str
    prefix: str
    created_at: float
    revoked_at: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "created_at": int(self.created_at),
            "revoked_at": None if self.revoked_at is None else int(self.revoked_at),
            "active": self.active,
        }


def load_key_secret(settings: Settings) -> bytes:
    """The server secret for key hashes: from settings, else a 0600 file beside the database."""
    if settings.key_secret:
        return settings.key_secret.encode()
    path = settings.key_secret_file
    if settings.db == ":memory:":
        return b"in-memory"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return Path(path).read_bytes().strip()
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
    return secret


class KeyStore:
    def __init__(self, db: sqlite_utils.Database, secret: bytes) -> None:
        self._db = db
        self._secret = secret

    def hash(self, key: str) -> str:
        return hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()

    def create(self, name: str) -> tuple[KeyInfo, str]:
        """Mint a key; the secret is returned here and never again."""
        if not _NAME_RE.match(name):
            raise KeyError_(
                f"invalid key name {name!r}: 1-64 characters, letters, digits and . _ @ -, "
                "starting with a letter or digit"
            )
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        try:
            cursor = self._db.execute(
                "INSERT INTO keys (name, prefix, hash, created_at) VALUES (?, ?, ?, ?)",
                [name, secret[:10], self.hash(secret), now],
            )
        except sqlite3.IntegrityError:
            raise KeyError_(f"a key named {name!r} already exists") from None
        key_id = cursor.lastrowid
        assert key_id is not None
        return KeyInfo(key_id, name, secret[:10], now, None), secret

    def rotate(self, ref: str | int) -> tuple[KeyInfo, str]:
        """Replace a key's secret (same id, name and usage); the old secret stops working at once."""
        info = self.get(ref)
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        self._db.execute(
            "UPDATE keys SET prefix = ?, hash = ?, revoked_at = NULL WHERE id = ?",
            [secret[:10], self.hash(secret), info.id],
        )
        return self.get(info.id), secret

    def revoke(self, ref: str | int) -> KeyInfo:
        info = self.get(ref)
        if info.active:
            self._db.execute("UPDATE keys SET revoked_at = ? WHERE id = ?", [time.time(), info.id])
        return self.get(info.id)

    def get(self, ref: str | int) -> KeyInfo:
        """A key by id (an int or a string of digits) or by name."""
        if isinstance(ref, int) or ref.isdigit():
            row = self._db.execute(_SELECT + " WHERE id = ?", [int(ref)]).fetchone()
        else:
            row = self._db.execute(_SELECT + " WHERE name = ?", [ref]).fetchone()
        if row is None:
            raise KeyError_(f"no key {ref!r}")
        return KeyInfo(*row)

    def list(self) -> list[KeyInfo]:
        return [KeyInfo(*row) for row in self._db.execute(_SELECT + " ORDER BY id").fetchall()]

    def authenticate(self, key: str) -> Principal | None:
        """The active key's principal, or None. Malformed keys never reach the database."""
        if not _KEY_RE.match(key):
            return None
        digest = self.hash(key)
        row = self._db.execute(
            "SELECT id, name, hash FROM keys WHERE hash = ? AND revoked_at IS NULL", [digest]
        ).fetchone()
        if row is None or not hmac.compare_digest(row[2], digest):
            return None
        return Principal(row[0], row[1])


_SELECT = "SELECT id, name, prefix, created_at, revoked_at FROM keys"
