"""Quota enforcement: check + reserve before forwarding, settle to actual usage after.

``QuotaStore`` is the narrow interface (a Redis implementation can serve several replicas
later: reserve and settle are each one atomic step). ``LocalQuota`` is the single-process
implementation: the event loop runs ``reserve`` without yielding, so check and reserve are
one atomic step; settled usage is durable in the ledger, from which the state is rebuilt at
start. Reservations live only in memory: a crash cannot leak one.

Periods come from timestamps alone: UTC calendar day and month, and a sliding minute.
"""

from __future__ import annotations

import calendar
import datetime as dt
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from gateway.db import Database
from gateway.limits import Limits

__all__ = [
    "CHECK_ORDER",
    "Demand",
    "LocalQuota",
    "QuotaStore",
    "RateWindows",
    "Rejection",
    "Reservation",
    "WindowState",
    "ledger_totals",
    "rate_windows",
    "rate_windows_of",
    "reject",
    "window_states",
]

MINUTE = 60.0


@dataclass(frozen=True, slots=True)
class Demand:
    tokens: int  # counted prompt (tools included) + the output cap
    spend: int  # micro-units, at the price in force


@dataclass(slots=True)  # not frozen: six are built per request, and frozen ones cost twice as much
class WindowState:
    name: str
    limit: int
    used: int
    reserved: int
    resets_at: float

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used - self.reserved)


# The windows OpenAI's x-ratelimit-* headers show: requests (rpm) and tokens (tpm, else the
# tightest token budget); None where the key has no such limit.
RateWindows = tuple[WindowState | None, WindowState | None]


@dataclass(slots=True)
class Reservation:
    key_id: int
    demand: Demand
    day: str
    month: str
    started_at: float
    released: bool = False
    id: str = ""  # a shared store's handle on it
    unchecked: bool = False  # served without a check (the store was down and fails open)
    # The rate windows as this reservation left them, read in the same step as the check (the
    # headers of an admitted request cost no second look at the store); None if unknown.
    rate: RateWindows | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    kind: str  # "insufficient_quota" (budgets) or "rate_limit_exceeded" (rates)
    limit: str  # which limit, e.g. tokens_per_day
    message: str
    retry_after: int | None  # seconds; None when waiting cannot help
    # Bounds that requests of this key held (on any replica) while counting, where counts in
    # their place could have let this request fit; 0 where they cannot matter (a shared store's
    # answer: in one process the proxy knows its own).
    bounds_held: int = 0


class QuotaStore(Protocol):
    """A store may also have ``async shrink(reservation, limits, demand, now)``: it trades a held
    bound for a smaller demand (the count's). The proxy then forwards a budgeted request on a
    bound and counts it beside the backend, instead of counting first. A store that decides
    without I/O may have ``reserve_now``: ``reserve`` without a coroutine."""

    async def reserve(
        self, key_id: int, limits: Limits, demand: Demand, now: float, *, bound: bool = False
    ) -> Reservation | Rejection:
        """Check and reserve in one atomic step; a reservation carries its ``rate`` windows.
        ``bound``: ``demand`` is a bound held until a count shrinks it."""
        ...

    def settle(self, reservation: Reservation, tokens: int, spend: int, now: float) -> None: ...

    async def windows(self, key_id: int, limits: Limits, now: float) -> list[WindowState]: ...


@dataclass
class _KeyState:
    day: str = ""
    day_tokens: int = 0
    month: str = ""
    month_tokens: int = 0
    month_spend: int = 0
    requests: deque[float] = field(default_factory=deque)  # request starts in the sliding minute
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # settled tokens in the minute
    minute_tokens: int = 0
    reserved_tokens: int = 0
    reserved_spend: int = 0
    in_flight: int = 0
    period_start: float = 0.0  # [period_start, period_end): day and month cannot change inside
    period_end: float = 0.0

    def roll(self, now: float) -> None:
        if not self.period_start <= now < self.period_end:
            p = _periods(now)
            if self.day != p.day:
                self.day, self.day_tokens = p.day, 0
            if self.month != p.month:
                self.month, self.month_tokens, self.month_spend = p.month, 0, 0
            self.period_start, self.period_end = p.day_start, p.day_end
        horizon = now - MINUTE
        while self.requests and self.requests[0] <= horizon:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= horizon:
            self.minute_tokens -= self.tokens.popleft()[1]


