"""Limits per key and per plan (a named set of limits many keys share), and money parsing.

A key's effective limit is its own value where set, else its plan's, else none. Money is
integer micro-units of the operator's currency (1 unit = 1,000,000 micro-units), never floats.

>>> parse_money("12.50")
12500000
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from gateway.db import Database, IntegrityError

__all__ = ["LIMIT_NAMES", "NO_LIMITS", "Limits", "PlanError", "PlanStore", "format_money", "parse_money"]

LIMIT_NAMES = ("tokens_per_day", "tokens_per_month", "spend_per_month", "rpm", "tpm", "max_concurrent")
MICROS = 1_000_000
MAX_VALUE = 2**62  # SQLite integers are 64-bit: larger limits are refused, not overflowed


class PlanError(Exception):
    """A plan or limit operation cannot be done; the message says why."""


@dataclass(frozen=True, slots=True)
class Limits:
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    spend_per_month: int | None = None  # micro-units
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    # Read on every request, and a key's limits outlive many: worked out once, here.
    any: bool = field(init=False, repr=False, compare=False)
    # Whether a reservation needs the request's token count (token or spend budgets).
    budgets_tokens: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        values = [getattr(self, n) for n in LIMIT_NAMES]
        object.__setattr__(self, "any", any(v is not None for v in values))
        budgets = (self.tokens_per_day, self.tokens_per_month, self.spend_per_month, self.tpm)
        object.__setattr__(self, "budgets_tokens", any(v is not None for v in budgets))

    def over(self, base: Limits) -> Limits:
        """These limits where set, ``base``'s elsewhere."""
        return Limits(
            **{n: getattr(self, n) if getattr(self, n) is not None else getattr(base, n) for n in LIMIT_NAMES}
        )

    def as_dict(self) -> dict[str, int | None]:
        return {n: getattr(self, n) for n in LIMIT_NAMES}


NO_LIMITS = Limits()


def parse_money(text: str) -> int:
    """A decimal amount in currency units as integer micro-units; more than 6 decimals is an error."""
    try:
        value = Decimal(text.strip())
    except (InvalidOperation, AttributeError):
        raise PlanError(f"{text!r} is not an amount (use e.g. 12.50)") from None
    if not value.is_finite() or value < 0:
        raise PlanError(f"{text!r} is not a non-negative amount")
    micros = value * MICROS
    if micros != micros.to_integral_value():
        raise PlanError(f"{text!r} has more than 6 decimals")
    if micros >= MAX_VALUE:
        raise PlanError(f"{text!r} is too large")
    return int(micros)


def format_money(micros: int | None) -> str | None:
    if micros is None:
        return None
    return f"{Decimal(micros) / MICROS:f}"


def parse_limit(name: str, text: str) -> int | None:
    """A limit from the command line: a non-negative integer (an amount for spend), or 'none'."""
    if text.strip().lower() in ("none", "unlimited", ""):
        return None
    if name == "spend_per_month":
        return parse_money(text)
    try:
        value = int(text)
    except ValueError:
        raise PlanError(f"--{name.replace('_', '-')}: {text!r} is not a whole number (or 'none')") from None
    if not 0 <= value < MAX_VALUE:
        raise PlanError(f"--{name.replace('_', '-')}: must be between 0 and 2**62")
    return value


class PlanStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, name: str, values: dict[str, int | None]) -> dict[str, Any]:
        _check(values)
        try:
            self._db.execute(
                f"INSERT INTO plans (name, {', '.join(LIMIT_NAMES)}, created_at) "
                f"VALUES (?, {', '.join('?' * len(LIMIT_NAMES))}, ?)",
                [name, *(values.get(n) for n in LIMIT_NAMES), time.time()],
            )
        except IntegrityError:
            raise PlanError(f"a plan named {name!r} already exists") from None
        return self.get(name)

    def update(self, name: str, values: dict[str, int | None]) -> dict[str, Any]:
        _check(values)
        plan = self.get(name)
        if values:
            assignments = ", ".join(f"{n} = ?" for n in values)
            self._db.execute(f"UPDATE plans SET {assignments} WHERE id = ?", [*values.values(), plan["id"]])
        return self.get(name)

    def delete(self, name: str) -> None:
        plan = self.get(name)
        users = self._db.execute("SELECT count(*) FROM keys WHERE plan_id = ?", [plan["id"]]).fetchone()[0]
        if users:
            raise PlanError(f"plan {name!r} is used by {users} key(s); move them to another plan first")
        self._db.execute("DELETE FROM plans WHERE id = ?", [plan["id"]])

    def get(self, name: str) -> dict[str, Any]:
        row = self._db.execute(
            f"SELECT id, name, {', '.join(LIMIT_NAMES)} FROM plans WHERE name = ?", [name]
        ).fetchone()
        if row is None:
            raise PlanError(f"no plan {name!r}")
        return dict(zip(("id", "name", *LIMIT_NAMES), row, strict=True))

    def list(self) -> list[dict[str, Any]]:
        rows = self._db.execute(
            f"SELECT id, name, {', '.join(LIMIT_NAMES)} FROM plans ORDER BY name"
        ).fetchall()
        return [dict(zip(("id", "name", *LIMIT_NAMES), r, strict=True)) for r in rows]


def _check(values: dict[str, int | None]) -> None:
    unknown = set(values) - set(LIMIT_NAMES)
    if unknown:
        raise PlanError(f"unknown limit(s): {', '.join(sorted(unknown))}")
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or not 0 <= value < MAX_VALUE):
            raise PlanError(f"{name} must be a non-negative integer below 2**62, or none")
