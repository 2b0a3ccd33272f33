"""The upstream pools, under httpx's API and as the proxy sends, against raw loopback servers
that misbehave on cue."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from gateway.http1 import Http1Transport
from gateway.settings import ConfigError, Settings
from gateway.upstream import AiohttpTransport, HttpxUpstream, build_client, make_transport, upstream_for
from tests.servers import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    return head, await reader.readexactly(_content_length(head))


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


async def _with_server(handler: Handler, body: Callable[[str], Awaitable[None]]) -> None:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await body(f"http://127.0.0.1:{port}")
    finally:
        server.close()


# More than the kernel's buffers hold between two loopback sockets (4 MB for the sender's at
# most, here): a backend that stops reading leaves most of it unsent.
HUGE = b"x" * (12 << 20)


def _recording(seen: list[tuple[bytes, bytes]]) -> Handler:
    """A backend that keeps each request (head, body) and answers 201 with a repeated header."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await _read_request(reader))
        writer.write(
            b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\nx-a: 1\r\nx-a: 2\r\n"
            b'content-length: 11\r\n\r\n{"ok": true'
        )
        await writer.drain()
        writer.close()

    return handler


def _streaming(release: asyncio.Event) -> Handler:
    """A backend that sends one event, then the rest once ``release`` is set."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
        writer.write(b"transfer-encoding: chunked\r\n\r\n")
        writer.write(b"7\r\ndata: 1\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    return handler


def _hanging_up(when: str) -> Handler:
    """A backend that reads the request, then hangs up before or in the middle of its answer."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        if when == "mid_body":
            writer.write(b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"partial')
            await writer.drain()
        writer.close()

    return handler


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_request(reader)
    await asyncio.sleep(3)


_POOLS: dict[str, Callable[[], httpx.AsyncBaseTransport]] = {
    "http1": lambda: Http1Transport(max_connections=8, keepalive_expiry=4.0),
    "aiohttp": lambda: AiohttpTransport(max_connections=8, keepalive_expiry=4.0),
}


@pytest.fixture(params=list(_POOLS))
def pool(request: pytest.FixtureRequest) -> str:
    """The pools under httpx's API (httpx's own needs no test here)."""
    return str(request.param)


def _client(pool: str, **timeouts: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=_POOLS[pool](), timeout=httpx.Timeout(**{"timeout": 5.0, **timeouts}))


def test_forwards_the_request_exactly_and_keeps_every_response_header(pool: str) -> None:
    seen: list[tuple[bytes, bytes]] = []
    handler = _recording(seen)

    async def body(url: str) -> None:
        async with _client(pool) as client:
            response = await client.post(
                url + "/v1/x?q=1", content=b'{"a": "\xc3\xa9"}', headers={"authorization": "Bearer k"}
            )
            assert response.status_code == 201
            assert response.headers.get_list("x-a") == ["1", "2"]
            assert response.content == b'{"ok": true'

    asyncio.run(_with_server(handler, body))
    ((head, sent),) = seen
    assert head.startswith(b"POST /v1/x?q=1 HTTP/1.1\r\n")
    assert b"\r\nauthorization: Bearer k\r\n" in head
    assert sent == b'{"a": "\xc3\xa9"}'


def test_a_body_sent_in_pieces_is_framed_by_one_length(pool: str) -> None:
    """aiohttp's pool sends long bodies in pieces (each under the write timeout): still framed
    by one content-length, not chunked (which some backends refuse), through httpx's API too,
    where the request carries a length of its own."""
    seen: list[tuple[bytes, bytes]] = []
    payload = bytes(range(256)) * 1024

    async def body(url: str) -> None:
        async with _client(pool) as client:
            assert (await client.post(url, content=payload)).status_code == 201

    asyncio.run(_with_server(_recording(seen), body))
    ((head, sent),) = seen
    framing = [
        line for line in head.lower().split(b"\r\n") if line.startswith((b"content-length", b"transfer"))
    ]
    assert framing == [b"content-length: %d" % len(payload)] and sent == payload


def test_a_stream_arrives_as_it_is_written(pool: str) -> None:
    """The first event must reach the caller while the backend still holds the rest."""
    release = asyncio.Event()

    async def body(url: str) -> None:
        async with _client(pool) as client, client.stream("POST", url, content=b"{}") as response:
            chunks = response.aiter_bytes()
            assert await asyncio.wait_for(chunks.__anext__(), 2) == b"data: 1"
            release.set()
            assert b"".join([c async for c in chunks]) == b"data: 2"

    asyncio.run(_with_server(_streaming(release), body))


def test_refused_connection_is_a_connect_error(pool: str) -> None:
    """Only a ConnectError means nothing reached the backend (the proxy retries only that)."""

    async def run() -> None:
        async with _client(pool) as client:
            with pytest.raises(httpx.ConnectError):
                await client.post(f"http://127.0.0.1:{free_port()}/v1/x", content=b"{}")

    asyncio.run(run())


def test_silent_backend_is_a_read_timeout(pool: str) -> None:
    async def body(url: str) -> None:
        async with _client(pool, read=0.3) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(url, content=b"{}")

    asyncio.run(_with_server(_silent, body))


@pytest.mark.parametrize("when", ["before_answer", "mid_body"])
def test_a_backend_that_hangs_up_is_never_a_connect_error(pool: str, when: str) -> None:
    """The request was delivered: retrying it could serve (and bill) it twice."""

    async def body(url: str) -> None:
        async with _client(pool) as client:
            with pytest.raises(httpx.TransportError) as exc:
                await client.post(url, content=b"{}")
            assert not isinstance(exc.value, httpx.ConnectError)

    asyncio.run(_with_server(_hanging_up(when), body))


def test_the_transport_is_a_setting() -> None:
    settings = Settings(upstream_url="http://x", upstream_transport="httpx")
    assert make_transport("httpx") is None
    assert isinstance(make_transport("aiohttp"), AiohttpTransport)
    client = build_client(Settings(upstream_url="http://x"))
    assert isinstance(client._transport, Http1Transport)  # the default
    asyncio.run(client.aclose())
    asyncio.run(build_client(settings).aclose())
    with pytest.raises(ConfigError, match="upstream_transport"):
        make_transport("curl")


# The proxy's own path: Upstream.send, straight onto the gateway's client or aiohttp's pool (no
# httpx models), or through httpx's models for any other transport. All must behave alike.

_TIMEOUTS = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}


