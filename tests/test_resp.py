"""The pipelined Redis client the quota store's scripts use: against a real redis-server, and a
silent server for the faults."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import pytest
import redis
import uvloop

from gateway.redis_quota import RedisQuota
from gateway.resp import Pipelined, _Connection, client_for
from tests.stores import RedisServer

T = TypeVar("T")


def _run(coro: Awaitable[T], loop: str = "asyncio") -> T:
    async def wrap() -> T:
        return await coro

    return uvloop.run(wrap()) if loop == "uvloop" else asyncio.run(wrap())


# The gateway serves on uvloop (its transports are not asyncio's classes); tests run both.
LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


def _admin(server: RedisServer, db: int = 0) -> redis.Redis:
    return redis.Redis(port=server.port, db=db, decode_responses=True)


@LOOPS
def test_many_calls_at_once_share_one_connection(redis_server: RedisServer, loop: str) -> None:
    """500 calls in flight together: each gets its own reply, in order, on one connection."""
    key, name = f"t:{uuid.uuid4().hex}", f"gateway-{uuid.uuid4().hex[:8]}"

    async def run() -> tuple[list[Any], int]:
        client = client_for(redis_server.url, timeout=5, client_name=name)
        assert client is not None
        replies = await asyncio.gather(*(client.call("INCR", key) for _ in range(500)))
        connections = sum(c["name"] == name for c in _admin(redis_server).client_list())
        await client.aclose()
        return replies, connections

    replies, connections = _run(run(), loop)
    assert replies == list(range(1, 501))  # written in order, answered in order
    assert connections == 1


def test_every_reply_type_reads_as_redis_py_reads_it(redis_server: RedisServer) -> None:
    key = f"t:{uuid.uuid4().hex}"
    script = "return {1, 'two', {3, 'four'}, redis.call('GET', KEYS[1]), ARGV[1], ARGV[2]}"

    async def run() -> list[Any]:
        client = client_for(redis_server.url, timeout=5)
        assert client is not None
        got = [
            await client.call("PING"),
            await client.call("SET", key, "é ✓"),
            await client.call("GET", key),
            await client.call("GET", key + ":missing"),
            await client.call("EXISTS", key),
            await client.script(script, [key], [1.5, 7]),
        ]
        with pytest.raises(redis.exceptions.ResponseError, match="wrong number of arguments"):
            await client.call("GET")
        got.append(await client.call("PING"))  # an error reply leaves the connection in step
        await client.aclose()
        return got

    got = _run(run())
    reference = _admin(redis_server).eval(script, 1, key, 1.5, 7)
    assert got == ["PONG", "OK", "é ✓", None, 1, reference, "PONG"]
    assert reference == [1, "two", [3, "four"], "é ✓", "1.5", "7"]


def test_a_script_redis_lost_is_loaded_again(redis_server: RedisServer) -> None:
    """A restarted or flushed Redis has no scripts: the first call after loads its own."""
    source = f"return '{uuid.uuid4().hex}'"

    async def run() -> tuple[Any, Any]:
        client = client_for(redis_server.url, timeout=5)
        assert client is not None
        first = await client.script(source, [], [])
        _admin(redis_server).script_flush()
        again = await client.script(source, [], [])
        await client.aclose()
        return first, again

    first, again = _run(run())
    assert first == again == source.split("'")[1]


def test_the_url_chooses_user_password_database_and_socket(redis_server: RedisServer) -> None:
    admin = _admin(redis_server)
    user, secret = f"u{uuid.uuid4().hex[:8]}", "s3cr@t/pw"
    admin.acl_setuser(user, enabled=True, passwords=[f"+{secret}"], keys=["*"], commands=["+@all"])
    key = f"t:{uuid.uuid4().hex}"
    quoted = secret.replace("@", "%40").replace("/", "%2F")

    async def run() -> None:
        on_db_3 = client_for(f"redis://{user}:{quoted}@127.0.0.1:{redis_server.port}/3", timeout=5)
        on_socket = client_for(f"unix://{redis_server.socket}?db=4", timeout=5)
        wrong = client_for(f"redis://{user}:nope@127.0.0.1:{redis_server.port}/0", timeout=5)
        assert on_db_3 is not None and on_socket is not None and wrong is not None
        assert await on_db_3.call("SET", key, "three") == "OK"
        assert await on_socket.call("SET", key, "four") == "OK"
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGPASS"):
            await wrong.call("PING")
        for client in (on_db_3, on_socket, wrong):
            await client.aclose()

    try:
        _run(run())
    finally:
        admin.acl_deluser(user)
    assert _admin(redis_server, 3).get(key) == "three"
    assert _admin(redis_server, 4).get(key) == "four"
    assert _admin(redis_server, 0).get(key) is None


def test_tls_urls_keep_redis_pys_client() -> None:
    assert client_for("rediss://127.0.0.1:6380/0", timeout=1) is None
    store = RedisQuota("rediss://127.0.0.1:6380/0")
    assert store._pipelined is None
    assert type(store._reserve).__name__ == "AsyncScript"  # redis-py's


@contextlib.asynccontextmanager
async def _silent_server() -> AsyncIterator[tuple[int, list[asyncio.StreamReader]]]:
    """Accepts connections and never answers; yields its port and each connection's reader."""
    readers: list[asyncio.StreamReader] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        readers.append(reader)
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the client closes
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], readers
    finally:
        server.close()


