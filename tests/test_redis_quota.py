"""Quota counters on a real Redis: the same decisions as in-process, atomic across replicas."""

from __future__ import annotations

import asyncio
import copy
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis

from gateway.errors import QuotaStoreUnavailable
from gateway.limits import Limits
from gateway.quota import Demand, LocalQuota, Rejection, Reservation, _day_start, rate_windows
from gateway.redis_quota import RedisQuota
from tests.servers import free_port
from tests.stores import RedisServer

# Today's noon: counters expire by Redis's own clock, so the test's clock must be near it.
NOON = _day_start(time.time()) + 12 * 3600
T = TypeVar("T")


def _run(coro: Awaitable[T]) -> T:
    async def wrap() -> T:
        return await coro

    return asyncio.run(wrap())


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


def _replica(server: RedisServer, prefix: str, **kw: Any) -> RedisQuota:
    return RedisQuota(server.url, prefix=prefix, **kw)


def test_decides_exactly_as_the_in_process_store(redis_server: RedisServer, prefix: str) -> None:
    """A random sequence of reserves (some on bounds), shrinks and settles: same verdicts, same
    messages, same windows."""
    rng = random.Random(7)
    limits = Limits(
        tokens_per_day=5_000,
        tokens_per_month=9_000,
        spend_per_month=40_000,
        rpm=25,
        tpm=3_000,
        max_concurrent=4,
    )

    async def run() -> None:
        local, shared = LocalQuota(), _replica(redis_server, prefix)
        await shared.start()
        held: list[tuple[Reservation, Reservation]] = []
        bounds: list[tuple[Reservation, Reservation]] = []  # held on a bound, not yet shrunk
        shrunk = settled_bounds = 0
        now = NOON
        for step in range(400):
            now += rng.choice([0.0, 0.5, 3.0, 20.0])
            if bounds and rng.random() < 0.6:
                a, b = bounds.pop(rng.randrange(len(bounds)))
                count = Demand(rng.randint(0, a.demand.tokens + 50), rng.randint(0, a.demand.spend + 50))
                await local.shrink(a, limits, count, now)
                await shared.shrink(b, limits, count, now)
                assert a.demand == b.demand and b.rate == a.rate, step
                shrunk += 1
                assert await shared.windows(1, limits, now) == local.windows_now(1, limits, now), step
                continue
            if held and rng.random() < 0.5:
                a, b = held.pop(rng.randrange(len(held)))
                if (a, b) in bounds:
                    bounds.remove((a, b))
                    settled_bounds += 1
                used = rng.randint(0, a.demand.tokens)
                spend = rng.randint(0, a.demand.spend)
                local.settle(a, used, spend, now)
                shared.settle(b, used, spend, now)
                await asyncio.sleep(0)
                await asyncio.gather(*shared._tasks)
                continue
            demand = Demand(rng.randint(1, 900), rng.randint(0, 5_000))
            bound = rng.random() < 0.5
            expected = await local.reserve(1, limits, demand, now, bound=bound)
            got = await shared.reserve(1, limits, demand, now, bound=bound)
            assert type(expected) is type(got), (step, expected, got)
            if isinstance(expected, Rejection):
                assert isinstance(got, Rejection)
                assert (got.kind, got.limit, got.message, got.retry_after) == (
                    expected.kind,
                    expected.limit,
                    expected.message,
                    expected.retry_after,
                ), step
            else:
                assert isinstance(got, Reservation)
                # The rate-limit headers' windows, read by the reserve itself (a bound's come
                # with its shrink: in process, the reserve leaves them out).
                assert got.rate == expected.rate or (bound and expected.rate is None), step
                held.append((expected, got))
                if bound:
                    bounds.append((expected, got))
            assert await shared.windows(1, limits, now) == local.windows_now(1, limits, now), step
        # The sequence meets each case often enough to mean something.
        assert shrunk >= 10 and settled_bounds >= 5, (shrunk, settled_bounds)
        for a, b in held:
            local.settle(a, 0, 0, now)
            shared.settle(b, 0, 0, now)
        await asyncio.gather(*shared._tasks)
        await shared.aclose()
        assert local.outstanding() == (0, 0)

    _run(run())
    assert _live(redis_server, prefix, 1) == _NOTHING_HELD


