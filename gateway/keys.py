"""Customer API keys: minted once, stored only as a keyed hash, looked up per request.

A key is ``gw-`` followed by 43 URL-safe characters (256 random bits). The database keeps
``HMAC-SHA256(server_secret, key)``: a stolen database alone does not let anyone test guesses.
Lookup is by that hash on an indexed column; with a :class:`ConfigVersion` (SQLite) the
principals found are cached for as long as no key, plan or price changes, so revocation still
applies from the next request.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config_version import ConfigVersion, VersionedCache
from gateway.db import Database, IntegrityError, is_postgres, open_db
from gateway.limits import LIMIT_NAMES, MAX_VALUE, NO_LIMITS, Limits
from gateway.settings import Settings

__all__ = ["KeyError_", "KeyInfo", "KeyStore", "Principal", "load_key_secret"]

KEY_PREFIX = "gw-"
_KEY_RE = re.compile(r"^gw-[A-Za-z0-9_-]{43}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class KeyError_(Exception):
    """A key operation cannot be done (unknown key, duplicate name, bad name)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the customer key a request authenticated with, and its effective limits."""

    key_id: int
    name: str
    limits: Limits = NO_LIMITS
    plan: str | None = None
    # The configuration version the key was read under (None: not versioned, as on PostgreSQL).
    version: int | None = None


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: int
    name: str
    prefix: str
    created_at: float
    revoked_at: float | None
    plan: str | None = None
    own_limits: Limits = NO_LIMITS  # set on the key itself
    limits: Limits = NO_LIMITS  # effective: the key's own, else its plan's

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
            "plan": self.plan,
            "limits": self.limits.as_dict(),
        }


def load_key_secret(settings: Settings) -> bytes:
    """The server secret for key hashes: from settings, else kept with the ledger.

    SQLite: a 0600 file beside the database. PostgreSQL: a row of the ``meta`` table, so that
    every replica (and the CLI on any host) hashes keys alike."""
    if settings.key_secret:
        return settings.key_secret.encode()
    if is_postgres(settings.db):
        db = open_db(settings.db)
        try:
            return _shared_secret(db)
        finally:
            db.close()
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


def _shared_secret(db: Database) -> bytes:
    db.execute(
        "INSERT INTO meta (name, value) VALUES ('key_secret', ?) ON CONFLICT (name) DO NOTHING",
        [secrets.token_hex(32)],
    )
    row = db.execute("SELECT value FROM meta WHERE name = 'key_secret'").fetchone()
    return str(row[0]).encode()


class KeyStore:
    def __init__(self, db: Database, secret: bytes, *, version: ConfigVersion | None = None) -> None:
        self._db = db
        self._secret = secret
        self._version = version
        self._cache: VersionedCache[str, Principal] = VersionedCache()

    def hash(self, key: str) -> str:
        return hmac.digest(self._secret, key.encode(), "sha256").hex()  # C one-shot: no HMAC object

    def create(
        self, name: str, *, plan: str | None = None, limits: dict[str, int | None] | None = None
    ) -> tuple[KeyInfo, str]:
        """Mint a key; the secret is returned here and never again."""
        if not _NAME_RE.match(name):
            raise KeyError_(
                f"invalid key name {name!r}: 1-64 characters, letters, digits and . _ @ -, "
                "starting with a letter or digit"
            )
        plan_id = self._plan_id(plan)
        values = _limit_values(limits)
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        try:
            cursor = self._db.execute(
                f"INSERT INTO keys (name, prefix, hash, created_at, plan_id, {', '.join(LIMIT_NAMES)}) "
                f"VALUES (?, ?, ?, ?, ?, {', '.join('?' * len(LIMIT_NAMES))}) RETURNING id",
                [name, secret[:10], self.hash(secret), now, plan_id, *(values.get(n) for n in LIMIT_NAMES)],
            )
        except IntegrityError:
            raise KeyError_(f"a key named {name!r} already exists") from None
        return self.get(int(cursor.fetchone()[0])), secret

    def update(
        self,
        ref: str | int,
        *,
        plan: str | None = None,
        clear_plan: bool = False,
        limits: dict[str, int | None] | None = None,
    ) -> KeyInfo:
        """Change a key's plan or its own limits (None clears one); applies from the next request."""
        info = self.get(ref)
        assignments: dict[str, int | None] = dict(_limit_values(limits))
        if plan is not None:
            assignments["plan_id"] = self._plan_id(plan)
        elif clear_plan:
            assignments["plan_id"] = None
        if assignments:
            sql = ", ".join(f"{column} = ?" for column in assignments)
            self._db.execute(f"UPDATE keys SET {sql} WHERE id = ?", [*assignments.values(), info.id])
        return self.get(info.id)

    def _plan_id(self, plan: str | None) -> int | None:
        if plan is None:
            return None
        row = self._db.execute("SELECT id FROM plans WHERE name = ?", [plan]).fetchone()
        if row is None:
            raise KeyError_(f"no plan {plan!r} (create it with `gateway plans create {plan}`)")
        return int(row[0])

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
            row = self._db.execute(_SELECT + _FROM + " WHERE k.id = ?", [int(ref)]).fetchone()
        else:
            row = self._db.execute(_SELECT + _FROM + " WHERE k.name = ?", [ref]).fetchone()
        if row is None:
            raise KeyError_(f"no key {ref!r}")
        return _info(row)

    def list(self) -> list[KeyInfo]:
        return [_info(row) for row in self._db.execute(_SELECT + _FROM + " ORDER BY k.id").fetchall()]

    def cached(self, key: str) -> Principal | None:
        """The principal :meth:`authenticate` would give from memory, without a coroutine (the
        request path's usual case); None when it would have to read (or cannot keep it)."""
        version = self._version
        # Keyed by the key itself: a hit costs a dict lookup, not an HMAC (OpenSSL's, cold in
        # the CPU's caches between requests, cost a twentieth of a request).
        return None if version is None else self._cache.get(key, version.current())

    async def authenticate(self, key: str) -> Principal | None:
        """The active key's principal, or None. Malformed keys never reach the database."""
        hit = self.cached(key)
        if hit is not None:
            return hit
        if not _KEY_RE.match(key):
            return None
        digest = self.hash(key)
        if self._version is None:
            # No version in memory (PostgreSQL: it would cost the round trip it saves): the key
            # is read every time, with the version in the same statement. The request's price
            # is then cached under it (PriceBook.price_at): one round trip fewer per request.
            row = await self._db.afetchone(_AUTHENTICATE_VERSIONED, [digest])
            if row is None or not hmac.compare_digest(row[-1], digest):
                return None
            info = _info(row[:-2])
            return Principal(info.id, info.name, info.limits, info.plan, int(row[-2]))
        # The version is read before the row: a change landing in between leaves an entry
        # tagged with the older version, which the next request re-reads.
        read_under = self._version.current()
        row = await self._db.afetchone(_AUTHENTICATE, [digest])
        if row is None or not hmac.compare_digest(row[-1], digest):
            return None
        info = _info(row[:-1])
        principal = Principal(info.id, info.name, info.limits, info.plan, read_under)
        self._cache.put(key, read_under, principal)  # active keys only: unknown ones would fill memory
        return principal


