"""LocalQuota: check + reserve + settle, windows derived from timestamps, nothing leaks."""

from __future__ import annotations

import asyncio
import calendar
import datetime as dt
import random

import pytest

from gateway.limits import LIMIT_NAMES, Limits
from gateway.quota import (
    Demand,
    LocalQuota,
    Rejection,
    Reservation,
    _day,
    _day_start,
    _month,
    _month_start,
    _next_month_start,
    rate_windows,
    rate_windows_of,
    window_states,
)

NOON = calendar.timegm((2026, 11, 24, 12, 0, 0))


def reserve(q: LocalQuota, limits: Limits, tokens: int = 10, spend: int = 0, now: float = NOON) -> object:
    return asyncio.run(q.reserve(1, limits, Demand(tokens, spend), now))


def test_budget_admits_what_fits_and_refuses_the_rest_saying_why() -> None:
    q = LocalQuota()
    limits = Limits(tokens_per_day=30)
    held = [reserve(q, limits) for _ in range(3)]
    assert all(isinstance(r, Reservation) for r in held)
    refused = reserve(q, limits)
    assert isinstance(refused, Rejection)
    assert (refused.kind, refused.limit) == ("insufficient_quota", "tokens_per_day")
    assert "tokens_per_day" in refused.message and "frees up in 12h0m" in refused.message
    assert refused.retry_after == 12 * 3600


def test_settling_below_the_reservation_frees_the_difference() -> None:
    q = LocalQuota()
    limits = Limits(tokens_per_day=30)
    first = reserve(q, limits, tokens=20)
    assert isinstance(first, Reservation)
    assert isinstance(reserve(q, limits, tokens=20), Rejection)
    q.settle(first, 5, 0, NOON + 1)
    assert isinstance(reserve(q, limits, tokens=20), Reservation)
    q.settle(first, 5, 0, NOON + 1)  # idempotent: a second settle changes nothing
    assert q.outstanding() == (1, 20)


def test_a_request_that_cannot_fit_alone_is_refused_at_once_without_retry() -> None:
    refused = reserve(LocalQuota(), Limits(tokens_per_month=100), tokens=101)
    assert isinstance(refused, Rejection) and refused.retry_after is None
    assert "Request too large for tokens_per_month" in refused.message


def test_the_day_resets_at_utc_midnight_from_timestamps_alone() -> None:
    q = LocalQuota()
    limits = Limits(tokens_per_day=10)
    r = reserve(q, limits, tokens=10, now=NOON)
    assert isinstance(r, Reservation)
    q.settle(r, 10, 0, NOON + 5)
    assert isinstance(reserve(q, limits, tokens=1, now=NOON + 6), Rejection)
    midnight = calendar.timegm((2026, 11, 25, 0, 0, 0))
    assert isinstance(reserve(q, limits, tokens=10, now=midnight + 1), Reservation)


def test_month_and_spend() -> None:
    q = LocalQuota()
    limits = Limits(tokens_per_month=100, spend_per_month=1_000)
    r = reserve(q, limits, tokens=10, spend=900)
    assert isinstance(r, Reservation)
    refused = reserve(q, limits, tokens=10, spend=200)
    assert isinstance(refused, Rejection) and refused.limit == "spend_per_month"
    q.settle(r, 10, 100, NOON + 1)
    assert isinstance(reserve(q, limits, tokens=10, spend=200), Reservation)
    next_month = calendar.timegm((2026, 12, 1, 0, 0, 1))
    windows = {w.name: w for w in q.windows_now(1, limits, next_month)}
    assert windows["spend_per_month"].used == 0 and windows["tokens_per_month"].used == 0


def test_requests_per_minute_slide() -> None:
    q = LocalQuota()
    limits = Limits(rpm=2)
    for t in (0, 10):
        r = reserve(q, limits, now=NOON + t)
        assert isinstance(r, Reservation)
        q.settle(r, 1, 0, NOON + t)
    refused = reserve(q, limits, now=NOON + 30)
    assert (
        isinstance(refused, Rejection) and refused.kind == "rate_limit_exceeded" and refused.retry_after == 30
    )
    assert isinstance(reserve(q, limits, now=NOON + 60.5), Reservation)