_NOTHING_HELD = {"tokens": "0", "spend": "0", "n": "0", "b": "0", "bt": "0", "bs": "0"}


def _live(server: RedisServer, prefix: str, key_id: int) -> dict[str, str]:
    """What a key's live hash holds (reservations, and the bounds among them); absent fields as 0."""
    live = redis.Redis.from_url(server.url, decode_responses=True).hgetall(f"{prefix}{key_id}:live")
    return {field: live.get(field, "0") for field in _NOTHING_HELD}


def test_a_bound_traded_for_its_count_frees_the_difference_and_never_grows(
    redis_server: RedisServer, prefix: str
) -> None:
    """As in process: the difference is free at once, a larger count is not taken (that would
    skip the check), the rate windows are the count's, and a settled hold is left alone."""
    limits = Limits(tokens_per_day=100, tpm=1_000)

    async def run() -> None:
        store = _replica(redis_server, prefix)
        held = await store.reserve(1, limits, Demand(90, 9), NOON, bound=True)
        assert isinstance(held, Reservation)
        assert _live(redis_server, prefix, 1) == {**_NOTHING_HELD, "tokens": "90", "spend": "9", "n": "1",
                                                   "b": "1", "bt": "90", "bs": "9"}  # fmt: skip
        assert isinstance(await store.reserve(1, limits, Demand(20, 0), NOON), Rejection)
        await store.shrink(held, limits, Demand(30, 3), NOON)
        assert held.demand == Demand(30, 3)
        assert _live(redis_server, prefix, 1) == {**_NOTHING_HELD, "tokens": "30", "spend": "3", "n": "1"}
        assert held.rate == rate_windows(await store.windows(1, limits, NOON))
        await store.shrink(held, limits, Demand(80, 8), NOON)  # a count now: nothing to trade
        assert held.demand == Demand(30, 3) and _live(redis_server, prefix, 1)["tokens"] == "30"
        other = await store.reserve(1, limits, Demand(70, 0), NOON)
        assert isinstance(other, Reservation)
        store.settle(held, 25, 2, NOON)
        await store.shrink(held, limits, Demand(0, 0), NOON)
        await asyncio.gather(*store._tasks)
        assert _live(redis_server, prefix, 1) == {**_NOTHING_HELD, "tokens": "70", "n": "1"}
        store.settle(other, 0, 0, NOON)
        await store.aclose()

    _run(run())
    assert _live(redis_server, prefix, 1) == _NOTHING_HELD


@pytest.mark.parametrize("order", ["shrink, then settle", "settle, then shrink"])
def test_a_settle_releases_what_the_record_holds_whichever_arrives_first(
    redis_server: RedisServer, prefix: str, order: str
) -> None:
    """A shrink and the settle can reach Redis in either order (two pooled connections; the
    client went away while the count ran): either way exactly nothing is left held."""
    limits = Limits(tokens_per_day=1_000, spend_per_month=1_000)

    async def run() -> None:
        store = _replica(redis_server, prefix)
        held = await store.reserve(1, limits, Demand(600, 60), NOON, bound=True)
        assert isinstance(held, Reservation)
        in_flight = copy.copy(held)  # the shrink's view: issued before the settle marked it
        if order == "shrink, then settle":
            await store.shrink(in_flight, limits, Demand(200, 20), NOON)
            store.settle(held, 0, 0, NOON)
            await asyncio.gather(*store._tasks)
        else:
            store.settle(held, 0, 0, NOON)
            await asyncio.gather(*store._tasks)
            await store.shrink(in_flight, limits, Demand(200, 20), NOON)
            assert in_flight.demand == Demand(600, 60)  # nothing was traded
        await store.aclose()

    _run(run())
    assert _live(redis_server, prefix, 1) == _NOTHING_HELD


