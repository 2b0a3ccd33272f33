"""The floor for any Python gateway: a bare pass-through proxy on the same server and HTTP client.

Pure ASGI on uvicorn (uvloop, httptools; no Server header and no forwarded-headers middleware,
as ``gateway serve`` runs it) with one shared httpx.AsyncClient whose pool gets each request
directly, as the gateway's proxy hands it (``gateway.upstream.upstream_for``: the gateway's own
HTTP/1.1 client or aiohttp's pool without httpx's models, or httpx's own pool): it reads the
body, forwards it, and returns the answer framed by its length, as the gateway does. No auth,
no metering, no ledger. The process runs under the garbage-collector policy ``gateway serve``
applies (:mod:`gateway.gc_policy`).

    python -m bench.floor --port 8090 --upstream http://127.0.0.1:9000/v1/openai
"""

from __future__ import annotations

import argparse
from typing import Any

import httpx
import uvicorn


def floor_app(upstream: str, transport: str | httpx.AsyncBaseTransport = "httpx") -> Any:
    """``transport``: a pool's name (``gateway.upstream.make_transport``), or a transport."""
    from gateway.upstream import make_transport, upstream_for

    client = httpx.AsyncClient(
        timeout=httpx.Timeout(600, connect=5),
        limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
        transport=make_transport(transport, max_connections=512) if isinstance(transport, str) else transport,
    )
    base = upstream.rstrip("/")
    # The gateway's own path to the backend (see Proxy._send): the client's pool directly, as
    # an Upstream, with the client's timeouts, so the floor is no slower.
    backend = upstream_for(client)
    timeout = client.timeout.as_dict()
    urls: dict[str, Any] = {}
    headers_out = [(b"content-type", b"application/json")]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        path = scope["path"]
        url = urls.get(path)
        if url is None:  # parsed once per path, as the gateway parses once per route
            url = urls[path] = backend.url(base + path.removeprefix("/v1/openai").removeprefix("/v1"))
        response = await backend.send(scope["method"], url, headers_out, b"".join(chunks) or None, timeout)
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        # Framed by its length, as the gateway frames its answers (uvicorn would chunk it).
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(content))]
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    return app


def served(app: Any) -> Any:
    """The app under the collector policy ``gateway serve`` applies (its default settings):
    a process setting, so the floor runs with it too and the comparison stays like for like."""
    from gateway.gc_policy import GcPolicy
    from gateway.settings import Settings

    defaults = Settings()
    return GcPolicy(app, threshold=defaults.gc_threshold, freeze=defaults.gc_freeze)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--transport", default="httpx", choices=("httpx", "aiohttp", "http1"))
    args = parser.parse_args()
    uvicorn.run(
        served(floor_app(args.upstream, args.transport)),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        # The server as `gateway serve` runs it without trusted proxies: no Server header, no
        # forwarded-headers middleware around the app.
        access_log=False,
        server_header=False,
        proxy_headers=False,
        loop="uvloop",
        http="httptools",
    )


if __name__ == "__main__":
    main()