class LocalQuota:
    def __init__(self) -> None:
        self._keys: dict[int, _KeyState] = {}

    def load(self, db: Database, now: float) -> None:
        """Rebuild settled usage for the current day, month and minute from the ledger."""
        month_start = _month_start(now)
        day_start = _day_start(now)
        rows = db.execute(
            "SELECT key_id, started_at, coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0), "
            "coalesce(cost_micros, 0) FROM requests WHERE started_at >= ? AND state != 'pending'",
            [month_start],
        ).fetchall()
        for key_id, started_at, tokens, spend in rows:
            state = self._state(key_id, now)
            state.month_tokens += tokens
            state.month_spend += spend
            if started_at >= day_start:
                state.day_tokens += tokens
            if started_at > now - MINUTE:
                state.requests.append(started_at)
                state.tokens.append((started_at, tokens))
                state.minute_tokens += tokens
        for state in self._keys.values():
            state.requests = deque(sorted(state.requests))
            state.tokens = deque(sorted(state.tokens))

    def _state(self, key_id: int, now: float) -> _KeyState:
        state = self._keys.get(key_id)
        if state is None:
            state = self._keys[key_id] = _KeyState()
        state.roll(now)
        return state

    async def reserve(
        self, key_id: int, limits: Limits, demand: Demand, now: float, *, bound: bool = False
    ) -> Reservation | Rejection:
        return self.reserve_now(key_id, limits, demand, now, bound=bound)

    def reserve_now(
        self, key_id: int, limits: Limits, demand: Demand, now: float, *, bound: bool = False
    ) -> Reservation | Rejection:
        """:meth:`reserve` without a coroutine (the request path's, in one process)."""
        # No await in here: on one event loop, check and reserve are a single atomic step.
        # ``bound`` needs no record (the proxy knows the bounds its own process holds), and no
        # rate windows: the shrink that replaces the bound computes the ones the headers show.
        state = self._state(key_id, now)
        rejection = _check(state, limits, demand, now)
        if rejection is not None:
            return rejection
        state.reserved_tokens += demand.tokens
        state.reserved_spend += demand.spend
        state.in_flight += 1
        state.requests.append(now)
        rate = None if bound else _rate(state, limits, now)
        return Reservation(key_id, demand, state.day, state.month, now, rate=rate)

    async def shrink(self, reservation: Reservation, limits: Limits, demand: Demand, now: float) -> None:
        """Hold ``demand`` instead of the reservation's larger one (the exact count replacing a
        bound), and refresh its rate windows. A hold never grows here: that would skip the check."""
        self.shrink_now(reservation, limits, demand, now)

    def shrink_now(self, reservation: Reservation, limits: Limits, demand: Demand, now: float) -> None:
        """:meth:`shrink` without a coroutine (the count beside the backend, in one process)."""
        if reservation.released:
            return
        held = reservation.demand
        tokens = min(demand.tokens, held.tokens)
        spend = min(demand.spend, held.spend)
        state = self._state(reservation.key_id, now)
        state.reserved_tokens -= held.tokens - tokens
        state.reserved_spend -= held.spend - spend
        reservation.demand = Demand(tokens, spend)
        reservation.rate = _rate(state, limits, now)

    def settle(self, reservation: Reservation, tokens: int, spend: int, now: float) -> None:
        """Replace the reservation by what was used (0 and 0 releases it). Idempotent."""
        if reservation.released:
            return
        reservation.released = True
        state = self._state(reservation.key_id, now)
        state.reserved_tokens -= reservation.demand.tokens
        state.reserved_spend -= reservation.demand.spend
        state.in_flight -= 1
        # Usage counts in the period the request started in (as the ledger and /v1/usage do).
        if state.day == reservation.day:
            state.day_tokens += tokens
        if state.month == reservation.month:
            state.month_tokens += tokens
            state.month_spend += spend
        if tokens:
            state.tokens.append((now, tokens))
            state.minute_tokens += tokens

    async def windows(self, key_id: int, limits: Limits, now: float) -> list[WindowState]:
        return self.windows_now(key_id, limits, now)

    def windows_now(self, key_id: int, limits: Limits, now: float) -> list[WindowState]:
        state = self._state(key_id, now)
        return window_states(
            limits,
            now,
            requests=len(state.requests),
            first_request=state.requests[0] if state.requests else None,
            minute_tokens=state.minute_tokens,
            first_tokens=state.tokens[0][0] if state.tokens else None,
            day_tokens=state.day_tokens,
            month_tokens=state.month_tokens,
            month_spend=state.month_spend,
            reserved_tokens=state.reserved_tokens,
            reserved_spend=state.reserved_spend,
            in_flight=state.in_flight,
        )

    def outstanding(self) -> tuple[int, int]:
        """(in-flight requests, reserved tokens) over all keys: both 0 when idle, or a leak."""
        return (
            sum(s.in_flight for s in self._keys.values()),
            sum(s.reserved_tokens for s in self._keys.values()),
        )


