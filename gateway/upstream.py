"""The one HTTP client to the backend, and what crosses between client and backend headers.

The client is configured through httpx's API. Under it, the transport is by default the gateway's
own HTTP/1.1 client (:mod:`gateway.http1`), which hands ``https://`` backends to aiohttp's pool.
``upstream_transport = "aiohttp"`` uses aiohttp's pool for every backend (about 1.6 times the
CPU per request under load); ``"httpx"`` uses httpx's own pool (httpcore), which costs several times more and
collapses under many concurrent requests (measured by ``bench/overhead.py``).

The proxy sends through an :class:`Upstream`: ``upstream_for(client)``. On the gateway's client
or aiohttp's pool that is the pool itself, without httpx's request and response models in between
(building, normalising and wrapping them cost a seventh of the bare pass-through's CPU per
request); any other transport (httpx's pool, a test's ``httpx.MockTransport``) is wrapped by
:class:`HttpxUpstream`. Either way failures surface as httpx's exceptions, the one vocabulary the
proxy maps to its errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, NoReturn, Protocol

import httpx

from gateway.settings import ConfigError, Settings

__all__ = [
    "AiohttpTransport",
    "BackendResponse",
    "HttpxUpstream",
    "Upstream",
    "build_client",
    "make_transport",
    "request_headers",
    "response_headers",
    "upstream_for",
]

RawHeaders = Sequence[tuple[bytes, bytes]]
# Bodies above this go to aiohttp in pieces of this size, each under the write timeout (smaller
# ones fit the kernel's buffers at once: they cannot stall before the read timeout starts).
_WATCHED_BODY = 1 << 16
_FRAMING = (b"content-length", b"transfer-encoding")
# The transports a watched request's body is written on (aiohttp writes it in a task of its own,
# which inherits this): the watch aborts them when it expires.
_WATCHED: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("watched", default=None)


class BackendResponse(Protocol):
    """The backend's answer as the proxy reads it: status, raw headers, body whole or streamed."""

    status_code: int
    raw_headers: RawHeaders

    @property
    def is_success(self) -> bool: ...

    async def aread(self) -> bytes: ...

    def aiter_bytes(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    """Sends one request to the backend. Raises httpx's exceptions: ``ConnectError`` only when
    nothing reached the backend (the one failure the proxy retries), ``TimeoutException`` for
    timeouts, another ``HTTPError`` for the rest."""

    def url(self, url: str) -> Any:
        """``url`` parsed once, for a route's requests (what :meth:`send` takes, besides str)."""
        ...

    async def send(
        self,
        method: str,
        url: Any,
        headers: RawHeaders,
        body: bytes | None,
        timeouts: dict[str, Any],
        sent: Callable[[bool], None] | None = None,
    ) -> BackendResponse:
        """``sent(written)`` is called once, when the request no longer needs the caller: right
        after it is written (``written`` True: the caller may do its side work right there), or
        before it waits for a connection to be made or to come free (the gateway's own client),
        or just before it is handed over (the other pools): then False, and the side work must
        leave the loop to the request (a task). The caller's side work (the proxy's count) runs
        while the request travels or waits."""
        ...


# Hop-by-hop headers (RFC 9110 7.6.1) plus what the gateway sets itself. Forwarding headers
# from the client are not trusted: the gateway is the client of the backend.
_DROP_REQUEST = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"authorization",
        b"accept-encoding",
        b"cookie",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-real-ip",
        b"expect",
    }
)
_DROP_RESPONSE = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"content-encoding",
        b"date",
        b"server",
        b"set-cookie",
        b"alt-svc",
    }
)


def build_client(settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """The process's shared client: keep-alive pool sized for many slow, concurrent LLM answers."""
    if transport is None:
        transport = make_transport(
            settings.upstream_transport,
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_keepalive_connections,
        )
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(
            connect=settings.connect_timeout,
            read=settings.read_timeout,
            write=settings.write_timeout,
            pool=settings.pool_timeout,
        ),
        limits=httpx.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_keepalive_connections,
            keepalive_expiry=30.0,
        ),
        follow_redirects=False,
        trust_env=False,
    )


def request_headers(
    client_headers: list[tuple[bytes, bytes]], api_key: str | None
) -> list[tuple[bytes, bytes]]:
    headers = [(k, v) for k, v in client_headers if k not in _DROP_REQUEST]
    # Identity encoding: the gateway reads usage out of every answer, and streams must not wait
    # for a compressor's buffer.
    headers.append((b"accept-encoding", b"identity"))
    if api_key:
        headers.append((b"authorization", b"Bearer " + api_key.encode()))
    return headers


def response_headers(upstream: RawHeaders) -> tuple[list[tuple[bytes, bytes]], str]:
    """The headers to pass on to the client, and the answer's content type ("" if none): one
    pass over the raw list."""
    headers = []
    content_type = b""
    for key, value in upstream:
        name = key.lower()
        if name == b"content-type" and not content_type:
            content_type = value  # the first, as httpx's joined value starts with it
        if name not in _DROP_RESPONSE:
            headers.append((name, value))
    return headers, content_type.decode("latin-1")


