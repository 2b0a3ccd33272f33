"""Benchmark: where a request's time goes, cold, in one process (the gateway against the floor).

``bench.overhead`` measures end to end, and its figures drift with the machine's speed. This
runs the floor (``bench.floor`` on the gateway's own HTTP/1.1 client) and the gateway (full
metering: a key with every limit) as ASGI applications in one process on uvloop, against the
emulator in its own process, alternately, each request after ``--idle`` seconds with nothing to
do. The benchmark's sequential rotation leaves a target's requests 30 to 45 ms apart, and on
this machine every stage runs several times slower after such a pause than in a warm loop, so
the default idle time is 30 ms.

Each request is timed from the application's call to its last ``send``, and split where the
application hands the request to the backend client (its ``send``, timed on the client
instance each application was given): the work before the write; the backend (the write, the
backend's work, the answer's head); the work after (the answer's body and the relay). Medians of
``--requests``. ``--ops`` also counts the Python operations (opcodes, with ``sys.settrace``) of
one warm request per target, before the write and up to the last ``send``, and names the
functions that ran the most of them: on a cold machine, the code a request meets for the first
time costs more than the work it repeats.

    python -m bench.stages [--requests 200] [--idle 0.03] [--request seed|long|plain] [--ops]
                           [--backend-cpu N]

``--backend-cpu N``: the emulator on CPU N alone, this process on the others (as in
``bench.overhead``). Without it, where the kernel runs the backend, woken by an application's
write, depends on what that application does next: on this two-core machine the backend began on
the gateway's 20-tool, 8k-token request 0.10 to 0.17 ms later than on the floor's (which does
nothing after its write), and not with the backend on a CPU of its own.

Writes ``bench/results/stages-<request>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from bench.floor import floor_app, served
from bench.instructions import chat_scope, request_body, start_lifespan
from bench.overhead import split_cpus
from bench.quota import ALL_LIMITS

TARGETS = ("floor", "gateway")
PHASES = ("before", "backend", "after")
WARM_UP = 20
ROOT = str(Path(__file__).resolve().parent.parent) + "/"
TOP_FUNCTIONS = 25


class _Timed:
    """Times one backend client's ``send``, set on the instance: the floor's closure and the
    gateway's proxy both look the method up on the instance at each call."""

    def __init__(self, transport: Any) -> None:
        self.entered = self.returned = 0.0
        self.on_enter: Callable[[], None] = lambda: None
        self._send = transport.send
        transport.send = self.send

    async def send(self, *args: Any, **kwargs: Any) -> Any:
        self.on_enter()
        self.entered = time.perf_counter()
        try:
            return await self._send(*args, **kwargs)
        finally:
            self.returned = time.perf_counter()


class _Ops:
    """Opcodes executed on this thread while on, by function (``sys.settrace``)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.on = False

    def __enter__(self) -> _Ops:
        self.on = True
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)
        self.on = False

    def _call(self, frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return self._op

    def _op(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode" and self.on:
            code = frame.f_code
            where = code.co_filename.split("site-packages/")[-1].removeprefix(ROOT)
            self.counts[f"{where}:{code.co_name}"] += 1
        return self._op


async def _one(
    app: Any, body: bytes, headers: list[tuple[bytes, bytes]], on_send: Callable[[], None] = lambda: None
) -> float:
    """One request through ``app``; the perf_counter of its last ``send`` (``on_send``: called at
    each)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    last = 0.0

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await asyncio.Event().wait()  # (never: a whole answer is not watched for disconnects)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        nonlocal last
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise SystemExit(f"the request was answered {message['status']}, not 200")
        last = time.perf_counter()
        on_send()

    await app(chat_scope(headers), receive, send)
    return last


