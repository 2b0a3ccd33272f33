"""The quota store's scripts over one pipelined Redis connection (RESP2).

Every admitted request with limits runs a script on Redis before it is forwarded (reserve) and
one or two after (shrink, settle). Through redis-py's asyncio client (a pooled connection taken
and given back, each argument encoded apart, a general reply parser) a reserve and settle pair
cost the gateway 0.89 ms of CPU; here 0.37 ms, and 3.4 times the pairs per second with 64 in
flight (``python -m bench.redis_calls``). A call is one write and one future on a connection
that carries many at once, answered in order, as Redis pipelining allows.

Errors are redis-py's exception classes, so a caller handles both clients alike. A call that
has no answer within ``timeout`` fails with ``TimeoutError`` and closes the connection (its
state is unknown, as redis-py decides); the calls then in flight fail with ``ConnectionError``,
and the next call connects afresh. Whether a failed call ran is unknown to the caller either
way: the quota store's scripts are written for that (a release after a lost reserve leaves a
tombstone; settles and shrinks act on what the reservation record holds).

``rediss://`` (TLS) and other schemes are not spoken here: :func:`client_for` returns None and
the store keeps redis-py's client.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import socket
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["Pipelined", "client_for"]

Reply = Any  # str, int, None, or a list of replies


def client_for(url: str, *, timeout: float, client_name: str | None = None) -> Pipelined | None:
    """A pipelined client for ``url`` (redis:// or unix://), or None for what it does not speak."""
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "unix"):
        return None
    options = parse_url(url)  # type: ignore[no-untyped-call]
    return Pipelined(
        host=options.get("host", "localhost"),
        port=int(options.get("port", 6379)),
        path=options.get("path"),
        db=int(options.get("db", 0) or 0),
        username=unquote(options["username"]) if options.get("username") else None,
        password=unquote(options["password"]) if options.get("password") else None,
        timeout=float(options.get("socket_timeout", timeout)),
        connect_timeout=float(options.get("socket_connect_timeout", timeout)),
        client_name=client_name,
    )


class Pipelined:
    """Commands on one connection, many in flight at once; connected on first use."""

    def __init__(
        self,
        *,
        host: str = "localhost",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 0.5,
        connect_timeout: float = 0.5,
        client_name: str | None = None,
    ) -> None:
        self._address = (host, port)
        self._path = path
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        # Sent first on every new connection, its answers checked before any call's.
        self._hello: list[tuple[Any, ...]] = []
        if password is not None:
            self._hello.append(("AUTH", password) if username is None else ("AUTH", username, password))
        if db:
            self._hello.append(("SELECT", db))
        if client_name:
            self._hello.append(("CLIENT", "SETNAME", client_name))
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._shas: dict[str, str] = {}

    async def call(self, *args: Any) -> Reply:
        """One command's reply; an error reply raises ``ResponseError`` (or a subclass)."""
        conn = self._conn
        if conn is None or conn.closed or conn.loop is not asyncio.get_running_loop():
            conn = await self._connect()
        reply = await conn.call(args, self._timeout)
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def script(self, source: str, keys: list[str], args: list[Any]) -> Reply:
        """EVALSHA of ``source``; loaded first where Redis does not have it (a restart, a flush)."""
        sha = self._shas.get(source)
        if sha is None:
            sha = self._shas[source] = hashlib.sha1(source.encode()).hexdigest()
        try:
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.call("SCRIPT", "LOAD", source)
            return await self.call("EVALSHA", sha, len(keys), *keys, *args)

    async def aclose(self) -> None:
        if self._conn is not None:
            self._conn.close(RedisConnectionError("the client was closed"))
            self._conn = None

    async def _connect(self) -> _Connection:
        # Concurrent calls share one attempt; one that is over (the connection it made has
        # closed since, or it failed) is not reused. A caller cancelled meanwhile leaves the
        # attempt to the others.
        attempt = self._connecting
        if attempt is None or attempt.done():
            attempt = self._connecting = asyncio.ensure_future(self._open())
            attempt.add_done_callback(_retrieve)
        return await asyncio.shield(attempt)

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        where = self._path or f"{self._address[0]}:{self._address[1]}"
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._path is not None:
                    _, conn = await loop.create_unix_connection(lambda: _Connection(loop), self._path)
                else:
                    _, conn = await loop.create_connection(lambda: _Connection(loop), *self._address)
        except TimeoutError:  # the builtin, asyncio's
            raise RedisTimeoutError(f"Timeout connecting to Redis at {where}") from None
        except OSError as exc:
            raise RedisConnectionError(f"Error connecting to Redis at {where}: {exc}") from None
        try:
            for command in self._hello:
                reply = await conn.call(command, self._connect_timeout)
                if isinstance(reply, ResponseError):
                    raise reply
        except BaseException:
            conn.close(RedisConnectionError("the connection's set-up failed"))
            raise
        self._conn = conn
        return conn


