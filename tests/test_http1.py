"""The gateway's own HTTP/1.1 client, against raw loopback servers: what the shared upstream tests
(tests/test_upstream.py, tests/test_faults.py) do not reach: connection reuse and its limits,
framing, and that an abandoned answer never reaches the next request."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httpx
import pytest
import uvloop
import yarl

from gateway.http1 import Http1Transport, _Target
from tests.test_upstream import HUGE, _read_request, _with_server

_TIMEOUTS = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}


@pytest.fixture(autouse=True, params=["uvloop", "asyncio"])
def _loop(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test on both loops: the server runs on uvloop, whose transports differ."""
    policy = asyncio.get_event_loop_policy()
    if request.param == "uvloop":
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(policy)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _serving(
    answer: Callable[[bytes, bytes], bytes],
    connections: list[int],
    before: Callable[[bytes], Awaitable[None]] | None = None,
) -> Handler:
    """A keep-alive backend: answers each request on a connection with ``answer(head, body)``,
    once ``before(body)`` is done; ``connections`` counts the connections it accepted."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        while True:
            try:
                head, body = await _read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if before is not None:
                await before(body)
            writer.write(answer(head, body))
            await writer.drain()

    return handler


def _echo(head: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


@contextlib.asynccontextmanager
async def _pool(max_connections: int = 8, keepalive_expiry: float = 4.0) -> AsyncIterator[Http1Transport]:
    client = Http1Transport(max_connections=max_connections, keepalive_expiry=keepalive_expiry)
    try:
        yield client
    finally:
        await client.aclose()


async def _send(client: Http1Transport, url: str, body: bytes, **timeouts: float) -> bytes:
    answer = await client.send("POST", url, [], body, {**_TIMEOUTS, **timeouts})
    try:
        return await answer.aread()  # type: ignore[no-any-return]
    finally:
        await answer.aclose()


def test_requests_in_turn_share_one_connection() -> None:
    connections: list[int] = []

    async def body(url: str) -> None:
        async with _pool() as client:
            for i in range(5):
                assert await _send(client, url + "/v1/x", b"%d" % i) == b"%d" % i

    asyncio.run(_with_server(_serving(_echo, connections), body))
    assert len(connections) == 1


def test_a_connection_idle_past_its_expiry_is_not_reused() -> None:
    connections: list[int] = []

    async def body(url: str) -> None:
        async with _pool(keepalive_expiry=0.05) as client:
            assert await _send(client, url, b"a") == b"a"
            await asyncio.sleep(0.1)
            assert await _send(client, url, b"b") == b"b"

    asyncio.run(_with_server(_serving(_echo, connections), body))
    assert len(connections) == 2


def test_a_connection_the_backend_closed_while_idle_is_replaced() -> None:
    """A backend that hangs up after each answer (keep-alive not refused in words)."""
    connections: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        _, body = await _read_request(reader)
        writer.write(_echo(b"", body))
        await writer.drain()
        writer.close()

    async def body(url: str) -> None:
        async with _pool() as client:
            assert await _send(client, url, b"a") == b"a"
            await asyncio.sleep(0.05)  # the hang-up arrives while the connection is idle
            assert await _send(client, url, b"b") == b"b"

    asyncio.run(_with_server(handler, body))
    assert len(connections) == 2


def test_an_abandoned_answer_never_reaches_the_next_request() -> None:
    """A request cancelled while its answer is on the way (the client went away) must not leave
    that answer on a pooled connection for the next request to read as its own."""
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                _, body = await _read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if body == b"slow":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nslo")
                await writer.drain()
                await release.wait()
                writer.write(b"w-done")
            else:
                writer.write(_echo(b"", body))
            await writer.drain()

    async def body(url: str) -> None:
        async with _pool(max_connections=1) as client:
            slow = asyncio.create_task(_send(client, url, b"slow"))
            await asyncio.sleep(0.1)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            # Its connection was closed, not left waiting for the rest: the one allowed is free.
            assert await _send(client, url, b"next", pool=1.0) == b"next"
            release.set()
            assert await _send(client, url, b"last") == b"last"

    asyncio.run(_with_server(handler, body))


def test_beyond_max_connections_a_request_waits_for_one_up_to_the_pool_timeout() -> None:
    gate = asyncio.Event()
    connections: list[int] = []

    async def held(body: bytes) -> None:
        if body == b"hold":
            await gate.wait()

    async def body(url: str) -> None:
        async with _pool(max_connections=1) as client:
            held = asyncio.create_task(_send(client, url, b"hold"))
            await asyncio.sleep(0.05)
            with pytest.raises(httpx.PoolTimeout):
                await _send(client, url, b"x", pool=0.2)
            leaving = asyncio.create_task(_send(client, url, b"gone"))
            waiting = asyncio.create_task(_send(client, url, b"after"))
            await asyncio.sleep(0.05)
            leaving.cancel()  # a request that stops waiting (its client left) strands no one
            gate.set()
            assert await held == b"hold"
            assert await waiting == b"after"  # the freed connection went to the waiting request
            assert leaving.cancelled()

    asyncio.run(_with_server(_serving(_echo, connections, held), body))
    assert len(connections) == 1


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", id="chunked"),
        pytest.param(b"connection: close\r\n\r\nabcde", id="until_close"),
        pytest.param(b"content-length: 5\r\n\r\nabcde", id="length"),
    ],
)
def test_every_framing_of_an_answer_is_read_whole(wire: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n" + wire)
        await writer.drain()
        writer.close()

    async def body(url: str) -> None:
        async with _pool() as client:
            assert await _send(client, url, b"{}") == b"abcde"

    asyncio.run(_with_server(handler, body))


def test_a_sent_callback_that_fails_after_the_write_frees_the_connection() -> None:
    """The caller's work in ``sent(True)`` runs after the write: should it raise, the error is
    the caller's, and the connection, whose answer nobody will read, is closed at once (left to
    that answer, a large one paused for its reader would hold the slot for good)."""
    connections: list[int] = []

    def fails(written: bool) -> None:
        if written:
            raise RuntimeError("the caller's side work broke")

    async def run(url: str) -> None:
        async with _pool(max_connections=1) as client:
            assert await _send(client, url, b"warm") == b"warm"  # the one connection, kept
            with pytest.raises(RuntimeError, match="side work broke"):
                await client.send("POST", url, [], b"lost", _TIMEOUTS, fails)
            # The only slot is free again, on a fresh connection.
            assert await asyncio.wait_for(_send(client, url, b"next"), 2) == b"next"

    asyncio.run(_with_server(_serving(_echo, connections), run))
    assert len(connections) == 2


def test_sent_comes_after_the_write_on_a_kept_connection_and_before_a_wait_for_one() -> None:
    """On a connection kept alive, ``sent`` comes right after the request is written. A request
    that has to wait for a connection to come free gets it before the wait, so the proxy's
    count runs meanwhile: here, before the request ahead of it is even answered."""
    release = asyncio.Event()
    order: list[str] = []

    async def before(body: bytes) -> None:
        order.append(f"backend has {body.decode()}")
        if body == b"first":
            await release.wait()

    async def run(url: str) -> None:
        async with _pool(max_connections=1) as client:
            assert await _send(client, url, b"warm") == b"warm"  # the one connection, kept
            order.clear()

            async def one(name: bytes) -> bytes:
                answer = await client.send(
                    "POST",
                    url,
                    [],
                    name,
                    _TIMEOUTS,
                    lambda written: order.append(f"sent {name.decode()}{'' if written else ', waiting'}"),
                )
                try:
                    return await answer.aread()  # type: ignore[no-any-return]
                finally:
                    await answer.aclose()

            first = asyncio.create_task(one(b"first"))
            await asyncio.sleep(0)
            assert order == ["sent first"]  # written on the kept connection, and said at once, as such
            second = asyncio.create_task(one(b"second"))
            await asyncio.sleep(0.05)
            assert "sent second, waiting" in order  # waiting for the connection the first one holds
            assert "backend has second" not in order
            release.set()
            assert await first == b"first" and await second == b"second"
        assert order.index("sent second, waiting") < order.index("backend has second")

    asyncio.run(_with_server(_serving(_echo, [], before), run))


def test_the_write_watch_ends_with_its_answer() -> None:
    """A body the backend takes after a while is watched; once the answer is in, the watch's
    timer is gone (a timer per request, living for the write timeout, would pile up)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.2)  # meanwhile the body piles up unsent
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    async def body(url: str) -> None:
        async with _pool() as client:
            answer = await client.send("POST", url, [], HUGE, {**_TIMEOUTS, "write": 60.0})
            assert await answer.aread() == b"ok"
            assert answer._write_timer is None
            await answer.aclose()

    asyncio.run(_with_server(handler, body))


