"""Soak test: a steady rate against the emulator for minutes, then the books are checked.

Loopback only, bounded in time, stops by itself. A mix of traffic at a steady rate: tool calls
(the seed's request), text streams, streams the client walks away from, and backend failures.
Every few seconds the gateway's RSS is sampled. At the end:
- every request sent is one ledger row, settled (none pending, none lost);
- the key's reservations and in-flight count are back to zero (nothing leaked);
- RSS stayed under the stated bound.

    python -m bench.soak [--minutes 10] [--rate 40] [--rss-bound-mb 150] [--out bench/results]

Not part of the default test run; exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from gateway.emulator.seed import SEED_MESSAGES, SEED_TOOLS

MODEL = "mistralai/Mistral-7B-Instruct-v0.3"
KINDS = ("tools", "text_stream", "abandoned_stream", "backend_error")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one(client: httpx.AsyncClient, kind: str, counts: dict[str, int]) -> None:
    url = "/v1/chat/completions"
    try:
        if kind == "tools":
            r = await client.post(url, json={"model": MODEL, "messages": SEED_MESSAGES, "tools": SEED_TOOLS})
            counts[f"{kind}:{r.status_code}"] = counts.get(f"{kind}:{r.status_code}", 0) + 1
        elif kind == "backend_error":
            r = await client.post(
                url, json={"model": MODEL, "messages": SEED_MESSAGES}, headers={"x-emulator-status": "503"}
            )
            counts[f"{kind}:{r.status_code}"] = counts.get(f"{kind}:{r.status_code}", 0) + 1
        else:
            body = {"model": MODEL, "messages": SEED_MESSAGES, "stream": True}
            async with client.stream("POST", url, json=body) as r:
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: {")
                    if kind == "abandoned_stream" and seen == 3:
                        break
            counts[f"{kind}:{r.status_code}"] = counts.get(f"{kind}:{r.status_code}", 0) + 1
    except httpx.HTTPError as exc:
        counts[f"{kind}:{type(exc).__name__}"] = counts.get(f"{kind}:{type(exc).__name__}", 0) + 1


async def drive(url: str, key: str, rate: float, seconds: float, pid: int, progress: Any) -> dict[str, Any]:
    counts: dict[str, int] = {}
    samples: list[tuple[float, float]] = []
    tasks: set[asyncio.Task[None]] = set()
    kinds = itertools.cycle(KINDS)
    sent = 0
    async with httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
        limits=httpx.Limits(max_connections=64),
    ) as client:
        start = time.monotonic()
        next_sample = start
        while (now := time.monotonic()) - start < seconds:
            due = int((now - start) * rate) + 1
            while sent < due:
                task = asyncio.create_task(one(client, next(kinds), counts))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            if now >= next_sample:
                samples.append((now - start, rss_mb(pid)))
                if len(samples) % 12 == 1:
                    progress(
                        f"{now - start:6.0f} s: {sent} requests sent, gateway RSS {samples[-1][1]:.1f} MB"
                    )
                next_sample += 5
            await asyncio.sleep(min(0.01, 1 / rate))
        await asyncio.gather(*tasks)
    return {"sent": sent, "counts": counts, "rss_samples": samples}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=40, help="requests per second")
    parser.add_argument("--rss-bound-mb", type=float, default=150)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()

    from gateway.db import open_db
    from gateway.keys import KeyStore, load_key_secret
    from gateway.settings import Settings
    from tests.servers import EmulatorProcess, GatewayProcess

    with (
        EmulatorProcess("--latency", "0.05", "--token-latency", "0.01") as emulator,
        tempfile.TemporaryDirectory() as tmp,
    ):
        settings = Settings(db=f"{tmp}/soak.db")
        _, key = KeyStore(open_db(settings.db), load_key_secret(settings)).create(
            "soak", limits={"tokens_per_day": 10**12, "max_concurrent": 1000, "rpm": 10**6}
        )
        gateway = GatewayProcess(
            "--upstream",
            emulator.url + "/v1/openai",
            "--db",
            settings.db,
            "--log-level",
            "warning",
        ).start()
        assert gateway.proc is not None
        try:
            run = asyncio.run(
                drive(
                    gateway.url,
                    key,
                    args.rate,
                    args.minutes * 60,
                    gateway.proc.pid,
                    lambda line: print(line, flush=True),
                )
            )
            time.sleep(1)
            limits = httpx.get(gateway.url + "/v1/limits", headers={"Authorization": f"Bearer {key}"}).json()
            rss_end = rss_mb(gateway.proc.pid)
        finally:
            gateway.stop()
        conn = sqlite3.connect(settings.db)
        rows = conn.execute("SELECT state, count(*) FROM requests GROUP BY state").fetchall()
        conn.close()

    by_state = dict(rows)
    windows = {w["name"]: w for w in limits["limits"]}
    rss = [mb for _, mb in run["rss_samples"]]
    result = {
        "minutes": args.minutes,
        "rate": args.rate,
        "sent": run["sent"],
        "outcomes": run["counts"],
        "ledger_rows": by_state,
        "in_flight_after": windows["max_concurrent"]["used"],
        "reserved_tokens_after": windows["tokens_per_day"]["reserved"],
        "rss_mb": {"start": rss[0], "max": max([*rss, rss_end]), "end": rss_end},
        "rss_bound_mb": args.rss_bound_mb,
    }
    checks = {
        "every request is one settled ledger row": by_state.get("settled", 0) == run["sent"]
        and len(by_state) == 1,
        "no reservation leaked": result["in_flight_after"] == 0 and result["reserved_tokens_after"] == 0,
        f"RSS stayed under {args.rss_bound_mb:.0f} MB": result["rss_mb"]["max"] < args.rss_bound_mb,
    }
    result["checks"] = checks
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
