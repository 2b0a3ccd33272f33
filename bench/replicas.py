"""Benchmark: one host on SQLite against one and two replicas sharing PostgreSQL and Redis.

Starts the emulator (zero latency), PostgreSQL and Redis on loopback (Debian's packages, as the
tests start them: ``tests/stores.py``), and ``gateway serve`` processes with full metering (a key
with every limit, so every request reserves and settles on the quota store). Then, for each
deployment, wrk with ``--concurrency`` connections in all (split evenly over the replicas, one wrk
per replica, run at the same time):

1. one gateway on SQLite with in-process quotas (the single-host default);
2. one replica on PostgreSQL + Redis;
3. two replicas on PostgreSQL + Redis.

After each load it checks what a bill depends on: every request wrk counted has one settled
ledger row (rows = wrk's requests, plus at most the requests still in flight when wrk stopped), and
no reservation is left on the quota store. A failed check exits non-zero.

Writes bench/results/replicas.{json,md}.

    python -m bench.replicas [--seconds 10] [--concurrency 32]   (needs wrk, postgresql, redis-server)

Every process shares the machine's cores: on a small machine the second replica competes with the
first, with PostgreSQL, Redis, the emulator and wrk, so the figures show what coordination costs,
not how a cluster of machines scales.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.quota import ALL_LIMITS, wrk
from bench.soak import rss_mb


def _load(urls: list[str], key: str, seconds: int, concurrency: int) -> dict[str, float]:
    """wrk against every replica at once, the connections split evenly; figures summed or worst."""
    share = max(1, concurrency // len(urls))
    with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
        runs = list(pool.map(lambda url: wrk(url, key, seconds, share), urls))
    return {
        "throughput_rps": sum(r["throughput_rps"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
        "timeouts": sum(r["timeouts"] for r in runs),
        "p50_ms": max(r["p50_ms"] for r in runs),
        "p99_ms": max(r["p99_ms"] for r in runs),
        "connections": share * len(urls),
    }


def _check(db: str, key: str, url: str, load: dict[str, float], before: int) -> dict[str, Any]:
    """Every counted request has one settled row; nothing is left reserved once the load is over."""
    from gateway.db import open_db

    started = time.monotonic()
    deadline = started + 30  # settlements retried after a quota-store error wait for a heartbeat
    while True:
        ledger = open_db(db)
        try:
            rows = ledger.query("SELECT state, count(*) AS n FROM requests GROUP BY state")
        finally:
            ledger.close()
        states = {r["state"]: r["n"] for r in rows}
        limits = httpx.get(url + "/v1/limits", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        windows = {w["name"]: w for w in limits.json()["limits"]}
        left = {n: w["reserved"] for n, w in windows.items() if w.get("reserved")}
        in_flight = windows["max_concurrent"]["used"]
        drained = set(states) <= {"settled"} and not left and not in_flight
        if drained or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    written = states.get("settled", 0) - before
    # wrk stops with requests in flight, and gives up on slow ones: the gateway bills both.
    most = load["requests"] + load["connections"] + load["timeouts"]
    problems = []
    if set(states) - {"settled"}:
        problems.append(f"rows not settled: {states}")
    if not load["requests"] <= written <= most:
        counted = f"{load['requests']:.0f} requests counted by wrk"
        problems.append(f"{written} rows for {counted} (at most {most:.0f})")
    if left or in_flight:
        problems.append(f"reservations left after 30 s: {left}, in flight {in_flight}")
    return {"ledger_rows": written, "drained_s": time.monotonic() - started, "problems": problems}


def run(seconds: int, concurrency: int, progress: Callable[[str], None]) -> dict[str, Any]:
    from gateway.db import open_db
    from gateway.keys import KeyStore, load_key_secret
    from gateway.settings import Settings
    from tests.servers import EmulatorProcess, GatewayProcess
    from tests.stores import PostgresServer, RedisServer

    results: dict[str, Any] = {}
    progress("starting PostgreSQL and Redis ...")
    postgres, redis = PostgresServer().start(), RedisServer().start()
    try:
        with tempfile.TemporaryDirectory() as tmp, EmulatorProcess() as emulator:
            shared = {"GATEWAY_REDIS_URL": redis.url}
            deployments = [
                ("one host, SQLite", f"{tmp}/bench.db", 1, {}),
                ("1 replica, PostgreSQL + Redis", postgres.create_database(), 1, shared),
                ("2 replicas, PostgreSQL + Redis", postgres.create_database(), 2, shared),
            ]
            for name, db, n, env in deployments:
                settings = Settings(db=db)
                _, key = KeyStore(open_db(db), load_key_secret(settings)).create(
                    "bench", limits=ALL_LIMITS.as_dict()
                )
                args = ["--upstream", emulator.url + "/v1/openai", "--db", db, "--log-level", "warning"]
                replicas = [GatewayProcess(*args, env=env).start() for _ in range(n)]
                try:
                    urls = [r.url for r in replicas]
                    progress(f"{name}: warming up ...")
                    warm = _load(urls, key, 2, concurrency)
                    before = _check(db, key, urls[0], warm, 0)["ledger_rows"]
                    progress(f"{name}: {seconds} s of wrk, {concurrency} connections ...")
                    figures: dict[str, Any] = dict(_load(urls, key, seconds, concurrency))
                    figures.update(_check(db, key, urls[-1], figures, before))
                    figures["rss_mb"] = [rss_mb(r.proc.pid) for r in replicas if r.proc is not None]
                finally:
                    for replica in replicas:
                        replica.stop()
                results[name] = figures
                progress(
                    f"{name}: {figures['throughput_rps']:.0f} req/s, p50 {figures['p50_ms']:.2f} ms, "
                    f"p99 {figures['p99_ms']:.2f} ms, {figures['ledger_rows']} ledger rows, "
                    f"drained {figures['drained_s']:.1f} s after the load"
                    + (f"; PROBLEMS: {figures['problems']}" if figures["problems"] else "; checks passed")
                )
    finally:
        redis.stop()
        postgres.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10, help="of load per deployment")
    parser.add_argument("--concurrency", type=int, default=32, help="connections in all")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench.replicas needs wrk (Debian: apt-get install -y wrk)")
    results = run(args.seconds, args.concurrency, lambda line: print(line, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"python": sys.version.split()[0], "seconds": args.seconds, "concurrency": args.concurrency}
    (out / "replicas.json").write_text(json.dumps({**report, "deployments": results}, indent=2))
    md = [
        "# One host against replicas on PostgreSQL and Redis",
        "",
        f"wrk, {args.concurrency} connections in all, {args.seconds} s, a key with every limit set.",
        "",
        "| deployment | req/s | p50 ms | p99 ms | ledger rows | RSS MB per replica | checks |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, f in results.items():
        rss = ", ".join(f"{v:.0f}" for v in f["rss_mb"])
        checks = "; ".join(f["problems"]) or "every request settled once, nothing left reserved"
        md.append(
            f"| {name} | {f['throughput_rps']:.0f} | {f['p50_ms']:.2f} | {f['p99_ms']:.2f} "
            f"| {f['ledger_rows']} | {rss} | {checks} |"
        )
    (out / "replicas.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 1 if any(f["problems"] for f in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