def _rate(state: _KeyState, limits: Limits, now: float) -> RateWindows:
    """The header windows of a key's state, as a reservation carries them."""
    return rate_windows_of(
        limits,
        now,
        requests=len(state.requests),
        first_request=state.requests[0] if state.requests else None,
        minute_tokens=state.minute_tokens,
        first_tokens=state.tokens[0][0] if state.tokens else None,
        day_tokens=state.day_tokens,
        month_tokens=state.month_tokens,
        reserved_tokens=state.reserved_tokens,
    )


def ledger_totals(db: Database, now: float) -> list[tuple[int, int, int, int]]:
    """(key_id, day tokens, month tokens, month spend) of every key with settled usage this month."""
    rows = db.execute(
        "SELECT key_id, CAST(sum(CASE WHEN started_at >= ? THEN coalesce(prompt_tokens, 0) "
        "+ coalesce(completion_tokens, 0) ELSE 0 END) AS BIGINT), "
        "CAST(sum(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)) AS BIGINT), "
        "CAST(sum(coalesce(cost_micros, 0)) AS BIGINT) "
        "FROM requests WHERE started_at >= ? AND state != 'pending' GROUP BY key_id",
        [_day_start(now), _month_start(now)],
    ).fetchall()
    return [(int(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in rows]


def _check(state: _KeyState, limits: Limits, demand: Demand, now: float) -> Rejection | None:
    if limits.max_concurrent is not None and state.in_flight + 1 > limits.max_concurrent:
        return reject("max_concurrent", limits.max_concurrent, state.in_flight, 0, 1, 1.0)
    if limits.rpm is not None and len(state.requests) + 1 > limits.rpm:
        wait = state.requests[0] + MINUTE - now if state.requests else MINUTE
        return reject("rpm", limits.rpm, len(state.requests), 0, 1, wait)
    tokens, reserved = demand.tokens, state.reserved_tokens
    for name, limit, used, held, wanted in (
        ("tpm", limits.tpm, state.minute_tokens, reserved, tokens),
        ("tokens_per_day", limits.tokens_per_day, state.day_tokens, reserved, tokens),
        ("tokens_per_month", limits.tokens_per_month, state.month_tokens, reserved, tokens),
        ("spend_per_month", limits.spend_per_month, state.month_spend, state.reserved_spend, demand.spend),
    ):
        if limit is None:
            continue
        if wanted > limit:
            return reject(name, limit, used, held, wanted, None)
        if used + held + wanted > limit:
            if name == "tpm":
                wait = _tpm_wait(state, limit, held + wanted, now)
            else:
                p = _periods(now)
                wait = (p.day_end if name == "tokens_per_day" else p.next_month_start) - now
            return reject(name, limit, used, held, wanted, wait)
    return None


# Limits in the order they are checked (every quota store checks in this order).
CHECK_ORDER = ("max_concurrent", "rpm", "tpm", "tokens_per_day", "tokens_per_month", "spend_per_month")


def reject(
    name: str,
    limit: int,
    used: int,
    reserved: int,
    wanted: int,
    wait: float | None,
    bounds_held: int = 0,
) -> Rejection:
    """The rejection for one limit, worded alike whichever store found it.

    ``wait`` is the seconds until the request could fit; None when it never can (too large)."""
    if name == "max_concurrent":
        return Rejection(
            "rate_limit_exceeded",
            name,
            f"Too many concurrent requests: the limit is {limit}; retry when one finishes.",
            1,
        )
    if name == "rpm":
        wait = MINUTE if wait is None else wait
        return Rejection(
            "rate_limit_exceeded",
            name,
            f"Rate limit reached for requests per minute: limit {limit}. Try again in {_human(wait)}.",
            _ceil(wait),
        )
    kind = "rate_limit_exceeded" if name == "tpm" else "insufficient_quota"
    unit = "micro-units" if name == "spend_per_month" else "tokens"
    if wait is None:
        return Rejection(
            kind,
            name,
            f"Request too large for {name}: limit {limit} {unit}, requested {wanted} "
            "(counted prompt and tools plus max_tokens). Reduce the input or max_tokens.",
            None,
        )
    return Rejection(
        kind,
        name,
        f"Limit reached for {name}: limit {limit} {unit}, used {used}, reserved {reserved}, "
        f"requested {wanted}. It frees up in {_human(wait)}.",
        _ceil(wait),
        bounds_held,
    )


def _tpm_wait(state: _KeyState, limit: int, needed: int, now: float) -> float:
    """Seconds until enough settled tokens leave the sliding minute for ``needed`` more to fit."""
    excess = state.minute_tokens + needed - limit
    for ts, tokens in state.tokens:
        excess -= tokens
        if excess <= 0:
            return ts + MINUTE - now
    return MINUTE  # reservations in flight must settle first


def _ceil(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def _human(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{math.ceil(seconds)}s"
    minutes, secs = divmod(math.ceil(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m"


def _utc(now: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(now, dt.UTC)


@dataclass(frozen=True, slots=True)
class _Periods:
    """The UTC day and month that contain one instant."""

    day: str
    month: str
    day_start: float
    day_end: float
    month_start: float
    next_month_start: float


def _compute_periods(now: float) -> _Periods:
    d = _utc(now)
    day_start = calendar.timegm((d.year, d.month, d.day, 0, 0, 0))
    year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return _Periods(
        d.strftime("%Y-%m-%d"),
        d.strftime("%Y-%m"),
        day_start,
        day_start + 86400,
        calendar.timegm((d.year, d.month, 1, 0, 0, 0)),
        calendar.timegm((year, month, 1, 0, 0, 0)),
    )


_current = _compute_periods(0.0)


def _periods(now: float) -> _Periods:
    """The periods of ``now``; recomputed only when ``now`` leaves the last day asked about
    (calendar arithmetic on every request cost as much as the rest of the quota check)."""
    global _current
    p = _current
    if not p.day_start <= now < p.day_end:
        p = _current = _compute_periods(now)
    return p


def _day(now: float) -> str:
    return _periods(now).day


def _month(now: float) -> str:
    return _periods(now).month


def _day_start(now: float) -> float:
    return _periods(now).day_start


def _month_start(now: float) -> float:
    return _periods(now).month_start


def _next_month_start(now: float) -> float:
    return _periods(now).next_month_start


def window_states(
    limits: Limits,
    now: float,
    *,
    requests: int,
    first_request: float | None,
    minute_tokens: int,
    first_tokens: float | None,
    day_tokens: int,
    month_tokens: int,
    month_spend: int,
    reserved_tokens: int,
    reserved_spend: int,
    in_flight: int,
) -> list[WindowState]:
    """The key's windows for /v1/limits and the rate-limit headers, from either store's figures."""
    out = []
    if limits.rpm is not None:
        reset = first_request + MINUTE if first_request is not None else now
        out.append(WindowState("rpm", limits.rpm, requests, 0, reset))
    if limits.tpm is not None:
        reset = _tpm_reset(now, first_tokens, reserved_tokens)
        out.append(WindowState("tpm", limits.tpm, minute_tokens, reserved_tokens, reset))
    p = _periods(now)
    day_end, month_end = p.day_end, p.next_month_start
    if limits.tokens_per_day is not None:
        out.append(WindowState("tokens_per_day", limits.tokens_per_day, day_tokens, reserved_tokens, day_end))
    if limits.tokens_per_month is not None:
        out.append(
            WindowState("tokens_per_month", limits.tokens_per_month, month_tokens, reserved_tokens, month_end)
        )
    if limits.spend_per_month is not None:
        out.append(
            WindowState("spend_per_month", limits.spend_per_month, month_spend, reserved_spend, month_end)
        )
    if limits.max_concurrent is not None:
        out.append(WindowState("max_concurrent", limits.max_concurrent, in_flight, 0, now))
    return out


def _tpm_reset(now: float, first_tokens: float | None, reserved_tokens: int) -> float:
    """When the tokens-per-minute window is whole again: a minute after its oldest settled
    tokens; with only reservations held, a minute from now at the soonest (their tokens count
    in the window for a minute once settled), not now."""
    if first_tokens is not None:
        return first_tokens + MINUTE
    return now + MINUTE if reserved_tokens else now


def rate_windows(windows: list[WindowState]) -> RateWindows:
    """The header windows among a key's windows (:func:`window_states`)."""
    by_name = {w.name: w for w in windows}
    tokens = by_name.get("tpm") or min(
        (w for w in windows if w.name in ("tokens_per_day", "tokens_per_month")),
        key=lambda w: w.remaining,
        default=None,
    )
    return by_name.get("rpm"), tokens


def rate_windows_of(
    limits: Limits,
    now: float,
    *,
    requests: int,
    first_request: float | None,
    minute_tokens: int,
    first_tokens: float | None,
    day_tokens: int,
    month_tokens: int,
    reserved_tokens: int,
) -> RateWindows:
    """``rate_windows(window_states(...))``, building only the two windows it keeps: this runs
    for every admitted request."""
    requests_window = None
    if limits.rpm is not None:
        reset = first_request + MINUTE if first_request is not None else now
        requests_window = WindowState("rpm", limits.rpm, requests, 0, reset)
    if limits.tpm is not None:
        reset = _tpm_reset(now, first_tokens, reserved_tokens)
        return requests_window, WindowState("tpm", limits.tpm, minute_tokens, reserved_tokens, reset)
    per_day, per_month = limits.tokens_per_day, limits.tokens_per_month
    if per_day is None and per_month is None:
        return requests_window, None
    p = _periods(now)
    day = (
        None
        if per_day is None
        else WindowState("tokens_per_day", per_day, day_tokens, reserved_tokens, p.day_end)
    )
    if per_month is None:
        return requests_window, day
    month = WindowState("tokens_per_month", per_month, month_tokens, reserved_tokens, p.next_month_start)
    # The tighter one; the day's on a tie (the first in window_states' order).
    return requests_window, month if day is None or month.remaining < day.remaining else day