async def measure(emulator_url: str, requests: int, idle: float, request: str, ops: bool) -> dict[str, Any]:
    from gateway.app import create_app
    from gateway.db import open_db
    from gateway.keys import KeyStore, load_key_secret
    from gateway.settings import Settings
    from gateway.upstream import make_transport

    payload = request_body(request)
    body = json.dumps(payload).encode()
    base = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(db=f"{tmp}/stages.db", upstream_url=emulator_url + "/v1/openai")
        _, key = KeyStore(open_db(settings.db), load_key_secret(settings)).create(
            "bench", limits=ALL_LIMITS.as_dict()
        )
        clients = {name: make_transport("http1", max_connections=512) for name in TARGETS}
        assert clients["floor"] is not None and clients["gateway"] is not None
        timers = {name: _Timed(client) for name, client in clients.items()}
        apps = {
            "floor": served(floor_app(emulator_url + "/v1/openai", clients["floor"])),
            "gateway": served(create_app(settings, transport=clients["gateway"])),
        }
        headers = {"floor": base, "gateway": [*base, (b"authorization", b"Bearer " + key.encode())]}
        stops = [await start_lifespan(app) for app in apps.values()]
        try:
            phases: dict[str, dict[str, list[float]]] = {
                t: {p: [] for p in ("whole", *PHASES)} for t in TARGETS
            }
            for i in range(WARM_UP + requests):
                if i % 50 == 0:
                    print(f"{request}: request {i} of {WARM_UP + requests} per target ...", flush=True)
                for name in TARGETS:
                    await asyncio.sleep(idle)
                    started = time.perf_counter()
                    ended = await _one(apps[name], body, headers[name])
                    if i >= WARM_UP:
                        timer = timers[name]
                        figures = phases[name]
                        figures["whole"].append(ended - started)
                        figures["before"].append(timer.entered - started)
                        figures["backend"].append(timer.returned - timer.entered)
                        figures["after"].append(ended - timer.returned)
            result: dict[str, Any] = {
                name: {phase: round(statistics.median(values) * 1e6, 1) for phase, values in figures.items()}
                for name, figures in phases.items()
            }
            result["gateway_minus_floor"] = {
                phase: round(result["gateway"][phase] - result["floor"][phase], 1)
                for phase in ("whole", *PHASES)
            }
            if ops:
                result["ops"] = {
                    name: await _count_ops(apps[name], timers[name], body, headers[name]) for name in TARGETS
                }
        finally:
            for stop in reversed(stops):
                await stop()
    return result


async def _count_ops(
    app: Any, timer: _Timed, body: bytes, headers: list[tuple[bytes, bytes]]
) -> dict[str, Any]:
    """Opcodes of one warm request, by function: before the backend client's ``send``, and up to
    the answer's last ``send`` (what follows, the settlement and the metrics, keeps no one
    waiting)."""
    await _one(app, body, headers)
    before: dict[str, int] = {}
    to_last: dict[str, int] = {}
    with _Ops() as counter:
        # dict() copies in C: no traced frame changes the counts while they are copied.
        timer.on_enter = lambda: before.update(dict(counter.counts))
        try:
            await _one(app, body, headers, on_send=lambda: to_last.update(dict(counter.counts)))
        finally:
            timer.on_enter = lambda: None
    top = collections.Counter(to_last).most_common(TOP_FUNCTIONS)
    return {"before_write": sum(before.values()), "to_last_send": sum(to_last.values()), "top": dict(top)}


def report(result: dict[str, Any]) -> str:
    lines = [
        f"{result['request']} request, {result['requests']} per target, "
        f"{result['idle_ms']:g} ms idle before each (medians, µs)"
        + ("" if result.get("backend_cpu") is None else f", the backend on CPU {result['backend_cpu']} alone")
        + ":",
        f"  {'':>18} {'whole':>8} {'before':>8} {'backend':>8} {'after':>8}",
    ]
    for name in (*TARGETS, "gateway_minus_floor"):
        row = result[name]
        label = "gateway - floor" if name == "gateway_minus_floor" else name
        lines.append(f"  {label:>18} " + " ".join(f"{row[p]:8.1f}" for p in ("whole", *PHASES)))
    for name, counted in result.get("ops", {}).items():
        lines.append(
            f"{name}: {counted['to_last_send']:,} Python operations to the last send, "
            f"{counted['before_write']:,} before the write; the most:"
        )
        lines += [f"  {n:7,} {where}" for where, n in list(counted["top"].items())[:10]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests", type=int, default=200, help="measured requests per target (default 200)"
    )
    parser.add_argument("--idle", type=float, default=0.03, help="seconds of idle time before each request")
    parser.add_argument("--request", choices=("plain", "seed", "long"), default="seed")
    parser.add_argument("--ops", action="store_true", help="also count Python operations per request")
    parser.add_argument(
        "--backend-cpu", type=int, metavar="N", help="run the backend on CPU N alone, this process elsewhere"
    )
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    if args.requests < 1 or args.idle < 0:
        raise SystemExit("--requests must be at least 1 and --idle not negative")
    backend_cpus = None
    if args.backend_cpu is not None:
        backend_cpus, others = split_cpus(args.backend_cpu, os.sched_getaffinity(0))
        os.sched_setaffinity(0, others)

    import uvloop

    from tests.servers import EmulatorProcess

    with EmulatorProcess(cpus=backend_cpus) as emulator:
        measured = uvloop.run(measure(emulator.url, args.requests, args.idle, args.request, args.ops))
    result = {
        "python": sys.version.split()[0],
        "request": args.request,
        "requests": args.requests,
        "idle_ms": args.idle * 1000,
        "backend_cpu": args.backend_cpu,
        **measured,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"stages-{args.request}.json").write_text(json.dumps(result, indent=2))
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
