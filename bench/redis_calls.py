"""Benchmark: what the quota store's Redis calls cost the gateway, on each client it has.

Starts ``redis-server`` on loopback (as the tests do) and runs the store's calls for a request
with every limit (a reserve, then its settle) through :class:`gateway.redis_quota.RedisQuota`,
once on redis-py's client and once on the pipelined connection (``gateway/resp.py``), rounds
alternated:

1. in sequence: the calling process's CPU time and the wall time per reserve and settle pair;
2. at once: ``--concurrency`` requests' pairs in flight together, pairs per second;

then checks that nothing is left reserved (else it fails).

Writes bench/results/redis_calls.{json,md}; prints each round.

    python -m bench.redis_calls [--pairs 2000] [--rounds 3] [--concurrency 64]   (needs redis-server)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.quota import ALL_LIMITS
from gateway.quota import Demand, Reservation
from gateway.redis_quota import RedisQuota

CLIENTS = {"redis-py": False, "pipelined": True}


async def _pair(store: RedisQuota) -> None:
    reservation = await store.reserve(1, ALL_LIMITS, Demand(100, 10), time.time())
    assert isinstance(reservation, Reservation), reservation
    store.settle(reservation, 60, 6, time.time())


async def _round(url: str, pipelined: bool, pairs: int, concurrency: int) -> dict[str, float]:
    store = RedisQuota(url, prefix=f"bench{uuid.uuid4().hex[:8]}:", pipelined=pipelined)
    await store.start()
    try:
        for _ in range(100):  # connections made, scripts loaded
            await _pair(store)
        await asyncio.gather(*store._tasks)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(pairs):
            await _pair(store)
            await asyncio.gather(*store._tasks)  # the settle, as a request's would run
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        started = time.perf_counter()
        for _ in range(pairs // concurrency):
            await asyncio.gather(*(_pair(store) for _ in range(concurrency)))
        await asyncio.gather(*store._tasks)
        burst = time.perf_counter() - started
        held = await store.outstanding_async()
        if held != (0, 0):  # every pair settled: a figure over leaked reservations means nothing
            raise RuntimeError(f"{'pipelined' if pipelined else 'redis-py'}: left held {held}")
        return {
            "cpu_ms_per_pair": cpu / pairs * 1000,
            "wall_ms_per_pair": wall / pairs * 1000,
            "pairs_per_s_at_once": (pairs // concurrency) * concurrency / burst,
        }
    finally:
        await store.aclose()


def run(pairs: int, rounds: int, concurrency: int, say: Any = print) -> dict[str, Any]:
    from tests.stores import RedisServer

    server = RedisServer().start()
    try:
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in CLIENTS}
        for r in range(rounds):
            for name, pipelined in CLIENTS.items():
                figures = asyncio.run(_round(server.url, pipelined, pairs, concurrency))
                samples[name].append(figures)
                say(
                    f"round {r + 1}/{rounds}, {name:>9}: {figures['cpu_ms_per_pair']:.3f} ms CPU, "
                    f"{figures['wall_ms_per_pair']:.3f} ms wall per pair; "
                    f"{figures['pairs_per_s_at_once']:.0f} pairs/s with {concurrency} at once"
                )
    finally:
        server.stop()
    return {
        name: {key: statistics.median(s[key] for s in rows) for key in rows[0]} | {"rounds": rows}
        for name, rows in samples.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=2000, help="reserve and settle pairs per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    if args.pairs < args.concurrency or args.rounds < 1:
        parser.error("--pairs must be at least --concurrency, and --rounds at least 1")
    results = run(args.pairs, args.rounds, args.concurrency, lambda line: print(line, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"python": sys.version.split()[0], "pairs": args.pairs, "concurrency": args.concurrency}
    (out / "redis_calls.json").write_text(json.dumps({**report, "clients": results}, indent=2))
    lines = [
        f"Reserve and settle pairs against redis-server on loopback, medians of {args.rounds} rounds.",
        "",
        f"| client | CPU ms per pair | wall ms per pair | pairs/s, {args.concurrency} at once |",
        "|---|---:|---:|---:|",
    ]
    for name, f in results.items():
        lines.append(
            f"| {name} | {f['cpu_ms_per_pair']:.3f} | {f['wall_ms_per_pair']:.3f} | "
            f"{f['pairs_per_s_at_once']:.0f} |"
        )
    (out / "redis_calls.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