def _upstreams() -> list[tuple[str, Callable[[], Any]]]:
    return [
        ("http1", lambda: Http1Transport(max_connections=8, keepalive_expiry=4.0)),
        ("aiohttp", lambda: AiohttpTransport(max_connections=8, keepalive_expiry=4.0)),
        ("httpx", lambda: HttpxUpstream(httpx.AsyncHTTPTransport())),
    ]


@contextlib.asynccontextmanager
async def _opened(factory: Callable[[], Any]) -> AsyncIterator[Any]:
    backend = factory()
    try:
        yield backend
    finally:
        await (backend._transport if isinstance(backend, HttpxUpstream) else backend).aclose()


@pytest.fixture(params=[name for name, _ in _upstreams()])
def upstream(request: pytest.FixtureRequest) -> Callable[[], Any]:
    return dict(_upstreams())[request.param]


def test_the_proxy_sends_through_the_pools_themselves_and_wraps_any_other_transport() -> None:
    aio = AiohttpTransport(max_connections=8, keepalive_expiry=4.0)
    assert upstream_for(httpx.AsyncClient(transport=aio)) is aio
    own = Http1Transport(max_connections=8, keepalive_expiry=4.0)
    assert upstream_for(httpx.AsyncClient(transport=own)) is own
    mock = httpx.MockTransport(lambda request: httpx.Response(200))
    assert isinstance(upstream_for(httpx.AsyncClient(transport=mock)), HttpxUpstream)