def test_a_refusal_names_the_bounds_held_only_where_counts_could_admit_it(
    redis_server: RedisServer, prefix: str
) -> None:
    """Refused beside a bound that, counted, might hold nothing: the refusal says so (the proxy
    then waits for the count). Refused where even empty bounds leave no room: it does not."""
    limits = Limits(tokens_per_day=100, spend_per_month=1_000)

    async def run() -> tuple[Any, ...]:
        store = _replica(redis_server, prefix)
        bound = await store.reserve(1, limits, Demand(60, 600), NOON, bound=True)
        maybe = await store.reserve(1, limits, Demand(50, 0), NOON)
        too_large = await store.reserve(1, limits, Demand(101, 0), NOON)
        spend = await store.reserve(1, limits, Demand(10, 500), NOON)
        count = await store.reserve(1, limits, Demand(30, 0), NOON)
        certain = await store.reserve(1, limits, Demand(80, 0), NOON)
        for r in (bound, count):
            assert isinstance(r, Reservation)
            store.settle(r, 0, 0, NOON)
        await asyncio.gather(*store._tasks)
        await store.aclose()
        return maybe, too_large, spend, certain

    maybe, too_large, spend, certain = _run(run())
    assert isinstance(maybe, Rejection) and (maybe.limit, maybe.bounds_held) == ("tokens_per_day", 1)
    assert isinstance(too_large, Rejection) and too_large.bounds_held == 0
    assert isinstance(spend, Rejection) and (spend.limit, spend.bounds_held) == ("spend_per_month", 1)
    # 30 counted + 80 > 100 even if the bound held nothing: no wait can help.
    assert isinstance(certain, Rejection) and certain.bounds_held == 0
    assert _live(redis_server, prefix, 1) == _NOTHING_HELD


def test_a_shrink_redis_does_not_take_keeps_the_bound_held(redis_server: RedisServer, prefix: str) -> None:
    """Redis unreachable when the count is in: the bound stays held (too much, never too little)
    until the request settles, and the failure is counted, not raised."""
    limits = Limits(tokens_per_day=1_000)
    errors: list[str] = []

    async def run() -> None:
        store = _replica(redis_server, prefix)
        held = await store.reserve(1, limits, Demand(600, 0), NOON, bound=True)
        assert isinstance(held, Reservation)
        cut_off = RedisQuota(f"redis://127.0.0.1:{free_port()}", prefix=prefix, on_error=errors.append)
        await cut_off.shrink(held, limits, Demand(200, 0), NOON)
        assert held.demand == Demand(600, 0) and _live(redis_server, prefix, 1)["tokens"] == "600"
        store.settle(held, 150, 0, NOON)
        await asyncio.gather(*store._tasks)
        await cut_off.aclose()
        await store.aclose()

    _run(run())
    assert errors == ["shrink"]
    assert _live(redis_server, prefix, 1) == _NOTHING_HELD


def test_two_replicas_never_overshoot_a_budget(redis_server: RedisServer, prefix: str) -> None:
    limits = Limits(tokens_per_day=15 * 16)

    async def run() -> list[Any]:
        # 100 reserves at once open 50 connections per replica, and a full collection of this test
        # process's heap (transformers, every tokenizer) pauses it for 0.3 to 0.8 s: past the
        # default 0.5 s connect timeout. The test is about atomicity across replicas, not that.
        a, b = _replica(redis_server, prefix, timeout=5), _replica(redis_server, prefix, timeout=5)
        await a.start()
        await b.start()
        results = await asyncio.gather(
            *((a if i % 2 else b).reserve(1, limits, Demand(16, 0), NOON) for i in range(100))
        )
        for store in (a, b):
            await store.aclose()
        return results

    results = _run(run())
    assert sum(isinstance(r, Reservation) for r in results) == 15


def test_a_burst_shares_a_bounded_pool_of_connections(redis_server: RedisServer, prefix: str) -> None:
    """200 reserves at once from one replica: all decided, over at most ``max_connections``
    connections (redis-py's default pool would open one per call, each racing its connect
    timeout)."""
    limits = Limits(tokens_per_day=10**9, max_concurrent=10**6)
    store = _replica(redis_server, prefix, max_connections=4, timeout=5)
    name = f"gateway-{store.instance}"

    async def run() -> tuple[list[Any], int]:
        await store.start()
        results = await asyncio.gather(*(store.reserve(1, limits, Demand(16, 0), NOON) for _ in range(200)))
        clients = redis.Redis(port=redis_server.port).client_list()
        await store.aclose()
        return results, sum(c["name"] == name for c in clients)

    results, connections = _run(run())
    assert all(isinstance(r, Reservation) for r in results)
    assert 1 <= connections <= 4


