"""Real servers on loopback for end-to-end tests: uvicorn in a thread, or the CLI in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """An ASGI app served by a real uvicorn server on a loopback port, in a background thread."""

    def __init__(self, app: Any, **config: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.server = uvicorn.Server(
            uvicorn.Config(app, **{"log_level": "warning", "access_log": False, "loop": "asyncio", **config})
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


class _PortTaken(RuntimeError):
    """The port chosen for a server was taken before the server bound it."""


T = TypeVar("T")


def _on_a_port_of_its_own(start: Callable[[], T], repick: Callable[[], None]) -> T:
    """``start()``, again on another port (``repick()``) while the one chosen was taken: free_port()
    lets a port go before the server binds it, and any socket may be given it meanwhile (another
    process's connection, or demo mode's own emulator)."""
    for _ in range(3):
        try:
            return start()
        except _PortTaken:
            repick()
    return start()


class GatewayProcess:
    """``gateway serve`` as an operator runs it: a separate process, killable for real."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.extra = args
        self._pick_port()
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen[str] | None = None

    def output(self) -> str:
        return "".join(self.lines)

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _pick_port(self) -> None:
        self.port = free_port()
        self.args = [sys.executable, "-m", "gateway", "serve", "--port", str(self.port), *self.extra]
        self.lines: list[str] = []  # (a retry's output starts afresh)

    def start(self, timeout: float = 30) -> GatewayProcess:
        return _on_a_port_of_its_own(lambda: self._start(timeout), self._pick_port)

    def _start(self, timeout: float) -> GatewayProcess:
        self.proc = subprocess.Popen(
            self.args, env=self.env, cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.reader.join(timeout=5)
                if "address already in use" in self.output():
                    raise _PortTaken(self.output())
                raise RuntimeError(f"gateway exited early:\n{self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("gateway did not become healthy")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> str:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(timeout=5)
        return self.output()


class EmulatorProcess:
    """``gateway emulator`` in its own process, ready when the context is entered."""

    def __init__(self, *args: str, timeout: float = 60, cpus: set[int] | None = None) -> None:
        """``cpus``: the CPUs the emulator may run on (all of its threads), else any."""
        self.extra = args
        self._pick_port()
        self.timeout = timeout
        self.cpus = cpus
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _pick_port(self) -> None:
        self.port = free_port()
        self.args = [sys.executable, "-m", "gateway", "emulator", "--port", str(self.port), *self.extra]

    def __enter__(self) -> EmulatorProcess:
        return _on_a_port_of_its_own(self._start, self._pick_port)

    def _start(self) -> EmulatorProcess:
        # Its log goes to a file, not a pipe nobody reads (a full pipe would stall the emulator);
        # the process keeps writing to it after this handle is closed.
        with tempfile.TemporaryFile() as log:
            cpus = self.cpus
            # Set in the child before it starts: every thread it makes inherits the mask.
            pin = None if cpus is None else lambda: os.sched_setaffinity(0, cpus)
            self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=pin)
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    httpx.get(self.url + "/v1/models", timeout=1)
                    return self
                except httpx.HTTPError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        self.__exit__()
                        log.seek(0)
                        output = log.read().decode(errors="replace")
                        if "address already in use" in output:
                            raise _PortTaken(output) from None
                        raise RuntimeError(f"the emulator did not start:\n{output[-2000:]}") from None
                    time.sleep(0.1)

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