def test_tokens_per_minute_count_reservations_and_settled_tokens() -> None:
    q = LocalQuota()
    limits = Limits(tpm=100)
    r = reserve(q, limits, tokens=60)
    assert isinstance(r, Reservation)
    assert isinstance(reserve(q, limits, tokens=50), Rejection)
    q.settle(r, 60, 0, NOON + 1)
    refused = reserve(q, limits, tokens=50, now=NOON + 2)
    assert isinstance(refused, Rejection) and refused.retry_after == 59
    assert isinstance(reserve(q, limits, tokens=50, now=NOON + 62), Reservation)


def test_concurrency() -> None:
    q = LocalQuota()
    limits = Limits(max_concurrent=2)
    a, b = reserve(q, limits), reserve(q, limits)
    refused = reserve(q, limits)
    assert isinstance(refused, Rejection) and refused.limit == "max_concurrent"
    assert isinstance(a, Reservation) and isinstance(b, Reservation)
    q.settle(a, 0, 0, NOON)
    assert isinstance(reserve(q, limits), Reservation)


def test_limits_fall_back_to_the_plan() -> None:
    key = Limits(rpm=5)
    plan = Limits(rpm=100, tokens_per_day=1000)
    assert key.over(plan) == Limits(rpm=5, tokens_per_day=1000)


@pytest.mark.parametrize("name", LIMIT_NAMES)
def test_what_a_request_asks_of_its_limits_is_worked_out_once_and_right(name: str) -> None:
    """``any`` and ``budgets_tokens`` are read on every request and kept on the limits: each is
    right for every limit, and neither shows in equality, hashing, the dict or the repr."""
    limits = Limits(**{name: 1})
    assert limits.any and not Limits().any
    assert limits.budgets_tokens == (name not in ("rpm", "max_concurrent"))
    assert limits.as_dict() == {n: 1 if n == name else None for n in LIMIT_NAMES}
    assert limits == Limits(**{name: 1}) and hash(limits) == hash(Limits(**{name: 1}))
    assert "any" not in repr(limits) and "budgets" not in repr(limits)
    assert limits.over(Limits()).any and Limits().over(limits).budgets_tokens == limits.budgets_tokens


@pytest.mark.parametrize("limits", [Limits(tokens_per_day=10**9), Limits(rpm=10**6), Limits()])
def test_concurrent_reservations_never_exceed_and_never_leak(limits: Limits) -> None:
    async def run() -> tuple[int, int]:
        q = LocalQuota()
        tight = Limits(tokens_per_day=150, max_concurrent=40).over(limits)

        async def one() -> bool:
            r = await q.reserve(1, tight, Demand(10, 0), NOON)
            if isinstance(r, Rejection):
                return False
            await asyncio.sleep(0.01)
            q.settle(r, 10, 0, NOON)
            return True

        results = await asyncio.gather(*(one() for _ in range(60)))
        assert q.outstanding() == (0, 0)
        day = next(w for w in q.windows_now(1, tight, NOON) if w.name == "tokens_per_day")
        return sum(results), day.used

    admitted, used = asyncio.run(run())
    assert admitted == 15 and used == 150


def test_cached_periods_match_the_calendar_in_any_order() -> None:
    """Day and month bounds are cached per day: instants out of order, on and around every
    boundary (midnight, month ends, December, a leap day), give the calendar's answer."""
    edges = [calendar.timegm((y, m, 1, 0, 0, 0)) for y in (2024, 2025, 2026) for m in range(1, 13)]
    edges += [calendar.timegm((2024, 2, 29, 0, 0, 0)), calendar.timegm((2026, 11, 24, 0, 0, 0))]
    instants = [e + d for e in edges for d in (-86400, -1, -0.000001, 0, 0.5, 86399.999)]
    random.Random(7).shuffle(instants)
    for now in instants:
        d = dt.datetime.fromtimestamp(now, dt.UTC)
        nxt = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
        assert _day(now) == d.strftime("%Y-%m-%d") and _month(now) == d.strftime("%Y-%m")
        assert _day_start(now) == calendar.timegm((d.year, d.month, d.day, 0, 0, 0))
        assert _month_start(now) == calendar.timegm((d.year, d.month, 1, 0, 0, 0))
        assert _next_month_start(now) == calendar.timegm((*nxt, 1, 0, 0, 0))


