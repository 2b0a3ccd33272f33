"""Generated bodies never make count_tokens answer 5xx: every failure is a clear 4xx."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import Settings

MODELS = st.sampled_from(
    [
        "mistralai/Mistral-7B-Instruct-v0.1",
        "mistralai/Mistral-7B-Instruct-v0.3",
        "mistralai/Mistral-Nemo-Instruct-2407",
        "mistralai/Mistral-Large-Instruct-2411",
        "meta-llama/Meta-Llama-3.1-8B-Instruct",
        "gpt-4",
        "nobody/unknown",
    ]
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "robot"])},
    optional={
        "content": st.none() | st.text(max_size=40) | JSON,
        "tool_calls": st.lists(
            st.fixed_dictionaries(
                {
                    "id": st.text(max_size=12),
                    "function": st.fixed_dictionaries(
                        {"name": st.text(max_size=10)}, optional={"arguments": st.text(max_size=20) | JSON}
                    ),
                }
            ),
            max_size=2,
        )
        | JSON,
        "tool_call_id": st.text(max_size=12) | JSON,
    },
)
TOOL = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {"name": st.text(max_size=10)},
            optional={"description": st.text(max_size=20) | JSON, "parameters": JSON},
        ),
    }
)
# Mostly well-formed envelopes with odd insides (what reaches the formats), some pure garbage.
BODY = st.fixed_dictionaries(
    {"model": MODELS, "messages": st.lists(MESSAGE, min_size=1, max_size=4)},
    optional={"tools": st.lists(TOOL, min_size=1, max_size=3)},
) | st.fixed_dictionaries({"model": MODELS | JSON}, optional={"messages": JSON, "tools": JSON})


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, str]]:
    from gateway.db import open_db
    from gateway.keys import KeyStore, load_key_secret

    db = str(tmp_path_factory.mktemp("fuzz") / "gateway.db")
    settings = Settings(db=db, upstream_url="http://upstream.test/v1")
    key = KeyStore(open_db(db), load_key_secret(settings)).create("fuzz")[1]
    never: Callable[[httpx.Request], httpx.Response] = lambda r: httpx.Response(599)  # noqa: E731
    with TestClient(create_app(settings, transport=httpx.MockTransport(never))) as c:
        yield c, key


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, str]]:
    """The proxy in front of a backend that always answers: whatever fails is the gateway's doing."""
    from gateway.db import open_db
    from gateway.keys import KeyStore, load_key_secret

    db = str(tmp_path_factory.mktemp("fuzz") / "gateway.db")
    settings = Settings(db=db, upstream_url="http://upstream.test/v1")
    key = KeyStore(open_db(db), load_key_secret(settings)).create(
        "fuzz", limits={"tokens_per_month": 10**12, "max_concurrent": 10}
    )[1]
    answer = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
    ok: Callable[[httpx.Request], httpx.Response] = lambda r: httpx.Response(200, json=answer)  # noqa: E731
    with TestClient(create_app(settings, transport=httpx.MockTransport(ok))) as c:
        yield c, key


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODY)
def test_never_5xx(client: tuple[TestClient, str], body: dict[str, Any]) -> None:
    c, key = client
    resp = c.post("/v1/chat/completions/count_tokens", json=body, headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code in (200, 400, 404), (resp.status_code, resp.text, body)
    if resp.status_code != 200:
        assert set(resp.json()["error"]) >= {"message", "type", "code"}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODY, stream=st.booleans(), max_tokens=st.none() | st.integers(-5, 10**6) | JSON)
def test_the_proxy_never_answers_5xx_of_its_own(
    proxied: tuple[TestClient, str], body: dict[str, Any], stream: bool, max_tokens: Any
) -> None:
    c, key = proxied
    body = {**body, "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    resp = c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code in (200, 400, 429), (resp.status_code, resp.text, body)
    if resp.status_code != 200:
        assert set(resp.json()["error"]) >= {"message", "type", "code"}
