"""Tool tokens billed as their own line item: measured against the backend's prompt_tokens."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import SEED_MESSAGES, SEED_TOOLS, settled_rows

V3 = "mistralai/Mistral-7B-Instruct-v0.3"  # seed request: 11 tokens without tools, 95 with


def _answer(prompt_tokens: int | None) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        body: dict[str, Any] = {
            "id": "x",
            "object": "chat.completion",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
            ],
        }
        if prompt_tokens is not None:
            body["usage"] = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": 2,
                "total_tokens": prompt_tokens + 2,
            }
        return httpx.Response(200, json=body)

    return handler


@pytest.fixture
def run(
    make_settings: Callable[..., Settings], new_key: Callable[[str], str], db_path: str
) -> Iterator[Callable[..., tuple[httpx.Response, dict[str, Any]]]]:
    key = new_key("acme")

    def go(prompt_tokens: int | None, model: str = V3, tools: Any = SEED_TOOLS, **settings: Any) -> Any:
        app = create_app(make_settings(**settings), transport=httpx.MockTransport(_answer(prompt_tokens)))
        body: dict[str, Any] = {"model": model, "messages": SEED_MESSAGES}
        if tools:
            body["tools"] = tools
        with TestClient(app) as client:
            resp = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        return resp, settled_rows(db_path)[-1]

    yield go


def test_tool_tokens_are_measured_against_the_backend(run: Any) -> None:
    resp, row = run(95)
    assert resp.json()["usage"]["prompt_tokens_details"] == {"tool_tokens": 84}
    assert resp.json()["usage"]["prompt_tokens"] == 95  # the backend's body is kept
    assert (row["prompt_tokens"], row["tool_tokens"], row["counted_prompt_tokens"], row["estimated"]) == (
        95,
        84,
        95,
        0,
    )


def test_backend_that_leaves_tools_out_gets_them_added_once(run: Any) -> None:
    resp, row = run(11, backend_counts_tools=False)
    assert resp.json()["usage"]["prompt_tokens_details"]["tool_tokens"] == 84
    assert (row["prompt_tokens"], row["tool_tokens"]) == (95, 84)


def test_a_mismatch_is_logged_and_the_backend_figure_stays_the_truth(
    run: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.proxy"):
        _, row = run(100)
    assert (row["prompt_tokens"], row["tool_tokens"], row["counted_prompt_tokens"]) == (100, 89, 95)
    assert "prompt-token mismatch" in caplog.text and "backend 100, gateway 95" in caplog.text


def test_no_tools_means_zero_tool_tokens(run: Any) -> None:
    resp, row = run(11, tools=None)
    assert resp.json()["usage"]["prompt_tokens_details"]["tool_tokens"] == 0
    assert (row["tool_tokens"], row["estimated"]) == (0, 0)


def test_unknown_model_with_tools_leaves_tool_tokens_unknown_and_estimated(run: Any) -> None:
    resp, row = run(120, model="acme/unknown")
    assert "prompt_tokens_details" not in resp.json()["usage"]
    assert (row["prompt_tokens"], row["tool_tokens"], row["estimated"]) == (120, None, 1)


def test_no_usage_from_the_backend_bills_the_gateway_count_as_an_estimate(run: Any) -> None:
    _, row = run(None)
    assert (row["prompt_tokens"], row["tool_tokens"], row["estimated"]) == (95, 84, 1)


def test_v1_counts_are_marked_estimates(run: Any) -> None:
    _, row = run(116, model="mistralai/Mistral-7B-Instruct-v0.1")
    assert (row["tool_tokens"], row["estimated"]) == (100, 1)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": V3, "messages": "hi"}, "'messages' must be a non-empty array"),
        ({"model": V3, "messages": [{"content": "x"}]}, "string 'role'"),
        ({"model": V3, "messages": SEED_MESSAGES, "tools": {"a": 1}}, "'tools' must be an array"),
        ({"model": V3, "messages": SEED_MESSAGES, "tools": [{"type": "function"}]}, "'function' object"),
        ({"model": V3, "messages": SEED_MESSAGES, "tools": [{"function": {"name": 3}}]}, "string 'name'"),
    ],
)
def test_malformed_chat_requests_are_400(
    make_settings: Callable[..., Settings], new_key: Callable[[str], str], body: Any, message: str
) -> None:
    app = create_app(make_settings(), transport=httpx.MockTransport(_answer(1)))
    with TestClient(app) as client:
        resp = client.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {new_key('a')}"}
        )
    assert resp.status_code == 400 and message in resp.json()["error"]["message"]


def test_the_difference_is_exported_per_model(
    make_settings: Callable[..., Settings], new_key: Callable[[str], str]
) -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    key = new_key("acme")
    backend = {"prompt": 95}

    def handler(request: httpx.Request) -> httpx.Response:
        return _answer(backend["prompt"])(request)

    app = create_app(make_settings(), transport=httpx.MockTransport(handler), registry=registry)
    body = {"model": V3, "messages": SEED_MESSAGES, "tools": SEED_TOOLS}
    with TestClient(app) as client:
        client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        backend["prompt"] = 97
        client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        exposition = client.get("/metrics").text
    sample = registry.get_sample_value
    assert sample("gateway_accounting_checks_total", {"model": V3, "result": "match"}) == 1
    assert sample("gateway_accounting_checks_total", {"model": V3, "result": "mismatch"}) == 1
    assert sample("gateway_accounting_difference_tokens_sum", {"model": V3}) == 2
    assert sample("gateway_tokens_total", {"model": V3, "kind": "tool"}) == 84 + 86
    assert "gateway_accounting_difference_tokens_bucket" in exposition
    assert key not in exposition