@pytest.mark.parametrize(
    "limits",
    [
        Limits(rpm=40, tpm=3_000, tokens_per_day=5_000),
        Limits(tokens_per_day=5_000, tokens_per_month=6_000),  # the tighter budget changes hands
        Limits(tokens_per_day=4_000, tokens_per_month=4_000),  # a tie
        Limits(tokens_per_month=6_000, spend_per_month=10_000, max_concurrent=5),
        Limits(rpm=30),
        Limits(max_concurrent=3),
    ],
)
def test_a_reservation_carries_the_header_windows_as_a_fresh_look_would_find_them(limits: Limits) -> None:
    """The rate-limit headers of an admitted request come from its reservation, not from a
    second look at the store: what it carries is what ``windows`` finds right after it."""
    rng = random.Random(11)
    q = LocalQuota()
    held: list[Reservation] = []
    now = NOON - 3 * 86400 + 5  # the month and the day both roll over on the way
    admitted = 0
    for _ in range(400):
        now += rng.choice([0.0, 0.4, 7.0, 31.0, 3600.0])
        if held and rng.random() < 0.45:
            r = held.pop(rng.randrange(len(held)))
            q.settle(r, rng.randint(0, r.demand.tokens), rng.randint(0, 50), now)
            continue
        result = asyncio.run(q.reserve(1, limits, Demand(rng.randint(1, 400), rng.randint(0, 50)), now))
        if isinstance(result, Reservation):
            admitted += 1
            assert result.rate == rate_windows(q.windows_now(1, limits, now))
            held.append(result)
    assert admitted > 50


def test_header_windows_built_directly_match_the_full_windows_selection() -> None:
    rng = random.Random(5)
    for _ in range(2_000):
        limits = Limits(
            **{
                name: rng.choice([None, rng.randint(1, 10_000)])
                for name in ("rpm", "tpm", "tokens_per_day", "tokens_per_month", "spend_per_month")
            }
        )
        now = NOON + rng.random() * 86400 * 40
        figures = {
            "requests": rng.randint(0, 50),
            "first_request": rng.choice([None, now - rng.random() * 60]),
            "minute_tokens": rng.randint(0, 5_000),
            "first_tokens": rng.choice([None, now - rng.random() * 60]),
            "day_tokens": rng.randint(0, 9_000),
            "month_tokens": rng.randint(0, 9_000),
            "reserved_tokens": rng.randint(0, 3_000),
        }
        full = window_states(limits, now, month_spend=0, reserved_spend=0, in_flight=0, **figures)
        assert rate_windows_of(limits, now, **figures) == rate_windows(full), (limits, figures)


def test_shrinking_a_hold_frees_the_difference_and_never_grows_it() -> None:
    """A bound held while counting is traded for the count: the difference is free at once,
    a larger demand is not taken (that would skip the check), and a settled hold is left alone."""
    q = LocalQuota()
    limits = Limits(tokens_per_day=100, tpm=1_000)
    held = reserve(q, limits, tokens=90, spend=9)
    assert isinstance(held, Reservation) and isinstance(reserve(q, limits, tokens=20), Rejection)
    asyncio.run(q.shrink(held, limits, Demand(30, 3), NOON))
    assert q.outstanding() == (1, 30) and held.demand == Demand(30, 3)
    assert held.rate == rate_windows(q.windows_now(1, limits, NOON))
    asyncio.run(q.shrink(held, limits, Demand(80, 8), NOON))
    assert q.outstanding() == (1, 30)
    assert isinstance(reserve(q, limits, tokens=70), Reservation)
    q.settle(held, 25, 2, NOON)
    asyncio.run(q.shrink(held, limits, Demand(0, 0), NOON))
    assert q.outstanding() == (1, 70)
