"""Benchmark: what the gateway adds, beside the backend alone and bare pass-through proxies.

Starts the emulator (zero latency), the gateway with full metering (a key with every limit: auth,
tool accounting, quota reserve and settle, ledger, metrics) and three floors (``bench/floor.py``:
the same server and httpx client API, no metering; one on httpx's own pool, one on aiohttp's, one
on the gateway's own HTTP/1.1 client, which the gateway uses by default), each in its own
process; with ``--litellm`` also LiteLLM's proxy in front of the same emulator (installed into
its own virtualenv). Then:

1. interleaved sequential requests (each target in turn) for the seed's tool request and a
   20-tool, ~8k-token request: p50 and p99, what each adds to the backend alone, and the
   gateway's margin over each floor;
2. a concurrency sweep with wrk (1, 8, 32, 128 connections) for each of the two requests:
   throughput and p99 for each target, in interleaved rounds (the median round is kept; each
   ratio is the median of the rounds' ratios);
3. the gateway's RSS at rest and at its peak under the load;
4. each of the performance issue's targets judged on this run's figures (:func:`target_checks`,
   the report's last table).

Writes bench/results/overhead.{json,md}; prints progress as it goes.

    python -m bench.overhead [--requests 500] [--seconds 4] [--rounds 3] [--litellm]
                             [--backend-cpu N]   (needs wrk)

``--backend-cpu N`` runs the backend (the emulator) on CPU N alone and every other process (the
client, the floors, the gateway, LiteLLM, wrk) on the other CPUs, as a backend on hardware of its
own would be. Otherwise all share every CPU, and where the kernel runs the backend, woken by a
proxy's write, depends on what that proxy does next: on this two-core machine the backend began
on the gateway's long request about 0.1 ms later than on the floor's (README, "The backend's
CPU").
"""

from __future__ import annotations

import argparse
import json
import os
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


def seed_request() -> dict[str, Any]:
    """The seed's request: its tools, no max_tokens."""
    return {"model": SEED_MODEL, "messages": SEED_MESSAGES, "tools": SEED_TOOLS, "tool_choice": "auto"}


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


TRANSPORTS = ("httpx", "aiohttp", "http1")
CONNECTIONS = (1, 8, 32, 128)


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
    for name in out:
        out[name]["added_p50_ms"] = out[name]["p50_ms"] - out["direct"]["p50_ms"]
        out[name]["added_p99_ms"] = out[name]["p99_ms"] - out["direct"]["p99_ms"]
    return out


def _start_floor(emulator_url: str, transport: str) -> tuple[subprocess.Popen[bytes], str]:
    from tests.servers import free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.floor",
            "--port",
            str(port),
            "--upstream",
            emulator_url + "/v1/openai",
            "--transport",
            transport,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    _wait_up(url + "/v1/models", proc)
    return proc, url


def split_cpus(backend: int, allowed: set[int]) -> tuple[set[int], set[int]]:
    """(the backend's CPU, the others') for ``--backend-cpu``, from the CPUs this process may use."""
    if backend not in allowed:
        raise SystemExit(f"--backend-cpu {backend}: not one of this process's CPUs {sorted(allowed)}")
    if len(allowed) < 2:
        raise SystemExit("--backend-cpu needs at least two CPUs: one for the backend, one for the rest")
    return {backend}, allowed - {backend}