def test_more_concurrent_calls_than_connections_wait_instead_of_failing(
    redis_server: RedisServer, prefix: str
) -> None:
    """redis-py's own pool refuses the 101st concurrent call ("Too many connections"), which a
    fail-closed gateway turned into a 503 for every request past 100 in flight."""
    limits = Limits(tokens_per_day=10**9, max_concurrent=10**6)

    async def run() -> list[Any]:
        store = _replica(redis_server, prefix, timeout=5)
        await store.start()
        try:
            return await asyncio.gather(*(store.reserve(1, limits, Demand(16, 0), NOON) for _ in range(300)))
        finally:
            await store.aclose()

    assert all(isinstance(r, Reservation) for r in _run(run()))


def test_a_pool_of_no_connections_is_a_configuration_error(tmp_path: Any) -> None:
    from gateway.app import create_app
    from gateway.settings import ConfigError, Settings

    settings = Settings(
        db=str(tmp_path / "g.db"),
        upstream_url="http://127.0.0.1:9/v1",
        redis_url="redis://127.0.0.1:9/0",
        redis_max_connections=0,
    )
    with pytest.raises(ConfigError, match="redis_max_connections"):
        create_app(settings)


def test_settlement_counts_in_the_period_and_keys_expire(redis_server: RedisServer, prefix: str) -> None:
    limits = Limits(tokens_per_day=1000)

    async def run() -> None:
        store = _replica(redis_server, prefix)
        await store.start()
        r = await store.reserve(1, limits, Demand(100, 0), NOON)
        assert isinstance(r, Reservation)
        store.settle(r, 60, 0, NOON + 1)
        store.settle(r, 60, 0, NOON + 1)  # idempotent
        await store.aclose()

    _run(run())
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    day_keys = client.keys(prefix + "1:day:*")
    assert len(day_keys) == 1 and client.get(day_keys[0]) == "60"
    # The day's counter expires a day after its day ends (the clock here is the test's NOON).
    assert client.ttl(day_keys[0]) > 0
    assert client.hget(prefix + "1:live", "tokens") == "0" and client.hget(prefix + "1:live", "n") == "0"
    assert 0 < client.pttl(prefix + "1:tpm") <= 61_000


def test_a_dead_replicas_reservations_are_released(redis_server: RedisServer, prefix: str) -> None:
    limits = Limits(max_concurrent=2)

    async def run() -> tuple[Any, Any, Any]:
        dead = _replica(redis_server, prefix, replica_timeout=1)
        await dead.start()
        assert isinstance(await dead.reserve(1, limits, Demand(40, 4), NOON, bound=True), Reservation)
        assert isinstance(await dead.reserve(1, limits, Demand(0, 0), NOON), Reservation)
        dead._beat.cancel() if dead._beat else None  # the process "dies": no heartbeat, no settle
        alive = _replica(redis_server, prefix, replica_timeout=1)
        await alive.start()
        refused = await alive.reserve(1, limits, Demand(0, 0), NOON)
        await asyncio.sleep(1.5)  # the dead replica's heartbeat expires
        await alive._heartbeat()
        admitted = await alive.reserve(1, limits, Demand(0, 0), NOON)
        windows = await alive.windows(1, limits, NOON)
        await alive.aclose()
        return refused, admitted, windows

    refused, admitted, windows = _run(run())
    assert isinstance(refused, Rejection) and refused.limit == "max_concurrent"
    assert isinstance(admitted, Reservation)
    assert windows[0].used == 1
    # The bound among them is released as one: nothing of it left to make refusals wait.
    assert _live(redis_server, prefix, 1) == {**_NOTHING_HELD, "n": "1"}