def test_an_interim_answer_is_skipped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nx-a: 1\r\ncontent-length: 2\r\n\r\nok"
        )
        await writer.drain()
        writer.close()

    async def body(url: str) -> None:
        async with _pool() as client:
            answer = await client.send("POST", url, [], b"{}", _TIMEOUTS)
            assert answer.status_code == 201
            assert answer.raw_headers == [(b"x-a", b"1"), (b"content-length", b"2")]
            assert await answer.aread() == b"ok"

    asyncio.run(_with_server(handler, body))


def test_an_answer_that_is_not_http_is_a_protocol_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()

    async def body(url: str) -> None:
        async with _pool() as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await _send(client, url, b"{}")

    asyncio.run(_with_server(handler, body))


def test_a_long_stream_read_slowly_arrives_whole() -> None:
    """Past a megabyte held for a slow reader the backend is paused, then resumed: no byte lost,
    and the read timeout does not fire while the gateway is the one not reading."""
    chunk = bytes(range(256)) * 256  # 64 KiB
    count = 320  # 20 MiB: more than the kernel's socket buffers hold
    written = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (len(chunk) * count))
        for _ in range(count):
            writer.write(chunk)
            await writer.drain()
        written.set()
        writer.close()

    async def body(url: str) -> None:
        async with _pool() as client:
            answer = await client.send("POST", url, [], b"{}", {**_TIMEOUTS, "read": 0.2})
            parts = answer.aiter_bytes()
            received = await parts.__anext__()
            await asyncio.sleep(0.5)
            assert not written.is_set()  # the backend waits while a megabyte is held unread
            async for part in parts:
                received += part
                await asyncio.sleep(0.001)
            assert received == chunk * count
            await answer.aclose()

    asyncio.run(_with_server(handler, body))


