"""Quota counters on a real Redis: the same decisions as in-process, atomic across replicas."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis

from gateway.errors import QuotaStoreUnavailable
from gateway.limits import Limits
from gateway.quota import Demand, LocalQuota, Rejection, Reservation, _day_start
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
    """A random sequence of reserves and settles: same verdicts, same messages, same windows."""
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
        now = NOON
        for step in range(300):
            now += rng.choice([0.0, 0.5, 3.0, 20.0])
            if held and rng.random() < 0.5:
                a, b = held.pop(rng.randrange(len(held)))
                used = rng.randint(0, a.demand.tokens)
                spend = rng.randint(0, a.demand.spend)
                local.settle(a, used, spend, now)
                shared.settle(b, used, spend, now)
                await asyncio.sleep(0)
                await asyncio.gather(*shared._tasks)
                continue
            demand = Demand(rng.randint(1, 900), rng.randint(0, 5_000))
            expected = await local.reserve(1, limits, demand, now)
            got = await shared.reserve(1, limits, demand, now)
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
                # The rate-limit headers' windows, read by the reserve itself.
                assert got.rate == expected.rate, step
                held.append((expected, got))
            assert await shared.windows(1, limits, now) == local.windows_now(1, limits, now), step
        await shared.aclose()

    _run(run())


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
        assert isinstance(await dead.reserve(1, limits, Demand(0, 0), NOON), Reservation)
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