def _wait_up(url: str, proc: subprocess.Popen[Any], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--seconds", type=int, default=4, help="per wrk run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="wrk runs per target and concurrency, interleaved (median kept)"
    )
    parser.add_argument(
        "--litellm",
        action="store_true",
        help="also LiteLLM's proxy, installed from PyPI into its own virtualenv (bench/litellm.py)",
    )
    parser.add_argument(
        "--backend-cpu",
        type=int,
        metavar="N",
        help="run the backend on CPU N alone, everything else on the other CPUs",
    )
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench.overhead needs wrk (Debian: apt-get install -y wrk)")
    backend_cpus = None
    if args.backend_cpu is not None:
        backend_cpus, others = split_cpus(args.backend_cpu, os.sched_getaffinity(0))
        os.sched_setaffinity(0, others)  # this process, and every process it starts from now on

    from gateway.db import open_db
    from gateway.keys import KeyStore, load_key_secret
    from gateway.settings import Settings
    from tests.servers import EmulatorProcess, GatewayProcess

    result: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "rounds": args.rounds}
    if backend_cpus is not None:
        result["backend_cpu"] = args.backend_cpu
    procs: list[subprocess.Popen[Any]] = []
    with tempfile.TemporaryDirectory() as tmp, EmulatorProcess(cpus=backend_cpus) as emulator:
        settings = Settings(db=f"{tmp}/bench.db")
        _, key = KeyStore(open_db(settings.db), load_key_secret(settings)).create(
            "bench", limits=ALL_LIMITS.as_dict()
        )
        gateway = GatewayProcess(
            "--upstream", emulator.url + "/v1/openai", "--db", settings.db, "--log-level", "warning"
        ).start()
        try:
            floors = {}
            for transport in TRANSPORTS:
                proc, url = _start_floor(emulator.url, transport)
                procs.append(proc)
                floors[f"floor-{transport}"] = url
            assert gateway.proc is not None
            result["rss_mb_at_rest"] = rss_mb(gateway.proc.pid)
            targets: dict[str, tuple[str, dict[str, str]]] = {
                "direct": (emulator.url, {}),
                **{name: (url, {}) for name, url in floors.items()},
                "gateway": (gateway.url, {"Authorization": f"Bearer {key}"}),
            }
            if args.litellm:
                from bench.litellm import start_litellm

                print("LiteLLM: installing into its own virtualenv and starting ...", flush=True)
                proc, url, master = start_litellm(emulator.url + "/v1/openai", Path(tmp))
                procs.append(proc)
                targets["litellm"] = (url, {"Authorization": f"Bearer {master}"})
                result["litellm_version"] = _litellm_version()
            bodies = {
                "seed": seed_request(),
                "20 tools, 8k tokens": big_request(),
            }
            result["sequential"] = {}
            for name, body in bodies.items():
                print(f"sequential: {name} ...", flush=True)
                result["sequential"][name] = sequential(targets, body, args.requests)
                for target, figures in result["sequential"][name].items():
                    print(
                        f"  {target:>13}: p50 {figures['p50_ms']:.3f} ms, p99 {figures['p99_ms']:.3f} ms",
                        flush=True,
                    )
            result["sweep"] = {name: {} for name in bodies}
            result["ratios"] = {name: {} for name in bodies}
            peak = result["rss_mb_at_rest"]
            for name, body in bodies.items():
                for connections in CONNECTIONS:
                    # Rounds, each target in turn: the machine's speed drifts (other tenants, other
                    # processes), and a ratio is fair only between runs made close together.
                    rounds: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
                    for r in range(args.rounds):
                        for target, (url, headers) in targets.items():
                            token = headers.get("Authorization", "Bearer x").split()[-1]
                            figures = wrk(url, token, args.seconds, connections, body)
                            if target == "gateway":
                                peak = max(peak, rss_mb(gateway.proc.pid))
                            rounds[target].append(figures)
                            print(
                                f"sweep {name}, {connections:>3} connections, round {r + 1}/{args.rounds}, "
                                f"{target:>13}: {figures['throughput_rps']:7.0f} req/s, "
                                f"p99 {figures['p99_ms']:.2f} ms",
                                flush=True,
                            )
                    for target, runs in rounds.items():
                        median = sorted(runs, key=lambda f: f["throughput_rps"])[len(runs) // 2]
                        result["sweep"][name][f"{target}@{connections}"] = {**median, "rounds": runs}
                        if target != "gateway":
                            result["ratios"][name][f"gateway/{target}@{connections}"] = statistics.median(
                                g["throughput_rps"] / o["throughput_rps"]
                                for g, o in zip(rounds["gateway"], runs, strict=True)
                            )
            result["rss_mb_after_load"] = max(peak, rss_mb(gateway.proc.pid))
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=15)
            gateway.stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(result, indent=2))
    md = report(result)
    (out / "overhead.md").write_text(md)
    print(md)
    return 0


def _litellm_version() -> str:
    from bench.litellm import version

    return version()


# The performance issue's targets, judged against the floor on the gateway's own client.
FLOOR = "floor-http1"
MAX_ADDED_P50_OVER_FLOOR_MS = 0.3
MAX_ADDED_P99_MS = 3.0  # at concurrency 1: the sequential requests
MIN_THROUGHPUT_OVER_FLOOR = 0.8  # at 32 connections
MIN_THROUGHPUT_OVER_LITELLM = 5.0
MAX_RSS_MB = 150.0


