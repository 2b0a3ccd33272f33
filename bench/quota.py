"""Benchmark: what quota enforcement costs, alone and through the gateway at 32 concurrent requests.

1. check + reserve + settle on LocalQuota with all six limits set: median cost per request.
2. The gateway (``gateway serve``) in front of the zero-latency emulator (``gateway emulator``),
   each in its own process, loaded by wrk with 32 connections: a key with every limit set (high
   enough never to refuse) against a key with none.
   The difference in mean latency and throughput is what enforcement adds.

Writes bench/results/quota.{json,md}.

    python -m bench.quota [--seconds 10] [--concurrency 32] [--out bench/results]   (needs wrk)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.limits import Limits
from gateway.quota import Demand, LocalQuota, Rejection

ALL_LIMITS = Limits(
    tokens_per_day=10**12,
    tokens_per_month=10**12,
    spend_per_month=10**15,
    rpm=10**9,
    tpm=10**12,
    max_concurrent=10**6,
)
BODY = {
    "model": "mistralai/Mistral-7B-Instruct-v0.3",
    "messages": [{"role": "user", "content": "What is the weather in San Francisco?"}],
    "max_tokens": 16,
}


def micro(n: int) -> float:
    """Median microseconds for one check + reserve + settle."""

    async def run() -> list[float]:
        quota = LocalQuota()
        samples = []
        now = time.time()
        for i in range(n):
            t0 = time.perf_counter()
            r = await quota.reserve(1, ALL_LIMITS, Demand(100, 50), now + i * 0.001)
            assert not isinstance(r, Rejection)
            quota.settle(r, 90, 45, now + i * 0.001)
            samples.append(time.perf_counter() - t0)
        return samples

    return statistics.median(asyncio.run(run())) * 1e6


def wrk(
    url: str, key: str, seconds: int, connections: int, body: dict[str, Any] | None = None
) -> dict[str, float]:
    """Load from wrk (a C load generator: a Python client would be the bottleneck at 32 connections),
    each request a chat completion with ``body`` (default :data:`BODY`)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            # A Lua string literal: JSON's escapes of a JSON text are Lua's too (\\ \" \n).
            f"wrk.body = {json.dumps(json.dumps(BODY if body is None else body))}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {key}"\n'
        )
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            script.name,
            url + "/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    Path(script.name).unlink()
    if "Non-2xx" in out:
        raise RuntimeError(f"the gateway refused requests during the benchmark:\n{out}")
    return {
        "throughput_rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        # Sent but unanswered within the timeout: the server still serves (and bills) them.
        "timeouts": int(m.group(1)) if (m := re.search(r"timeout (\d+)", out)) else 0,
        "p50_ms": _ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1)),  # type: ignore[union-attr]
        "p99_ms": _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1)),  # type: ignore[union-attr]
        "mean_ms": _ms(re.search(r"Latency\s+([\d.]+\w+)", out).group(1)),  # type: ignore[union-attr]
    }


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def end_to_end(seconds: int, concurrency: int, progress: Any) -> dict[str, Any]:
    """The emulator and the gateway each in their own process, as operators run them."""
    from gateway.db import open_db
    from gateway.keys import KeyStore, load_key_secret
    from gateway.settings import Settings
    from tests.servers import EmulatorProcess, GatewayProcess

    with tempfile.TemporaryDirectory() as tmp, EmulatorProcess() as emulator:
        settings = Settings(db=f"{tmp}/bench.db")
        store = KeyStore(open_db(settings.db), load_key_secret(settings))
        _, limited = store.create("limited", limits=ALL_LIMITS.as_dict())
        _, free = store.create("free")
        gateway = GatewayProcess(
            "--upstream", emulator.url + "/v1/openai", "--db", settings.db, "--log-level", "warning"
        ).start()
        try:
            wrk(gateway.url, free, 2, concurrency)  # warm up both processes
            results: dict[str, list[dict[str, float]]] = {}
            for round_ in range(3):  # interleaved rounds: machine noise hits both keys alike
                for name, key in (("no_limits", free), ("all_limits", limited)):
                    r = wrk(gateway.url, key, seconds, concurrency)
                    results.setdefault(name, []).append(r)
                    progress(
                        f"round {round_ + 1}, {name:>10}: {r['throughput_rps']:7.0f} req/s, "
                        f"mean {r['mean_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms"
                    )
        finally:
            gateway.stop()
    summary: dict[str, Any] = {
        name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()
    }
    summary["added_mean_ms"] = summary["all_limits"]["mean_ms"] - summary["no_limits"]["mean_ms"]
    summary["throughput_ratio"] = (
        summary["all_limits"]["throughput_rps"] / summary["no_limits"]["throughput_rps"]
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10, help="per round and key")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    per_request = micro(20000)
    print(f"check + reserve + settle, all six limits: {per_request:.2f} us (median)", flush=True)
    if shutil.which("wrk") is None:
        raise SystemExit("bench.quota needs wrk (Debian: apt-get install -y wrk)")
    e2e = end_to_end(args.seconds, args.concurrency, lambda line: print(line, flush=True))
    result = {
        "python": sys.version.split()[0],
        "reserve_settle_us": per_request,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "end_to_end": e2e,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quota.json").write_text(json.dumps(result, indent=2))
    md = [
        "# Quota enforcement cost",
        "",
        f"- check + reserve + settle (LocalQuota, all six limits): {per_request:.2f} µs median",
        f"- through the gateway (wrk, {args.concurrency} connections, {args.seconds} s per round and key), "
        "median of 3 interleaved rounds:",
        "",
        "| key | req/s | mean ms | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("no_limits", "all_limits"):
        r = e2e[name]
        md.append(
            f"| {name} | {r['throughput_rps']:.0f} | {r['mean_ms']:.2f} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} |"
        )
    md += [
        "",
        f"Added mean latency: {e2e['added_mean_ms']:.3f} ms; throughput ratio {e2e['throughput_ratio']:.3f}.",
    ]
    (out / "quota.md").write_text("\n".join(md) + "\n")
    print(f"\nwrote {out / 'quota.json'} and {out / 'quota.md'}")


if __name__ == "__main__":
    main()
