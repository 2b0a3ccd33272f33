"""The authentication middleware on its own: memory first, the store when memory has nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.auth import PRINCIPAL, AuthMiddleware
from gateway.keys import Principal

ACME = Principal(1, "acme")


def _call(middleware: AuthMiddleware, key: str) -> tuple[list[Any], list[dict[str, Any]]]:
    """(what reached the app, what was sent) for one request with ``key``."""
    reached: list[Any] = []
    sent: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        reached.append(scope[PRINCIPAL])

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    middleware.app = app
    scope = {
        "type": "http",
        "path": "/v1/chat/completions",
        "headers": [(b"authorization", f"Bearer {key}".encode())],
    }
    asyncio.run(middleware(scope, receive, send))
    return reached, sent


@pytest.mark.parametrize(
    ("remembered", "stored", "reaches", "asks_the_store"),
    [
        (ACME, None, ACME, False),  # memory answers: the store is not asked (no coroutine)
        (None, ACME, ACME, True),  # memory has nothing: the store decides, ...
        (None, None, None, True),  # ... refusals included
    ],
)
def test_memory_answers_first_and_the_store_only_when_it_has_nothing(
    remembered: Principal | None, stored: Principal | None, reaches: Principal | None, asks_the_store: bool
) -> None:
    asked: list[str] = []

    async def authenticate(key: str) -> Principal | None:
        asked.append(key)
        return stored

    middleware = AuthMiddleware(lambda *a: None, authenticate=authenticate, cached=lambda key: remembered)
    reached, sent = _call(middleware, "gw-key")
    assert asked == (["gw-key"] if asks_the_store else [])
    assert reached == ([reaches] if reaches else [])
    assert (sent[0]["status"] == 401) if reaches is None else sent == []
