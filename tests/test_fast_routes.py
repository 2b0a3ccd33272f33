"""FastRoutes: exact (method, path) dispatch ahead of the full application."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

from gateway.fast_routes import FastRoutes


async def _fast(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-lane", b"fast")]})
    await send({"type": "http.response.body", "body": b"fast"})


async def _broken(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("boom at /secret/place")


async def _broken_midway(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"part", "more_body": True})
    raise RuntimeError("boom")


def _client() -> TestClient:
    started = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        started.append(True)
        yield

    full = Starlette(
        routes=[Route("/p", lambda r: PlainTextResponse("full"), methods=["GET", "POST"])],
        lifespan=lifespan,
    )
    app = FastRoutes(
        full,
        routes={("POST", "/p"): _fast, ("POST", "/broken"): _broken, ("POST", "/midway"): _broken_midway},
    )
    client = TestClient(app, raise_server_exceptions=False)
    client.started = started  # type: ignore[attr-defined]
    return client


def test_matching_method_and_path_take_the_fast_route_and_the_rest_the_full_app() -> None:
    with _client() as client:
        assert client.started == [True]  # type: ignore[attr-defined]  # lifespan reaches the app
        fast = client.post("/p")
        assert (fast.text, fast.headers["x-lane"]) == ("fast", "fast")
        assert client.get("/p").text == "full"  # other method
        assert client.post("/elsewhere").status_code == 404


def test_an_unexpected_error_is_a_json_500_without_details(caplog: pytest.LogCaptureFixture) -> None:
    with _client() as client, caplog.at_level(logging.ERROR, "gateway.app"):
        resp = client.post("/broken")
    assert resp.status_code == 500
    error = {"message": "The gateway hit an internal error.", "type": "api_error", "code": "internal_error"}
    assert resp.json() == {"error": error}
    assert "/secret/place" not in resp.text
    assert "boom at /secret/place" in caplog.text  # the operator's log has it


def test_an_error_after_the_answer_started_sends_nothing_more() -> None:
    with _client() as client:
        resp = client.post("/midway")
    assert resp.status_code == 200
    assert resp.content == b"part"