def target_checks(result: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """Each of the issue's targets in this run: (what, the figure, the target, met)."""
    rows: list[tuple[str, str, str, bool]] = []
    for name, figures in result["sequential"].items():
        if FLOOR not in figures:
            continue
        over = figures["gateway"]["p50_ms"] - figures[FLOOR]["p50_ms"]
        rows.append(
            (
                f"{name}: added p50 over {FLOOR}",
                f"{over:+.3f} ms",
                f"<= {MAX_ADDED_P50_OVER_FLOOR_MS} ms",
                over <= MAX_ADDED_P50_OVER_FLOOR_MS,
            )
        )
        p99 = figures["gateway"]["added_p99_ms"]
        rows.append(
            (
                f"{name}: added p99 at concurrency 1",
                f"{p99:+.3f} ms",
                f"<= {MAX_ADDED_P99_MS} ms",
                p99 <= MAX_ADDED_P99_MS,
            )
        )
    for name, ratios in result.get("ratios", {}).items():
        for other, least in ((FLOOR, MIN_THROUGHPUT_OVER_FLOOR), ("litellm", MIN_THROUGHPUT_OVER_LITELLM)):
            ratio = ratios.get(f"gateway/{other}@32")
            if ratio is not None:
                rows.append(
                    (
                        f"{name}: throughput at 32 connections / {other}",
                        f"{ratio:.2f}x",
                        f">= {least}x",
                        ratio >= least,
                    )
                )
    rss = result["rss_mb_after_load"]
    rows.append(("RSS under load", f"{rss:.1f} MB", f"<= {MAX_RSS_MB:.0f} MB", rss <= MAX_RSS_MB))
    return rows


def report(result: dict[str, Any]) -> str:
    floors = [f"floor-{t}" for t in TRANSPORTS]
    md = [
        "# Gateway overhead",
        "",
        f"Python {result['python']}, {result.get('cpus')} CPUs. Added = the target's p50 (p99) minus the",
        "backend's alone; the gateway's margin is measured against each floor. Throughput: the median",
        f"of {result.get('rounds', 1)} interleaved rounds; each ratio is the median of the rounds' ratios.",
        *(
            [f"The backend ran on CPU {result['backend_cpu']} alone, every other process on the other CPUs."]
            if "backend_cpu" in result
            else []
        ),
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
        g = figures["gateway"]
        for floor in floors:
            md.append(
                f"| {name} | gateway - {floor} | | | {g['p50_ms'] - figures[floor]['p50_ms']:.3f} "
                f"| {g['p99_ms'] - figures[floor]['p99_ms']:.3f} |"
            )
    for name, sweep in result["sweep"].items():
        targets = [t.split("@")[0] for t in sweep if t.endswith(f"@{CONNECTIONS[0]}")]
        others = [t for t in targets if t not in ("direct", "gateway")]
        md += [
            "",
            f"Concurrency sweep, {name} request:",
            "",
            "| connections | "
            + " | ".join(f"{t} req/s" for t in targets)
            + " | gateway p99 ms | "
            + " | ".join(f"gateway / {t}" for t in others)
            + " |",
            "|---:|" + "---:|" * (len(targets) + 1 + len(others)),
        ]
        for c in CONNECTIONS:
            rps = {t: sweep[f"{t}@{c}"]["throughput_rps"] for t in targets}
            ratios = [result["ratios"][name].get(f"gateway/{t}@{c}", rps["gateway"] / rps[t]) for t in others]
            md.append(
                f"| {c} | "
                + " | ".join(f"{rps[t]:.0f}" for t in targets)
                + f" | {sweep[f'gateway@{c}']['p99_ms']:.2f} | "
                + " | ".join(f"{r:.2f}" for r in ratios)
                + " |"
            )
    md += [
        "",
        f"Gateway RSS: {result['rss_mb_at_rest']:.1f} MB at rest, "
        f"{result['rss_mb_after_load']:.1f} MB at most under load.",
    ]
    if "litellm_version" in result:
        md.append(f"LiteLLM: {result['litellm_version']}.")
    md += [
        "",
        "Against the performance issue's targets (this run):",
        "",
        "| target | this run | target | met |",
        "|---|---:|---:|---|",
        *(
            f"| {what} | {figure} | {limit} | {'yes' if met else '**no**'} |"
            for what, figure, limit, met in target_checks(result)
        ),
    ]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
