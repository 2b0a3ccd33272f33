"""Benchmark: instructions per request on the event-loop thread, counted by valgrind.

Seconds drift by half and more between runs on a shared two-core machine; the instructions a
program executes do not (callgrind counts them, whatever else the machine is doing). This runs
the gateway (full metering: a key with every limit) and the bare floor in-process, with the
backend's answer canned (no sockets, no server: what is left is the application's own work),
under ``valgrind --tool=callgrind --separate-threads=yes``, twice per target with different
request counts, and reports the difference per request: start-up and warm-up cancel out. The
event-loop thread is the one that bounds throughput; the ledger's writer thread is not counted.
Both targets run under the garbage-collector policy ``gateway serve`` applies
(:mod:`gateway.gc_policy`), started through their lifespans as a server starts them.

    python -m bench.instructions [--requests 1280] [--target gateway|floor|both]
                                 [--request plain|seed|long]   (needs valgrind)

``--request``: ``plain`` (default) is one message without tools, with ``max_tokens``; ``seed``
the seed's request (its tools, no ``max_tokens``); ``long`` the benchmark's 20-tool, 8k-token
request. The canned answer reports the gateway's own prompt count, so nothing mismatches. One
target takes a few minutes (valgrind runs Python about fifty times slower). Writes
bench/results/instructions.json (``instructions-<request>.json`` for the others).

Instructions leave out the time the kernel spends on the thread's system calls, and what the
thread loses handing the interpreter lock to the writer thread. ``--cpu`` measures that too:
the same program without valgrind, the event-loop thread's CPU time (user and system) per
request, each target run ``--rounds`` times alternately in a fresh process, the least kept
(seconds drift here, so compare releases in one invocation or close together):

    python -m bench.instructions --cpu [--requests 6400] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.floor import floor_app, served
from bench.quota import ALL_LIMITS, BODY

WARM_UP = 320
CONCURRENCY = 32


def request_body(name: str) -> dict[str, Any]:
    """The measured request: ``plain``, ``seed`` or ``long`` (see the module's docstring)."""
    if name == "plain":
        return BODY
    from bench.overhead import big_request, seed_request

    return seed_request() if name == "seed" else big_request()


def answer_to(body: dict[str, Any]) -> bytes:
    """What the backend answers: its prompt_tokens is the gateway's own count (no mismatch)."""
    from gateway.accounting.accountant import Accountant
    from gateway.accounting.registry import Registry

    counted = Accountant(Registry.load()).count(body["model"], body["messages"], body.get("tools"))
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1795559610,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "You asked about the weather."},
                    "finish_reason": "length",
                }
            ],
            "usage": {
                "prompt_tokens": counted.prompt_tokens,
                "completion_tokens": 16,
                "total_tokens": counted.prompt_tokens + 16,
            },
        }
    ).encode()


class _Canned(httpx.AsyncBaseTransport):
    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        await asyncio.sleep(0)  # the network: one turn of the event loop
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(self.answer))]
        return httpx.Response(200, headers=headers, stream=httpx.ByteStream(self.answer))