def test_a_reserve_whose_answer_is_lost_is_released(redis_server: RedisServer, prefix: str) -> None:
    """A timeout after Redis ran the script: the reservation must not be held until the replica stops."""
    limits = Limits(tokens_per_day=1_000, max_concurrent=5)

    async def run() -> tuple[list[Any], list[Any]]:
        store = _replica(redis_server, prefix)
        script = store._reserve

        async def ran_then_lost(**kw: Any) -> Any:
            await script(**kw)
            raise redis.exceptions.TimeoutError("Timeout reading from socket")

        store._reserve = ran_then_lost  # type: ignore[assignment]
        with pytest.raises(QuotaStoreUnavailable):
            await store.reserve(1, limits, Demand(300, 0), NOON)
        store._reserve = script
        await asyncio.gather(*store._tasks)
        after_loss = await store.windows(1, limits, NOON)

        # A release that overtakes its reserve (another connection): the late reserve takes nothing.
        late = Reservation(1, Demand(300, 0), "d", "m", NOON, id=uuid.uuid4().hex)
        await store._settle_once(late, 0, 0, NOON, release=True)
        day, month = time.strftime("%Y-%m-%d", time.gmtime(NOON)), time.strftime("%Y-%m", time.gmtime(NOON))
        raw = await script(
            keys=[*store._keys(1, day, month), store._k("gone:" + late.id)],
            args=[NOON, 300, 0, late.id, "1 300 0", 5, -1, -1, 1000, -1, -1, NOON + 1, NOON + 2],
        )
        assert raw == ["released"]
        after_race = await store.windows(1, limits, NOON)
        await store.aclose()
        return after_loss, after_race

    after_loss, after_race = _run(run())
    for windows in (after_loss, after_race):
        state = {w.name: (w.used, w.reserved) for w in windows}
        assert state == {"tokens_per_day": (0, 0), "max_concurrent": (0, 0)}


def _unreachable(**kw: Any) -> RedisQuota:
    return RedisQuota(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2, **kw)


def test_unreachable_redis_fails_closed_by_default() -> None:
    errors: list[str] = []

    async def run() -> None:
        store = _unreachable(on_error=errors.append)
        with pytest.raises(QuotaStoreUnavailable) as exc:
            await store.reserve(1, Limits(rpm=5), Demand(1, 0), NOON)
        assert exc.value.status == 503 and exc.value.code == "quota_store_unavailable"
        await store.aclose()

    _run(run())
    assert "reserve" in errors


def test_unreachable_redis_fails_open_when_asked() -> None:
    errors: list[str] = []

    async def run() -> None:
        store = _unreachable(on_error=errors.append, fail_open=True)
        r = await store.reserve(1, Limits(rpm=5), Demand(1, 0), NOON)
        assert isinstance(r, Reservation) and r.unchecked
        store.settle(r, 1, 0, NOON)  # nothing to release: never raises
        assert await store.windows(1, Limits(rpm=5), NOON) == []
        await store.aclose()

    _run(run())
    assert errors.count("reserve") == 1


def test_counters_lost_with_redis_are_reloaded_from_the_ledger(
    redis_server: RedisServer, prefix: str
) -> None:
    """Redis restarted empty: one replica reloads the month's settled usage from the ledger."""
    now_totals: Callable[[float], list[tuple[int, int, int, int]]] = lambda now: [(7, 40, 90, 1234)]  # noqa: E731
    limits = Limits(tokens_per_day=100, tokens_per_month=100, spend_per_month=10_000)

    async def run() -> list[Any]:
        store = _replica(redis_server, prefix)
        await store.start(totals=now_totals)
        now = time.time()
        windows = await store.windows(7, limits, now)
        too_much = await store.reserve(7, limits, Demand(11, 0), now)
        await store.aclose()
        return [windows, too_much]

    windows, too_much = _run(run())
    used = {w.name: w.used for w in windows}
    assert used == {"tokens_per_day": 40, "tokens_per_month": 90, "spend_per_month": 1234}
    assert isinstance(too_much, Rejection) and too_much.limit == "tokens_per_month"
