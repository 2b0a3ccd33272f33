"""The one HTTP client to the backend, and what crosses between client and backend headers.

The proxy speaks httpx's API. Under it, the transport is aiohttp's connection pool by default:
httpx's own pool (httpcore) costs several times more CPU per request and collapses under many
concurrent requests (measured by ``bench/overhead.py``); ``upstream_transport = "httpx"`` keeps it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from gateway.settings import ConfigError, Settings

__all__ = ["AiohttpTransport", "build_client", "make_transport", "request_headers", "response_headers"]

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


def response_headers(upstream: httpx.Headers) -> tuple[list[tuple[bytes, bytes]], str]:
    """The headers to pass on to the client, and the answer's content type ("" if none): one
    pass over the raw list (httpx's ``Headers.get`` scans and decodes all of them per call)."""
    headers = []
    content_type = b""
    for key, value in upstream.raw:
        name = key.lower()
        if name == b"content-type" and not content_type:
            content_type = value  # the first, as httpx's joined value starts with it
        if name not in _DROP_RESPONSE:
            headers.append((name, value))
    return headers, content_type.decode("latin-1")


def make_transport(
    kind: str, *, max_connections: int = 512, max_keepalive_connections: int = 128
) -> httpx.AsyncBaseTransport | None:
    """``"aiohttp"``: :class:`AiohttpTransport`; ``"httpx"``: None (httpx's own pool)."""
    if kind == "httpx":
        return None
    if kind == "aiohttp":
        # Idle connections are dropped after 4 s: before uvicorn-based backends (vLLM) drop theirs
        # at 5 s, so a request is never written to a connection the backend is closing.
        return AiohttpTransport(max_connections=max_connections, keepalive_expiry=4.0)
    raise ConfigError(f"setting 'upstream_transport': {kind!r} is not aiohttp or httpx")


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    """aiohttp's errors as httpx's, with the distinction the proxy relies on: only a failure to
    connect (nothing reached the backend) is a ConnectError, which the proxy may retry."""
    import aiohttp

    try:
        yield
    except aiohttp.ClientConnectorError as exc:  # DNS, refused, unreachable: nothing was sent
        raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "connect timed out") from exc
    except (aiohttp.SocketTimeoutError, TimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or "read timed out") from exc
    except aiohttp.ClientPayloadError as exc:
        raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
    except aiohttp.ClientError as exc:  # disconnected, reset: the request may have been seen
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__) from exc


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: Any) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped():
            # Whatever has arrived, as it arrives: streams must not wait for a buffer to fill.
            async for chunk, _ in self._response.content.iter_chunks():
                yield chunk

    async def aclose(self) -> None:
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx requests over one aiohttp session (its pool keeps connections alive per host)."""

    def __init__(self, *, max_connections: int, keepalive_expiry: float) -> None:
        self._limit = max_connections
        self._keepalive = keepalive_expiry
        self._session: Any = None

    def _open(self) -> Any:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self._limit, keepalive_timeout=self._keepalive)
        # No cookies, no decompression, no redirects, no environment proxies: a transparent pipe.
        return aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        import aiohttp

        if self._session is None:
            self._session = self._open()
        timeout = request.extensions.get("timeout", {})
        body: Any = request.content if isinstance(request.stream, httpx.ByteStream) else request.stream
        with _mapped():
            response = await self._session._request(
                request.method,
                str(request.url),
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
                data=body or None,
                allow_redirects=False,
                compress=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=timeout.get("pool"),
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
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