async def _serve(target: str, requests: int, request: str = "plain") -> float:
    """The measured program: WARM_UP then ``requests`` requests, CONCURRENCY at a time.
    Returns the event-loop thread's CPU seconds for the ``requests``."""
    from gateway.app import create_app
    from gateway.db import open_db
    from gateway.keys import KeyStore, load_key_secret
    from gateway.settings import Settings

    payload = request_body(request)
    answer = answer_to(payload)
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    with tempfile.TemporaryDirectory() as tmp:
        if target == "floor":
            app = served(floor_app("http://backend.test/v1/openai", _Canned(answer)))
        else:
            settings = Settings(db=f"{tmp}/bench.db", upstream_url="http://backend.test/v1/openai")
            _, key = KeyStore(open_db(settings.db), load_key_secret(settings)).create(
                "bench", limits=ALL_LIMITS.as_dict()
            )
            headers.append((b"authorization", b"Bearer " + key.encode()))
            app = served(create_app(settings, transport=_Canned(answer)))
        # Both as served: the collector policy of `gateway serve` (the floor's server too).
        shutdown = await start_lifespan(app)
        statuses: list[int] = []

        async def one() -> None:
            sent = False

            async def receive() -> dict[str, Any]:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await asyncio.Event().wait()
                raise AssertionError("unreachable")

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            await app(chat_scope(headers), receive, send)

        async def worker(n: int) -> None:
            for _ in range(n):
                await one()

        cpu = 0.0
        for n in (WARM_UP, requests):
            cpu = time.thread_time()
            await asyncio.gather(*(worker(n // CONCURRENCY) for _ in range(CONCURRENCY)))
            cpu = time.thread_time() - cpu
        await shutdown()
    if set(statuses) != {200}:
        raise SystemExit(f"the {target} answered {sorted(set(statuses))}, not only 200")
    return cpu


def chat_scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The ASGI scope of a chat completion as a server hands it to the application."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }


async def start_lifespan(app: Any) -> Any:
    """Start ``app`` through its lifespan, as a server does; returns the coroutine function
    that shuts it down."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, outbox.put))
    started = await outbox.get()
    if started["type"] != "lifespan.startup.complete":
        raise SystemExit(f"the gateway did not start: {started}")

    async def shutdown() -> None:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task

    return shutdown


def _count(target: str, requests: int, request: str) -> int:
    """Instructions the event-loop thread executed in one run of the measured program."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--separate-threads=yes",
                f"--callgrind-out-file={out}/cg",
                sys.executable,
                "-m",
                "bench.instructions",
                "--serve",
                target,
                str(requests),
                request,
            ],
            check=True,
            capture_output=True,
        )
        # With --separate-threads, thread 1 (the main thread, which runs the loop) is "-01".
        for line in Path(f"{out}/cg-01").read_text().splitlines():
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise RuntimeError("callgrind wrote no summary")


def _cpu(target: str, requests: int, request: str) -> float:
    """Microseconds of the event-loop thread's CPU per request, in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.instructions", "--serve", target, str(requests), request],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(json.loads(out.splitlines()[-1])["cpu_us_per_request"])


def _cpu_times(args: argparse.Namespace, targets: tuple[str, ...], requests: int) -> dict[str, Any]:
    result: dict[str, Any] = {
        "python": sys.version.split()[0],
        "request": args.request,
        "requests": requests,
        "rounds": {},
    }
    for r in range(args.rounds):
        for target in targets:
            us = _cpu(target, requests, args.request)
            result["rounds"].setdefault(target, []).append(round(us, 1))
            print(f"round {r + 1}/{args.rounds}, {target}: {us:.1f} µs of CPU per request", flush=True)
    for target in targets:
        result[target] = min(result["rounds"][target])
        print(f"{target}: {result[target]:.1f} µs of event-loop CPU per request (least of the rounds)")
    if "gateway" in result and "floor" in result:
        result["gateway_minus_floor"] = round(result["gateway"] - result["floor"], 1)
        print(f"the gateway's own work: {result['gateway_minus_floor']:.1f} µs per request")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests", type=int, help="requests in the longer run (default 1280; 6400 with --cpu)"
    )
    parser.add_argument("--target", choices=("gateway", "floor", "both"), default="both")
    parser.add_argument("--cpu", action="store_true", help="CPU time per request instead (no valgrind)")
    parser.add_argument("--rounds", type=int, default=5, help="with --cpu: runs per target (default 5)")
    parser.add_argument(
        "--request",
        choices=("plain", "seed", "long"),
        default="plain",
        help="plain: one message, max_tokens (default); seed: the seed's tools; long: 20 tools, 8k tokens",
    )
    parser.add_argument("--serve", nargs=3, metavar=("TARGET", "N", "REQUEST"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.install()
        cpu = asyncio.run(_serve(args.serve[0], int(args.serve[1]), args.serve[2]))
        print(json.dumps({"cpu_us_per_request": cpu / int(args.serve[1]) * 1e6}))
        return 0
    targets = ("gateway", "floor") if args.target == "both" else (args.target,)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.request == "plain" else f"-{args.request}"
    if args.cpu:
        requests = max(CONCURRENCY, (args.requests or 6400) // CONCURRENCY * CONCURRENCY)
        times = _cpu_times(args, targets, requests)
        (out / f"cpu{suffix}.json").write_text(json.dumps(times, indent=2))
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("bench.instructions needs valgrind (Debian: apt-get install -y valgrind)")
    # Both runs pay start-up and warm-up; their difference is the requests (whole rounds).
    short, long = CONCURRENCY, max(2, (args.requests or 1280) // CONCURRENCY) * CONCURRENCY
    result: dict[str, Any] = {
        "python": sys.version.split()[0],
        "request": args.request,
        "requests": long - short,
    }
    for target in targets:
        counts = []
        for n in (short, long):
            print(f"{target}: {n} requests under callgrind ...", flush=True)
            started = time.monotonic()
            counts.append(_count(target, n, args.request))
            print(f"  {counts[-1]:,} instructions ({time.monotonic() - started:.0f} s)", flush=True)
        result[target] = round((counts[1] - counts[0]) / (long - short))
        print(f"{target}: {result[target]:,} instructions per request on the event-loop thread", flush=True)
    if "gateway" in result and "floor" in result:
        result["gateway_minus_floor"] = result["gateway"] - result["floor"]
        print(f"the gateway's own work: {result['gateway_minus_floor']:,} instructions per request")
    (out / f"instructions{suffix}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