@LOOPS
def test_a_call_without_an_answer_times_out_and_the_next_connects_afresh(loop: str) -> None:
    """No answer within the timeout: TimeoutError for that call, ConnectionError for the calls
    in flight beside it (their replies would be out of step), and a new connection after."""

    async def run() -> None:
        async with _silent_server() as (port, readers):
            client = Pipelined(port=port, host="127.0.0.1", timeout=0.2)
            started = time.monotonic()
            first = asyncio.ensure_future(client.call("PING"))
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(client.call("PING"))
            results = await asyncio.gather(first, second, return_exceptions=True)
            assert 0.15 < time.monotonic() - started < 1.0
            assert isinstance(results[0], redis.exceptions.TimeoutError), results
            assert isinstance(results[1], redis.exceptions.ConnectionError), results
            assert await readers[0].read() == b""  # the client closed it
            with pytest.raises(redis.exceptions.TimeoutError):
                await client.call("PING")
            assert len(readers) == 2
            await client.aclose()

    _run(run(), loop)


def test_a_server_silent_at_set_up_is_a_timeout_not_a_hang() -> None:
    """The connection is made but the set-up (the client's name) gets no answer."""

    async def run() -> None:
        async with _silent_server() as (port, _):
            client = Pipelined(port=port, host="127.0.0.1", timeout=5, connect_timeout=0.2, client_name="g")
            started = time.monotonic()
            with pytest.raises(redis.exceptions.TimeoutError):
                await client.call("PING")
            assert time.monotonic() - started < 1.0

    _run(run())


def test_a_dead_address_is_a_connection_error() -> None:
    async def run() -> None:
        async with _silent_server() as (port, _):
            pass  # closed: nothing listens on the port now
        client = Pipelined(port=port, host="127.0.0.1", timeout=0.5)
        with pytest.raises(redis.exceptions.ConnectionError, match="Error connecting"):
            await client.call("PING")

    _run(run())


@LOOPS
def test_a_connection_redis_closes_is_replaced_on_the_next_call(redis_server: RedisServer, loop: str) -> None:
    name = f"gateway-{uuid.uuid4().hex[:8]}"

    async def run() -> list[Any]:
        client = client_for(redis_server.url, timeout=5, client_name=name)
        assert client is not None
        assert await client.call("PING") == "PONG"
        assert _admin(redis_server).client_kill_filter(_type=None, skipme=True, client_name=name) == 1
        await asyncio.sleep(0.1)  # the close reaches the client
        replies = [await client.call("PING")]
        await client.aclose()
        return replies

    assert _run(run(), loop) == ["PONG"]


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def abort(self) -> None:
        pass


def test_replies_split_anywhere_are_read_whole() -> None:
    """Replies cut at every byte boundary (as TCP may deliver them) read the same."""
    wire = b"*3\r\n$5\r\nhello\r\n*2\r\n:42\r\n$-1\r\n+OK\r\n" + b":7\r\n" + b"-ERR nope\r\n"

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for cut in range(1, len(wire)):
            conn = _Connection(loop)
            conn.connection_made(_Transport())
            futures = [conn.call(("X",), 5) for _ in range(3)]
            conn.data_received(wire[:cut])
            conn.data_received(wire[cut:])
            assert futures[0].result() == ["hello", [42, None], "OK"], cut
            assert futures[1].result() == 7
            assert isinstance(futures[2].result(), redis.exceptions.ResponseError)
            conn.close(redis.exceptions.ConnectionError("done"))

    _run(run())


def test_garbage_from_the_server_fails_the_calls_not_the_process() -> None:
    async def run() -> None:
        conn = _Connection(asyncio.get_running_loop())
        conn.connection_made(_Transport())
        future = conn.call(("PING",), 5)
        conn.data_received(b"HTTP/1.1 400 Bad Request\r\n")
        with pytest.raises(redis.exceptions.ConnectionError, match="Protocol error"):
            await future
        assert conn.closed

    _run(run())
