"""Benchmark: what the gateway adds to streams.

- Text stream: time to first token (first content chunk) direct from the emulator and through
  the gateway, interleaved request by request; the difference is what the gateway adds.
- Emulated tool stream: the backend answers tool requests only without streaming; the gateway
  turns the answer into a stream. Compared: the direct non-streaming call's total time and the
  gateway's stream, to its first chunk and to ``[DONE]``.

The emulator and the gateway run as separate processes (``gateway emulator``, ``gateway serve``).
Writes bench/results/streaming.{json,md}.

    python -m bench.streaming [--requests 300] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from gateway.emulator.seed import SEED_MESSAGES, SEED_TOOLS

MODEL = "mistralai/Mistral-7B-Instruct-v0.3"
MESSAGES = SEED_MESSAGES
TOOLS = SEED_TOOLS


def first_token_and_done(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[float, float]:
    """Seconds to the first content or tool-call chunk, and to the end of the stream."""
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", url, json=body) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if (
                first is None
                and line.startswith("data: {")
                and ('"content": "' in line or '"tool_calls"' in line)
            ):
                chunk = json.loads(line[6:])
                delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
                if delta.get("content") or delta.get("tool_calls"):
                    first = time.perf_counter() - t0
    return (first if first is not None else float("nan")), time.perf_counter() - t0


def whole(client: httpx.Client, url: str, body: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    resp = client.post(url, json=body)
    assert resp.status_code == 200, resp.text
    return time.perf_counter() - t0


def run(requests: int, progress: Any) -> dict[str, Any]:
    from gateway.db import open_db
    from gateway.keys import KeyStore, load_key_secret
    from gateway.settings import Settings
    from tests.servers import EmulatorProcess, GatewayProcess

    with EmulatorProcess() as emulator:
        backend = emulator.url + "/v1"
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(db=f"{tmp}/bench.db")
            _, key = KeyStore(open_db(settings.db), load_key_secret(settings)).create("bench")
            gateway = GatewayProcess(
                "--upstream", backend + "/openai", "--db", settings.db, "--log-level", "warning"
            ).start()
            try:
                gw = gateway.url + "/v1/chat/completions"
                direct = backend + "/chat/completions"
                text = {"model": MODEL, "messages": MESSAGES, "stream": True}
                tools = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS}
                samples: dict[str, list[float]] = {
                    k: []
                    for k in (
                        "text_ttft_direct",
                        "text_ttft_gateway",
                        "tool_whole_direct",
                        "tool_stream_first_gateway",
                        "tool_stream_done_gateway",
                    )
                }
                with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
                    for i in range(requests + 20):
                        warm = i < 20
                        a = first_token_and_done(client, direct, text)[0]
                        b = first_token_and_done(client, gw, text)[0]
                        c = whole(client, direct, tools)
                        d, e = first_token_and_done(client, gw, {**tools, "stream": True})
                        if not warm:
                            for name, value in zip(samples, (a, b, c, d, e), strict=True):
                                samples[name].append(value)
                        if i % 100 == 99:
                            progress(f"{i + 1 - 20} requests of each kind")
            finally:
                gateway.stop()
    med = {k: statistics.median(v) * 1000 for k, v in samples.items()}
    return {
        "requests": requests,
        "median_ms": med,
        "text_ttft_added_ms": med["text_ttft_gateway"] - med["text_ttft_direct"],
        "tool_stream_first_chunk_added_ms": med["tool_stream_first_gateway"] - med["tool_whole_direct"],
        "tool_stream_done_added_ms": med["tool_stream_done_gateway"] - med["tool_whole_direct"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    result = run(args.requests, lambda line: print(line, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "streaming.json").write_text(json.dumps(result, indent=2))
    m = result["median_ms"]
    md = [
        "# Streaming through the gateway",
        "",
        f"Sequential, interleaved requests ({args.requests} of each kind), medians in ms.",
        "",
        "| measurement | direct | gateway | added |",
        "|---|---:|---:|---:|",
        f"| text stream, time to first token | {m['text_ttft_direct']:.2f} | {m['text_ttft_gateway']:.2f} "
        f"| {result['text_ttft_added_ms']:.2f} |",
        f"| tool request: whole answer vs emulated stream's first chunk | {m['tool_whole_direct']:.2f} "
        f"| {m['tool_stream_first_gateway']:.2f} | {result['tool_stream_first_chunk_added_ms']:.2f} |",
        f"| tool request: whole answer vs emulated stream's end | {m['tool_whole_direct']:.2f} "
        f"| {m['tool_stream_done_gateway']:.2f} | {result['tool_stream_done_added_ms']:.2f} |",
    ]
    (out / "streaming.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
