"""Benchmark: what the gateway adds, beside the backend alone and a bare pass-through proxy.

Starts the emulator (zero latency), the gateway with full metering (a key with every limit: auth,
tool accounting, quota reserve and settle, ledger, metrics) and the floor (``bench/floor.py``:
the same server and HTTP client, no metering), each in its own process. Then:

1. interleaved sequential requests (direct, floor, gateway) for the seed's tool request and a
   20-tool, ~8k-token request: p50 and p99, and what the floor and the gateway add;
2. a concurrency sweep with wrk (1, 8, 32, 128 connections): throughput and p99 for each;
3. the gateway's RSS at rest and after the load.

Writes bench/results/overhead.{json,md}.

    python -m bench.overhead [--requests 500] [--seconds 5]     (needs wrk: apt-get install -y wrk)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.quota import ALL_LIMITS, wrk
from bench.soak import rss_mb
from gateway.emulator.seed import SEED_MESSAGES, SEED_MODEL, SEED_TOOLS

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "seal_tools.jsonl"


def big_request() -> dict[str, Any]:
    lines = CORPUS.read_text().splitlines()
    tools = [json.loads(line) for line in lines[:20]]
    messages: list[dict[str, Any]] = []
    i = 0
    while sum(len(m["content"]) for m in messages) < 30_000:
        text = " ".join(json.loads(lines[20 + i + k])["function"]["description"] for k in range(8))
        messages.append({"role": "user" if len(messages) % 2 == 0 else "assistant", "content": text})
        i += 8
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": "Which tool fits best?"})
    return {"model": "mistralai/Mistral-7B-Instruct-v0.3", "messages": messages, "tools": tools}


def sequential(
    targets: dict[str, tuple[str, dict[str, str]]], body: dict[str, Any], n: int
) -> dict[str, Any]:
    samples: dict[str, list[float]] = {name: [] for name in targets}
    clients = {name: httpx.Client(base_url=url, headers=h, timeout=30) for name, (url, h) in targets.items()}
    try:
        for i in range(n + 20):
            for name, client in clients.items():
                t0 = time.perf_counter()
                resp = client.post("/v1/chat/completions", json=body)
                elapsed = time.perf_counter() - t0
                assert resp.status_code == 200, (name, resp.text)
                if i >= 20:
                    samples[name].append(elapsed)
    finally:
        for client in clients.values():
            client.close()
    out: dict[str, Any] = {}
    for name, values in samples.items():
        values.sort()
        out[name] = {
            "p50_ms": statistics.median(values) * 1000,
            "p99_ms": values[int(len(values) * 0.99) - 1] * 1000,
        }
    for name in ("floor", "gateway"):
        out[name]["added_p50_ms"] = out[name]["p50_ms"] - out["direct"]["p50_ms"]
        out[name]["added_p99_ms"] = out[name]["p99_ms"] - out["direct"]["p99_ms"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--seconds", type=int, default=5, help="per wrk run")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench.overhead needs wrk (Debian: apt-get install -y wrk)")

    from gateway.db import open_db
    from gateway.keys import KeyStore, load_key_secret
    from gateway.settings import Settings
    from tests.servers import EmulatorProcess, GatewayProcess, free_port

    result: dict[str, Any] = {"python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory() as tmp, EmulatorProcess() as emulator:
        settings = Settings(db=f"{tmp}/bench.db")
        _, key = KeyStore(open_db(settings.db), load_key_secret(settings)).create(
            "bench", limits=ALL_LIMITS.as_dict()
        )
        gateway = GatewayProcess(
            "--upstream", emulator.url + "/v1/openai", "--db", settings.db, "--log-level", "warning"
        ).start()
        floor_port = free_port()
        floor = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.floor",
                "--port",
                str(floor_port),
                "--upstream",
                emulator.url + "/v1/openai",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            floor_url = f"http://127.0.0.1:{floor_port}"
            for _ in range(100):
                try:
                    httpx.get(floor_url + "/v1/models", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            assert gateway.proc is not None
            result["rss_mb_at_rest"] = rss_mb(gateway.proc.pid)
            targets = {
                "direct": (emulator.url, {}),
                "floor": (floor_url, {}),
                "gateway": (gateway.url, {"Authorization": f"Bearer {key}"}),
            }
            seed = {
                "model": SEED_MODEL,
                "messages": SEED_MESSAGES,
                "tools": SEED_TOOLS,
                "tool_choice": "auto",
            }
            result["sequential"] = {}
            for name, body in (("seed", seed), ("20 tools, 8k tokens", big_request())):
                print(f"sequential: {name} ...", flush=True)
                result["sequential"][name] = sequential(targets, body, args.requests)
                for target, figures in result["sequential"][name].items():
                    print(
                        f"  {target:>8}: p50 {figures['p50_ms']:.3f} ms, p99 {figures['p99_ms']:.3f} ms",
                        flush=True,
                    )
            result["sweep"] = {}
            for connections in (1, 8, 32, 128):
                for target, (url, headers) in targets.items():
                    figures = wrk(
                        url, headers.get("Authorization", "Bearer x").split()[-1], args.seconds, connections
                    )
                    result["sweep"][f"{target}@{connections}"] = figures
                    print(
                        f"sweep {connections:>3} connections, {target:>8}: "
                        f"{figures['throughput_rps']:7.0f} req/s, p99 {figures['p99_ms']:.2f} ms",
                        flush=True,
                    )
            result["rss_mb_after_load"] = rss_mb(gateway.proc.pid)
        finally:
            floor.terminate()
            floor.wait(timeout=10)
            gateway.stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(result, indent=2))
    md = [
        "# Gateway overhead",
        "",
        "| request | target | p50 ms | p99 ms | added p50 ms | added p99 ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, figures in result["sequential"].items():
        for target, f in figures.items():
            md.append(
                f"| {name} | {target} | {f['p50_ms']:.3f} | {f['p99_ms']:.3f} "
                f"| {f.get('added_p50_ms', 0):.3f} | {f.get('added_p99_ms', 0):.3f} |"
            )
    md += [
        "",
        "| connections | direct req/s | floor req/s | gateway req/s | gateway / floor | gateway p99 ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for c in (1, 8, 32, 128):
        d, f, g = (result["sweep"][f"{t}@{c}"] for t in ("direct", "floor", "gateway"))
        md.append(
            f"| {c} | {d['throughput_rps']:.0f} | {f['throughput_rps']:.0f} | {g['throughput_rps']:.0f} "
            f"| {g['throughput_rps'] / f['throughput_rps']:.2f} | {g['p99_ms']:.2f} |"
        )
    md += [
        "",
        f"Gateway RSS: {result['rss_mb_at_rest']:.1f} MB at rest, "
        f"{result['rss_mb_after_load']:.1f} MB after load.",
    ]
    (out / "overhead.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