def test_send_forwards_exactly_and_keeps_every_response_header(upstream: Callable[[], Any]) -> None:
    seen: list[tuple[bytes, bytes]] = []
    handler = _recording(seen)

    async def body(url: str) -> None:
        async with _opened(upstream) as backend:
            headers = [(b"authorization", b"Bearer k"), (b"content-type", b"application/json")]
            answer = await backend.send(
                "POST", backend.url(url + "/v1/x?q=1"), headers, b'{"a": "\xc3\xa9"}', _TIMEOUTS
            )
            assert (answer.status_code, answer.is_success) == (201, True)
            assert [v for k, v in answer.raw_headers if k.lower() == b"x-a"] == [b"1", b"2"]
            assert await answer.aread() == b'{"ok": true'
            await answer.aclose()

    asyncio.run(_with_server(handler, body))
    ((head, sent),) = seen
    assert head.startswith(b"POST /v1/x?q=1 HTTP/1.1\r\n")
    assert b"\r\nauthorization: Bearer k\r\n" in head
    assert sent == b'{"a": "\xc3\xa9"}'


def test_send_streams_each_chunk_as_it_arrives(upstream: Callable[[], Any]) -> None:
    release = asyncio.Event()

    async def body(url: str) -> None:
        async with _opened(upstream) as backend:
            answer = await backend.send("POST", url, [], b"{}", _TIMEOUTS)
            chunks = answer.aiter_bytes()
            assert await asyncio.wait_for(chunks.__anext__(), 2) == b"data: 1"
            release.set()
            assert b"".join([c async for c in chunks]) == b"data: 2"
            await answer.aclose()

    asyncio.run(_with_server(_streaming(release), body))


def test_send_decodes_an_answer_the_backend_compressed_anyway(upstream: Callable[[], Any]) -> None:
    """The gateway asks for identity and drops content-encoding towards the client, so an answer
    compressed regardless must reach the proxy decoded (whole or streamed)."""
    payload = b'{"usage": {"prompt_tokens": 3}}' * 20
    packed = gzip.compress(payload)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await _read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(packed), packed)
            )
            await writer.drain()

    async def body(url: str) -> None:
        async with _opened(upstream) as backend:
            answer = await backend.send("POST", url, [], b"{}", _TIMEOUTS)
            assert await answer.aread() == payload
            await answer.aclose()
            answer = await backend.send("POST", url, [], b"{}", _TIMEOUTS)
            assert b"".join([c async for c in answer.aiter_bytes()]) == payload
            await answer.aclose()

    asyncio.run(_with_server(handler, body))


def test_sent_comes_once_before_the_answer_even_for_a_refused_connection(upstream: Callable[[], Any]) -> None:
    """The proxy begins its count beside the backend from ``sent``: it must come before the
    answer (this backend answers only once it came), once per request, whether the request is
    written or waits for its connection (the count runs meanwhile), even one then refused."""
    calls: list[tuple[str, bool]] = []
    came = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.wait_for(came.wait(), 5)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    def sent(name: str, written: bool) -> None:
        calls.append((name, written))
        came.set()

    async def body(url: str) -> None:
        async with _opened(upstream) as backend:
            answer = await backend.send(
                "POST", backend.url(url + "/v1/x"), [], b"{}", _TIMEOUTS, functools.partial(sent, "served")
            )
            assert await answer.aread() == b"ok"
            await answer.aclose()
            refused = backend.url(f"http://127.0.0.1:{free_port()}/v1/x")
            with pytest.raises(httpx.ConnectError):
                await backend.send("POST", refused, [], b"{}", _TIMEOUTS, functools.partial(sent, "refused"))
        # Neither was written when said: a first request waits for its connection to be made
        # (the gateway's own client; tests/test_http1.py has one on a kept connection), and the
        # other pools say it before they take the request.
        assert calls == [("served", False), ("refused", False)]

    asyncio.run(_with_server(handler, body))


def test_send_to_a_refused_port_is_a_connect_error(upstream: Callable[[], Any]) -> None:
    async def run() -> None:
        with pytest.raises(httpx.ConnectError):
            async with _opened(upstream) as backend:
                await backend.send("POST", f"http://127.0.0.1:{free_port()}/v1/x", [], b"{}", _TIMEOUTS)

    asyncio.run(run())


