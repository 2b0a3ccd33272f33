"""The benchmark's floor: a bare pass-through served and framed as the gateway is."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import httpx
import pytest

from bench import floor


def test_the_floor_relays_the_answer_framed_by_its_length() -> None:
    answer = b'{"id": "chatcmpl-1", "usage": {"prompt_tokens": 3}}'
    seen: list[httpx.Request] = []

    def backend(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=answer, headers={"content-type": "application/json"})

    app = floor.floor_app("http://backend.test/v1/openai", httpx.MockTransport(backend))
    messages: list[dict[str, Any]] = []

    async def run() -> None:
        body = [{"type": "http.request", "body": b'{"model": "m"}', "more_body": False}]

        async def receive() -> dict[str, Any]:
            return body.pop(0)

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
        await app(scope, receive, send)

    asyncio.run(run())
    start, whole = messages
    assert dict(start["headers"])[b"content-length"] == b"%d" % len(answer)
    assert whole["body"] == answer
    assert str(seen[0].url) == "http://backend.test/v1/openai/chat/completions"


def test_the_floor_is_served_as_gateway_serve_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Server header and no forwarded-headers middleware: the gateway's own server settings."""
    options: dict[str, Any] = {}
    monkeypatch.setattr(floor.uvicorn, "run", lambda app, **kw: options.update(kw))
    monkeypatch.setattr(sys, "argv", ["floor", "--upstream", "http://127.0.0.1:9/v1/openai"])
    floor.main()
    assert options["server_header"] is False and options["proxy_headers"] is False
    assert (options["loop"], options["http"]) == ("uvloop", "httptools")
