"""POST /v1/chat/completions/count_tokens: counts without calling the backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import SEED_MESSAGES, SEED_TOOLS


def _never(request: httpx.Request) -> httpx.Response:
    raise AssertionError("count_tokens must not call the backend")


def _post(
    settings: Settings, key: str | None, body: Any, path: str = "/v1/chat/completions/count_tokens"
) -> Any:
    app = create_app(settings, transport=httpx.MockTransport(_never))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with TestClient(app) as client:
        return client.post(path, json=body, headers=headers)


@pytest.mark.parametrize(
    ("model", "prompt", "tools", "exact"),
    [
        ("mistralai/Mistral-7B-Instruct-v0.3", 95, 84, True),
        ("mistralai/Mistral-Nemo-Instruct-2407", 92, 81, True),
        ("meta-llama/Meta-Llama-3.1-8B-Instruct", 202, 159, True),
        ("gpt-4", 68, 53, True),
        ("mistralai/Mistral-7B-Instruct-v0.1", 116, 100, False),
    ],
)
def test_counts_per_model(
    make_settings: Callable[..., Settings],
    new_key: Callable[[str], str],
    model: str,
    prompt: int,
    tools: int,
    exact: bool,
) -> None:
    body = {"model": model, "messages": SEED_MESSAGES, "tools": SEED_TOOLS}
    for path in ("/v1/chat/completions/count_tokens", "/v1/openai/chat/completions/count_tokens"):
        resp = _post(make_settings(), new_key(path.replace("/", "_").strip("_")), body, path)
        assert resp.status_code == 200, resp.text
        data = resp.json()
        assert (data["model"], data["prompt_tokens"], data["tool_tokens"], data["exact"]) == (
            model,
            prompt,
            tools,
            exact,
        )
        assert data["message_tokens"] == prompt - tools and data["tokenizer"] and data["format"]


def test_needs_a_key(make_settings: Callable[..., Settings]) -> None:
    resp = _post(make_settings(), None, {"model": "gpt-4", "messages": SEED_MESSAGES})
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"


def test_unknown_model_is_404_or_the_fallback_as_an_estimate(
    make_settings: Callable[..., Settings], new_key: Callable[[str], str]
) -> None:
    key = new_key("acme")
    body = {"model": "nobody/unknown", "messages": SEED_MESSAGES, "tools": SEED_TOOLS}
    resp = _post(make_settings(), key, body)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    resp = _post(make_settings(fallback_model="mistralai/Mistral-7B-Instruct-v0.3"), key, body)
    assert resp.status_code == 200
    assert (resp.json()["prompt_tokens"], resp.json()["exact"]) == (95, False)


@pytest.mark.parametrize(
    "body",
    [
        {"messages": SEED_MESSAGES},
        {"model": "gpt-4"},
        {"model": "gpt-4", "messages": [{"role": "user"}], "tools": "x"},
        {
            "model": "meta-llama/Meta-Llama-3.1-8B-Instruct",
            "tools": SEED_TOOLS,
            "messages": [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
                    ],
                },
            ],
        },
    ],
)
def test_bad_requests_are_400(
    make_settings: Callable[..., Settings], new_key: Callable[[str], str], body: Any
) -> None:
    resp = _post(make_settings(), new_key("acme"), body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_unknown_fallback_model_is_a_configuration_error(make_settings: Callable[..., Settings]) -> None:
    from gateway.settings import ConfigError

    with pytest.raises(ConfigError, match="fallback_model"):
        create_app(make_settings(fallback_model="nope/nope"))
