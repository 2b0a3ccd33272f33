"""The Redis calls benchmark: each client measured (the benchmark fails if a pair leaves anything held)."""

from __future__ import annotations

from bench import redis_calls
from gateway.redis_quota import RedisQuota
from tests.stores import RedisServer


def test_both_clients_are_measured_and_settle_everything() -> None:
    lines: list[str] = []
    results = redis_calls.run(pairs=64, rounds=1, concurrency=16, say=lines.append)
    assert set(results) == {"redis-py", "pipelined"}
    for figures in results.values():
        assert figures["cpu_ms_per_pair"] > 0 and figures["wall_ms_per_pair"] > 0
        assert figures["pairs_per_s_at_once"] > 0
    assert len(lines) == 2 and "pipelined" in lines[1]


def test_the_store_can_be_kept_on_redis_pys_client(redis_server: RedisServer) -> None:
    assert RedisQuota(redis_server.url, pipelined=False)._pipelined is None
    assert RedisQuota(redis_server.url)._pipelined is not None