_COLUMNS = ", ".join(
    ["k.id", "k.name", "k.prefix", "k.created_at", "k.revoked_at", "p.name"]
    + [f"k.{n}" for n in LIMIT_NAMES]
    + [f"p.{n}" for n in LIMIT_NAMES]
)
_SELECT = f"SELECT {_COLUMNS}"
_FROM = " FROM keys k LEFT JOIN plans p ON p.id = k.plan_id"
_ACTIVE = " WHERE k.hash = ? AND k.revoked_at IS NULL"
_AUTHENTICATE = _SELECT + ", k.hash" + _FROM + _ACTIVE
_AUTHENTICATE_VERSIONED = _SELECT + ", (SELECT n FROM config_version), k.hash" + _FROM + _ACTIVE


def _info(row: tuple[Any, ...]) -> KeyInfo:
    n = len(LIMIT_NAMES)
    own = Limits(*row[6 : 6 + n])
    plan = Limits(*row[6 + n : 6 + 2 * n])
    return KeyInfo(
        int(row[0]),
        str(row[1]),
        str(row[2]),
        float(row[3]),
        None if row[4] is None else float(row[4]),
        None if row[5] is None else str(row[5]),
        own,
        own.over(plan),
    )


def _limit_values(limits: dict[str, int | None] | None) -> dict[str, int | None]:
    values = dict(limits or {})
    unknown = set(values) - set(LIMIT_NAMES)
    if unknown:
        raise KeyError_(f"unknown limit(s): {', '.join(sorted(unknown))}")
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or not 0 <= value < MAX_VALUE):
            raise KeyError_(f"{name} must be a non-negative integer below 2**62, or none")
    return values