# Idle connections are dropped after 4 s: before uvicorn-based backends (vLLM) drop theirs at 5 s,
# so a request is never written to a connection the backend is closing.
KEEPALIVE_EXPIRY = 4.0


def make_transport(
    kind: str, *, max_connections: int = 512, max_keepalive_connections: int = 128
) -> httpx.AsyncBaseTransport | None:
    """``"http1"``: :class:`gateway.http1.Http1Transport`; ``"aiohttp"``: :class:`AiohttpTransport`;
    ``"httpx"``: None (httpx's own pool)."""
    if kind == "httpx":
        return None
    if kind == "aiohttp":
        return AiohttpTransport(max_connections=max_connections, keepalive_expiry=KEEPALIVE_EXPIRY)
    if kind == "http1":
        from gateway.http1 import Http1Transport

        return Http1Transport(max_connections=max_connections, keepalive_expiry=KEEPALIVE_EXPIRY)
    raise ConfigError(f"setting 'upstream_transport': {kind!r} is not http1, aiohttp or httpx")


def upstream_for(client: httpx.AsyncClient) -> Upstream:
    """How the proxy sends through ``client``: the aiohttp pool directly, else httpx's models."""
    from gateway.http1 import Http1Transport

    transport = client._transport
    if isinstance(transport, AiohttpTransport | Http1Transport):
        return transport
    return HttpxUpstream(transport)


