"""Prices per model, with effective dates, in integer micro-units per million tokens.

A price row applies from its ``effective_from`` until a newer row for the same model; the
model ``*`` is the default for unlisted models. A request is priced at the price in force when
it started, and its cost is stored on its ledger row, so a later change never rewrites history.

>>> Price(200_000, 400_000, 800_000).cost(input_tokens=1000, tool_tokens=200, output_tokens=50)
280
"""

from __future__ import annotations

import asyncio
import bisect
import time
from dataclasses import dataclass
from typing import Any

from gateway.config_version import ConfigVersion, VersionedCache
from gateway.db import Database, IntegrityError

__all__ = ["DEFAULT_MODEL", "Price", "PriceBook", "PriceError"]

DEFAULT_MODEL = "*"
PER = 1_000_000  # prices are per million tokens


class PriceError(Exception):
    """A price operation cannot be done; the message says why."""


@dataclass(frozen=True, slots=True)
class Price:
    input_per_m: int  # micro-units per million message (non-tool) input tokens
    tool_per_m: int  # micro-units per million tool tokens
    output_per_m: int  # micro-units per million output tokens
    model: str = DEFAULT_MODEL
    effective_from: float = 0.0

    def cost(self, *, input_tokens: int, tool_tokens: int, output_tokens: int) -> int:
        """Micro-units for a request; ``input_tokens`` includes ``tool_tokens`` (billed at the tool price).

        Integer arithmetic throughout; rounded half up to a whole micro-unit.
        """
        tool = min(tool_tokens, input_tokens)
        total = (
            (input_tokens - tool) * self.input_per_m
            + tool * self.tool_per_m
            + output_tokens * self.output_per_m
        )
        return (total + PER // 2) // PER

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_per_million": self.input_per_m,
            "tool_per_million": self.tool_per_m,
            "output_per_million": self.output_per_m,
            "effective_from": int(self.effective_from),
        }


FREE = Price(0, 0, 0)


_AT = (
    "SELECT input_per_m, tool_per_m, output_per_m, model, effective_from FROM prices "
    "WHERE model IN (?, ?) AND effective_from <= ? "
    "ORDER BY model = ? , effective_from DESC LIMIT 1"
)


# A model's price history and the default's, beside the configuration version (one row with
# NULL prices when neither has any).
_HISTORY_VERSIONED = (
    "SELECT c.n, p.input_per_m, p.tool_per_m, p.output_per_m, p.model, p.effective_from "
    "FROM config_version c LEFT JOIN prices p ON p.model IN (?, ?) ORDER BY p.effective_from"
)


class PriceBook:
    def __init__(self, db: Database, *, version: ConfigVersion | None = None) -> None:
        self._db = db
        self._version = version
        # model -> (its prices, the default's prices), each sorted by effective_from
        self._cache: VersionedCache[str, tuple[list[Price], list[Price]]] = VersionedCache()

    def set(self, model: str, price: Price, effective_from: float | None = None) -> Price:
        when = time.time() if effective_from is None else effective_from
        for name, value in (
            ("input", price.input_per_m),
            ("tool", price.tool_per_m),
            ("output", price.output_per_m),
        ):
            if value < 0:
                raise PriceError(f"the {name} price must not be negative")
        try:
            self._db.execute(
                "INSERT INTO prices (model, input_per_m, tool_per_m, output_per_m, effective_from) "
                "VALUES (?, ?, ?, ?, ?)",
                [model, price.input_per_m, price.tool_per_m, price.output_per_m, when],
            )
        except IntegrityError:
            raise PriceError(f"{model!r} already has a price effective at that moment") from None
        return Price(price.input_per_m, price.tool_per_m, price.output_per_m, model, when)

    def at(self, model: str | None, when: float) -> Price:
        """The price in force for ``model`` at ``when``: its own, else the default, else free."""
        row = self._db.execute(_AT, [model or DEFAULT_MODEL, DEFAULT_MODEL, when, DEFAULT_MODEL]).fetchone()
        return Price(*row) if row else FREE

    def cached_at(self, model: str | None, when: float, version: int | None = None) -> Price | None:
        """What :meth:`price_at` would answer from memory, without a coroutine (the request
        path's usual case); None where it would have to read."""
        if version is None:
            if self._version is None:
                return None
            version = self._version.current()
        hit = self._cache.get(model or DEFAULT_MODEL, version)
        return None if hit is None else _in_force_of(hit, when)

    async def price_at(self, model: str | None, when: float, version: int | None = None) -> Price:
        """:meth:`at` for the request path: cached while the config version holds, else one
        read (never a blocking round trip on PostgreSQL). ``version``: the one the request's key
        was read under, so that key and price are judged under one configuration (else the
        version now, where it is in memory); the proxy starts a refused request over if it has
        moved since. Without either, one read."""
        name = model or DEFAULT_MODEL
        if version is None and self._version is not None:
            version = self._version.current()
        if version is None:
            row = await self._db.afetchone(_AT, [name, DEFAULT_MODEL, when, DEFAULT_MODEL])
            return Price(*row) if row else FREE
        hit = self._cache.get(name, version)
        if hit is None:
            # The version and the rows in one statement: the entry is tagged with the version
            # its rows belong to (PostgreSQL reads each statement from one snapshot).
            rows = await self._db.afetchall(_HISTORY_VERSIONED, [name, DEFAULT_MODEL])
            history = [Price(*row[1:]) for row in rows if row[1] is not None]
            hit = ([p for p in history if p.model == name], [p for p in history if p.model == DEFAULT_MODEL])
            self._cache.put(name, int(rows[0][0]), hit)
        return _in_force_of(hit, when)

    async def acurrent(self, when: float | None = None) -> list[Price]:
        """:meth:`current` off the event loop where the database is a network hop away."""
        if self._db.dialect.name == "sqlite":
            return self.current(when)
        return await asyncio.to_thread(self.current, when)

    def current(self, when: float | None = None) -> list[Price]:
        """The price in force now for every priced model (the default included)."""
        now = time.time() if when is None else when
        rows = self._db.execute(
            "SELECT p.input_per_m, p.tool_per_m, p.output_per_m, p.model, p.effective_from FROM prices p "
            "WHERE p.effective_from = (SELECT max(q.effective_from) FROM prices q "
            "WHERE q.model = p.model AND q.effective_from <= ?) ORDER BY p.model",
            [now],
        ).fetchall()
        return [Price(*r) for r in rows]

    def history(self) -> list[Price]:
        rows = self._db.execute(
            "SELECT input_per_m, tool_per_m, output_per_m, model, effective_from FROM prices "
            "ORDER BY model, effective_from"
        ).fetchall()
        return [Price(*r) for r in rows]


def _in_force_of(histories: tuple[list[Price], list[Price]], when: float) -> Price:
    """The price in force at ``when`` from a model's cached (own, default) histories."""
    own, default = histories
    return _in_force(own, when) or _in_force(default, when) or FREE


def _in_force(history: list[Price], when: float) -> Price | None:
    """The latest of ``history`` (sorted by effective_from) in force at ``when``."""
    i = bisect.bisect_right(history, when, key=lambda p: p.effective_from)
    return history[i - 1] if i else None
