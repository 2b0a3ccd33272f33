"""The one HTTP client to the backend, and what crosses between client and backend headers."""

from __future__ import annotations

import httpx

from gateway.settings import Settings

__all__ = ["build_client", "request_headers", "response_headers"]

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


def response_headers(upstream: httpx.Headers) -> list[tuple[bytes, bytes]]:
    return [(k.lower(), v) for k, v in upstream.raw if k.lower() not in _DROP_RESPONSE]