def test_send_to_a_silent_backend_is_a_read_timeout(upstream: Callable[[], Any]) -> None:
    async def body(url: str) -> None:
        with pytest.raises(httpx.ReadTimeout):
            async with _opened(upstream) as backend:
                await backend.send("POST", url, [], b"{}", {**_TIMEOUTS, "read": 0.3})

    asyncio.run(_with_server(_silent, body))


@pytest.mark.parametrize("when", ["before_answer", "mid_body"])
def test_send_to_a_backend_that_hangs_up_is_never_a_connect_error(
    upstream: Callable[[], Any], when: str
) -> None:
    async def body(url: str) -> None:
        with pytest.raises(httpx.TransportError) as exc:
            async with _opened(upstream) as backend:
                answer = await backend.send("POST", url, [], b"{}", _TIMEOUTS)
                await answer.aread()
        assert not isinstance(exc.value, httpx.ConnectError)

    asyncio.run(_with_server(_hanging_up(when), body))


def test_send_to_a_backend_that_stops_taking_the_request_is_a_write_timeout(
    upstream: Callable[[], Any],
) -> None:
    """The backend takes none of a body too big for the kernel's buffers: the write timeout
    ends the wait (aiohttp has none of its own; its read timeout starts after the body)."""

    async def stalled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(30)

    async def body(url: str) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(httpx.WriteTimeout):
            async with _opened(upstream) as backend, asyncio.timeout(5):  # without one: forever
                await backend.send("POST", url, [], HUGE, {**_TIMEOUTS, "write": 0.3, "read": 10.0})
        assert loop.time() - started < 3

    asyncio.run(_with_server(stalled, body))


_STALLED_BACKEND = """
import socket, sys
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
held = []
while True:
    held.append(listener.accept()[0])  # and never read
"""


def test_a_write_timeout_leaves_no_connection_open(upstream: Callable[[], Any]) -> None:
    """Closing a connection waits to send what is unsent, for as long as the backend stalls:
    after a write timeout the connection must be gone, not left flushing. The backend runs in
    a process of its own, so that the descriptors counted are the client's."""
    backend = subprocess.Popen([sys.executable, "-c", _STALLED_BACKEND], stdout=subprocess.PIPE, text=True)
    try:
        assert backend.stdout is not None
        url = f"http://127.0.0.1:{backend.stdout.readline().strip()}/v1/x"

        async def run() -> None:
            async with _opened(upstream) as client:
                open_before = len(os.listdir("/proc/self/fd"))
                for _ in range(3):
                    with pytest.raises(httpx.WriteTimeout):
                        await client.send("POST", url, [], HUGE, {**_TIMEOUTS, "write": 0.2})
                await asyncio.sleep(0.2)
                assert len(os.listdir("/proc/self/fd")) <= open_before

        asyncio.run(run())
    finally:
        backend.kill()
        backend.wait()


def test_send_of_a_body_taken_slowly_arrives_whole_framed_by_its_length(upstream: Callable[[], Any]) -> None:
    """The write timeout bounds a stall, not the whole body (the backend takes a megabyte every
    50 ms, longer than the write timeout in all), nor the wait for the answer."""
    heads: list[bytes] = []

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head)
        left = _content_length(head)
        taken = b""
        while left:
            await asyncio.sleep(0.05)
            chunk = await reader.readexactly(min(left, 1 << 20))
            taken, left = taken + chunk, left - len(chunk)
        ok = b"ok" if taken == HUGE else b"no"
        await asyncio.sleep(0.8)  # the answer takes longer than the write timeout: not its business
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n" + ok)
        await writer.drain()

    async def body(url: str) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with _opened(upstream) as backend:
            answer = await backend.send("POST", url, [], HUGE, {**_TIMEOUTS, "write": 0.5, "read": 10.0})
            assert await answer.aread() == b"ok"
            await answer.aclose()
        assert loop.time() - started > 0.5

    asyncio.run(_with_server(slow, body))
    (head,) = heads
    assert b"transfer-encoding" not in head.lower()