def test_the_request_target_is_encoded_and_the_host_named() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await _read_request(reader)
        seen.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def body(url: str) -> None:
        async with _pool() as client:
            answer = await client.send("GET", url + "/v1/models/a b?x=1", [(b"x-k", b"v")], None, _TIMEOUTS)
            assert await answer.aread() == b""

    asyncio.run(_with_server(handler, body))
    ((head,),) = [seen]
    port = head.split(b"host: 127.0.0.1:")[1].split(b"\r\n")[0]
    assert head == (b"GET /v1/models/a%20b?x=1 HTTP/1.1\r\nhost: 127.0.0.1:" + port + b"\r\nx-k: v\r\n\r\n")


def test_tls_credentials_and_head_requests_go_to_aiohttp() -> None:
    client = Http1Transport(max_connections=8, keepalive_expiry=4.0)
    assert isinstance(client.url("http://127.0.0.1:8000/v1"), _Target)
    assert isinstance(client.url("https://api.example.com/v1"), yarl.URL)
    assert isinstance(client.url("http://user:pw@127.0.0.1:8000/v1"), yarl.URL)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await _read_request(reader)
        assert head.startswith(b"HEAD ")
        # A length but no body: a client that read a body here would wait for it.
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
        await writer.drain()

    async def body(url: str) -> None:
        try:
            answer = await client.send("HEAD", client.url(url + "/v1/models"), [], None, _TIMEOUTS)
            assert answer.status_code == 200
            assert await asyncio.wait_for(answer.aread(), 2) == b""
            await answer.aclose()
        finally:
            await client.aclose()

    asyncio.run(_with_server(handler, body))


def test_a_connection_is_only_reused_on_the_loop_that_made_it() -> None:
    """An embedding program may run the application on one event loop, then on another."""
    connections: list[int] = []
    client = Http1Transport(max_connections=1, keepalive_expiry=4.0)

    async def body(url: str) -> None:
        assert await _send(client, url, b"a") == b"a"

    server_loop = asyncio.new_event_loop()
    server = server_loop.run_until_complete(
        asyncio.start_server(_serving(_echo, connections), "127.0.0.1", 0)
    )
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    thread = threading.Thread(target=server_loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run(body(url))  # leaves an idle connection made on a loop that is now closed
        asyncio.run(body(url))  # the limit is one: that connection must be dropped, not reused
    finally:

        async def shutdown() -> None:
            server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            await asyncio.sleep(0.05)

        asyncio.run_coroutine_threadsafe(shutdown(), server_loop).result(5)
        server_loop.call_soon_threadsafe(server_loop.stop)
        thread.join(5)
        server_loop.close()
    assert len(connections) == 2