class _Connection(asyncio.Protocol):
    """One connection: replies arrive in the order the commands were written."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiting: collections.deque[tuple[asyncio.Future[Reply], asyncio.TimerHandle]] = (
            collections.deque()
        )
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Small commands, each awaited: none may wait for the previous one's acknowledgement.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(self, args: tuple[Any, ...], timeout: float) -> asyncio.Future[Reply]:
        if self.closed or self.transport is None:
            raise RedisConnectionError("Connection closed by server.")
        future: asyncio.Future[Reply] = self.loop.create_future()
        timer = self.loop.call_later(timeout, self._expire, future)
        self._waiting.append((future, timer))
        self.transport.write(_pack(args))
        return future

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        at = 0
        while self._waiting:
            try:
                parsed = _parse(buffer, at)
            except ValueError as exc:  # not RESP: nothing after it can be trusted
                self.close(RedisConnectionError(f"Protocol error from Redis: {exc}"))
                return
            if parsed is None:
                break
            reply, at = parsed
            future, timer = self._waiting.popleft()
            timer.cancel()
            if not future.done():
                future.set_result(reply)
        self._buffer = buffer[at:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(RedisConnectionError("Connection closed by server."))

    def close(self, error: Exception) -> None:
        self.closed = True
        while self._waiting:
            future, timer = self._waiting.popleft()
            timer.cancel()
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    def _expire(self, future: asyncio.Future[Reply]) -> None:
        if not future.done():
            future.set_exception(RedisTimeoutError("Timeout reading from Redis"))
        # The replies still owed are out of step with what waits for them now: start afresh.
        self.close(RedisConnectionError("the connection was closed after a timeout"))


def _retrieve(attempt: asyncio.Future[_Connection]) -> None:
    """Its callers see a failed attempt's error; with none left, it must not be logged as lost."""
    if not attempt.cancelled():
        attempt.exception()


def _pack(args: tuple[Any, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
            data = repr(arg).encode()  # as redis-py writes numbers
        else:
            raise TypeError(f"cannot send {type(arg).__name__} to Redis")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _parse(data: bytes, at: int) -> tuple[Reply, int] | None:
    """The reply that starts at ``at`` and where the next one starts; None if incomplete."""
    end = data.find(b"\r\n", at)
    if end < 0:
        return None
    kind = data[at : at + 1]
    line = data[at + 1 : end]
    at = end + 2
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, at
        if len(data) < at + size + 2:
            return None
        return data[at : at + size].decode(), at + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, at
        items = []
        for _ in range(count):
            parsed = _parse(data, at)
            if parsed is None:
                return None
            item, at = parsed
            items.append(item)
        return items, at
    if kind == b":":
        return int(line), at
    if kind == b"+":
        return line.decode(), at
    if kind == b"-":
        message = line.decode()
        return (NoScriptError if message.startswith("NOSCRIPT") else ResponseError)(message), at
    raise ValueError(f"unexpected reply type {kind!r}")