class HttpxUpstream:
    """An :class:`Upstream` over any httpx transport (httpx's own pool, a test's mock)."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self._transport = transport

    def url(self, url: str) -> httpx.URL:
        return httpx.URL(url)

    async def send(
        self,
        method: str,
        url: Any,
        headers: RawHeaders,
        body: bytes | None,
        timeouts: dict[str, Any],
        sent: Callable[[bool], None] | None = None,
    ) -> BackendResponse:
        extensions = {"timeout": timeouts}
        if sent is not None:
            sent(False)
        request = httpx.Request(method, url, headers=list(headers), content=body, extensions=extensions)
        return _HttpxAnswer(await self._transport.handle_async_request(request))


class _Answer:
    __slots__ = ()
    status_code: int

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300


class _HttpxAnswer(_Answer):
    __slots__ = ("_response", "raw_headers", "status_code")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status_code = response.status_code
        self.raw_headers: RawHeaders = response.headers.raw

    async def aread(self) -> bytes:
        return await self._response.aread()

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        return self._response.aiter_bytes()

    async def aclose(self) -> None:
        await self._response.aclose()


def _raise_as_httpx(exc: Exception) -> NoReturn:
    """Raise aiohttp's error as httpx's, with the distinction the proxy relies on: only a failure
    to connect (nothing reached the backend) is a ConnectError, which the proxy may retry. Any
    other exception is raised as it is."""
    import aiohttp

    mapped: httpx.HTTPError
    if isinstance(exc, aiohttp.ClientConnectorError):  # DNS, refused, unreachable: nothing was sent
        mapped = httpx.ConnectError(str(exc) or type(exc).__name__)
    elif isinstance(exc, aiohttp.ConnectionTimeoutError):
        mapped = httpx.ConnectTimeout(str(exc) or "connect timed out")
    elif isinstance(exc, aiohttp.SocketTimeoutError | TimeoutError):
        mapped = httpx.ReadTimeout(str(exc) or "read timed out")
    elif isinstance(exc, aiohttp.ClientPayloadError):
        mapped = httpx.ReadError(str(exc) or type(exc).__name__)
    elif isinstance(exc, aiohttp.ClientError):  # disconnected, reset: the request may have been seen
        mapped = httpx.RemoteProtocolError(str(exc) or type(exc).__name__)
    else:
        raise exc
    raise mapped from exc


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        _raise_as_httpx(exc)


async def _chunks(response: Any) -> AsyncIterator[bytes]:
    with _mapped():
        # Whatever has arrived, as it arrives: streams must not wait for a buffer to fill.
        async for chunk, _ in response.content.iter_chunks():
            yield chunk


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: Any) -> None:
        self._response = response

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _chunks(self._response)

    async def aclose(self) -> None:
        self._response.release()


class _AiohttpAnswer(_Answer):
    """An aiohttp response as a :class:`BackendResponse`."""

    __slots__ = ("_decoded", "_response", "raw_headers", "status_code")

    def __init__(self, response: Any) -> None:
        self._response = response
        self.status_code: int = response.status
        self.raw_headers: RawHeaders = response.raw_headers
        # The gateway asks for identity; a backend that compresses anyway is decoded by httpx's
        # decoders (the session does not decompress), as the client is sent no content-encoding.
        encoding = response.headers.get("Content-Encoding")
        self._decoded = (
            httpx.Response(response.status, headers=response.raw_headers, stream=_Body(response))
            if encoding and encoding.strip().lower() != "identity"
            else None
        )

    async def aread(self) -> bytes:
        if self._decoded is not None:
            return await self._decoded.aread()
        try:
            return await self._response.read()  # type: ignore[no-any-return]
        except Exception as exc:
            _raise_as_httpx(exc)

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        if self._decoded is not None:
            return self._decoded.aiter_bytes()
        return _chunks(self._response)

    async def aclose(self) -> None:
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp session (its pool keeps connections alive per host): an :class:`Upstream`
    for the proxy, and an httpx transport for anything that speaks httpx's API."""

    def __init__(self, *, max_connections: int, keepalive_expiry: float) -> None:
        self._limit = max_connections
        self._keepalive = keepalive_expiry
        self._session: Any = None
        self._timeouts: dict[tuple[Any, ...], Any] = {}

    def url(self, url: str) -> Any:
        import yarl

        return yarl.URL(url)

    def _timeout(self, timeout: dict[str, Any]) -> Any:
        key = (timeout.get("pool"), timeout.get("connect"), timeout.get("read"))
        value = self._timeouts.get(key)
        if value is None:
            import aiohttp

            value = self._timeouts[key] = aiohttp.ClientTimeout(
                total=None, connect=key[0], sock_connect=key[1], sock_read=key[2]
            )
        return value

    async def send(
        self,
        method: str,
        url: Any,
        headers: RawHeaders,
        body: bytes | None,
        timeouts: dict[str, Any],
        sent: Callable[[bool], None] | None = None,
    ) -> BackendResponse:
        if sent is not None:
            sent(False)
        return _AiohttpAnswer(await self._request(method, url, headers, body, timeouts))

    async def _request(
        self, method: str, url: Any, headers: RawHeaders, body: Any, timeouts: dict[str, Any]
    ) -> Any:
        """aiohttp's response to the request (``body``: bytes, an async stream, or None)."""
        if self._session is None:
            self._session = self._open()
        write = timeouts.get("write")
        if isinstance(body, bytes) and len(body) > _WATCHED_BODY and write is not None:
            return await self._request_watched(method, url, headers, body, timeouts, write)
        try:
            return await self._session._request(
                method,
                url,
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
                data=body,
                allow_redirects=False,
                compress=False,
                timeout=self._timeout(timeouts),
            )
        except Exception as exc:
            _raise_as_httpx(exc)

    async def _request_watched(
        self, method: str, url: Any, headers: RawHeaders, body: bytes, timeouts: dict[str, Any], write: float
    ) -> Any:
        """``_request`` with httpx's write timeout, which aiohttp lacks: its read timeout starts
        once the body is written, so a backend that stops taking a body too big for the kernel's
        buffers would hold the request for good. The body goes in pieces; each must be taken
        within ``write`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = asyncio.timeout(None)

        def arm(when: float | None) -> None:
            # An answer that comes before the whole body was taken ends the watch.
            with contextlib.suppress(RuntimeError):
                deadline.reschedule(when)

        async def pieces() -> AsyncIterator[bytes]:
            for start in range(0, len(body), _WATCHED_BODY):
                arm(loop.time() + write)
                yield body[start : start + _WATCHED_BODY]
            arm(None)  # all taken: the read timeout governs the answer

        framed = [(k, v) for k, v in headers if k.lower() not in _FRAMING]
        framed.append((b"content-length", b"%d" % len(body)))  # a stream would go chunked
        written_on: list[Any] = []
        token = _WATCHED.set(written_on)
        try:
            async with deadline:
                return await self._request(method, url, framed, pieces(), timeouts)
        except (TimeoutError, httpx.HTTPError) as exc:
            if deadline.expired():
                # aiohttp closes the connection, and closing waits to send what is unsent, for
                # as long as the backend stalls: drop it.
                for transport in written_on:
                    transport.abort()
                raise httpx.WriteTimeout(f"The backend took none of the request for {write:g} s.") from exc
            raise
        finally:
            _WATCHED.reset(token)

    def _open(self) -> Any:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self._limit, keepalive_timeout=self._keepalive)

        class Request(aiohttp.ClientRequest):
            async def write_bytes(self, writer: Any, conn: Any, *args: Any, **kwargs: Any) -> None:
                watched = _WATCHED.get()
                if watched is not None and conn.transport is not None:
                    watched.append(conn.transport)
                await super().write_bytes(writer, conn, *args, **kwargs)

        # No cookies, no decompression, no redirects, no environment proxies: a transparent pipe.
        return aiohttp.ClientSession(
            connector=connector,
            request_class=Request,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body: Any = request.content if isinstance(request.stream, httpx.ByteStream) else request.stream
        timeouts = request.extensions.get("timeout", {})
        response = await self._request(
            request.method, str(request.url), request.headers.raw, body or None, timeouts
        )
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_Body(response),
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode()},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
