"""The proxy against a mock backend (httpx.MockTransport): routing, headers, errors, metering."""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.db import open_db
from gateway.journal import Journal
from gateway.keys import KeyStore, load_key_secret
from gateway.settings import Settings
from tests.conftest import SEED_MESSAGES, SEED_MODEL, SEED_TOOLS, settled_rows
from tests.stores import PostgresServer, RedisServer

Handler = Callable[[httpx.Request], httpx.Response]
USAGE = {"prompt_tokens": 116, "completion_tokens": 32, "total_tokens": 148}


def _completion(**extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": SEED_MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": USAGE,
        **extra,
    }


class Backend:
    """Records what reached the backend and answers with the current handler."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.handler: Handler = lambda r: httpx.Response(200, json=_completion())

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)


@pytest.fixture
def backend() -> Backend:
    return Backend()


@pytest.fixture
def gateway(make_settings: Callable[..., Settings], backend: Backend) -> Iterator[TestClient]:
    app = create_app(make_settings(upstream_api_key="sk-operator"), transport=httpx.MockTransport(backend))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def key(new_key: Callable[[str], str]) -> str:
    return new_key("acme")


def _chat(
    client: TestClient, key: str, path: str = "/v1/openai/chat/completions", **body: Any
) -> httpx.Response:
    payload = {"model": SEED_MODEL, "messages": SEED_MESSAGES, **body}
    return client.post(path, json=payload, headers={"Authorization": f"Bearer {key}"})


def _drain(client: TestClient) -> None:
    """End the app's lifespan: the ledger commits everything queued."""
    client.__exit__(None, None, None)


def _assert_error(resp: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["type"] == type_
    assert error["message"]
    return dict(error)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic Z3c6eA=="},
        {"Authorization": "Bearer gw-not-a-real-key"},
        {"Authorization": "Bearer gw-" + "A" * 43},
    ],
)
def test_missing_malformed_or_unknown_key_is_401_and_never_forwarded(
    gateway: TestClient, backend: Backend, headers: dict[str, str]
) -> None:
    for path in ("/v1/openai/chat/completions", "/v1/chat/completions", "/v1/models", "/v1/embeddings"):
        resp = gateway.post(path, json={"model": SEED_MODEL}, headers=headers)
        if path == "/v1/models":
            resp = gateway.get(path, headers=headers)
        _assert_error(resp, 401, "authentication_error")
        assert resp.headers["www-authenticate"].startswith("Bearer")
    assert backend.requests == []


def test_revoked_key_is_refused_from_the_next_request(
    gateway: TestClient, backend: Backend, key: str, db_path: str
) -> None:
    assert _chat(gateway, key).status_code == 200
    from gateway.db import open_db
    from gateway.keys import KeyStore

    KeyStore(open_db(db_path), b"unused").revoke("acme")
    _assert_error(_chat(gateway, key), 401, "authentication_error")
    assert len(backend.requests) == 1


def test_forwards_body_and_replaces_credentials(gateway: TestClient, backend: Backend, key: str) -> None:
    resp = gateway.post(
        "/v1/openai/chat/completions",
        json={"model": SEED_MODEL, "messages": SEED_MESSAGES, "tools": SEED_TOOLS, "tool_choice": "auto"},
        headers={
            "Authorization": f"Bearer {key}",
            "Connection": "keep-alive, x-secret",
            "X-Forwarded-For": "6.6.6.6",
            "Cookie": "session=1",
            "X-Custom": "kept",
        },
    )
    assert resp.status_code == 200
    expected = _completion()
    # The backend's body, plus the tool tokens the gateway measured (the seed model's v1 estimate).
    expected["usage"] = {**USAGE, "prompt_tokens_details": {"tool_tokens": 100}}
    assert resp.json() == expected
    (sent,) = backend.requests
    assert str(sent.url) == "http://upstream.test/v1/openai/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-operator"
    assert key not in str(sent.headers)
    assert "x-forwarded-for" not in sent.headers and "cookie" not in sent.headers
    assert sent.headers["x-custom"] == "kept"
    assert json.loads(sent.content)["tools"] == SEED_TOOLS
    assert resp.headers["x-gateway-request-id"].startswith("req_")


def test_twin_routes_map_to_the_same_upstream_paths(gateway: TestClient, backend: Backend, key: str) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    backend.handler = lambda r: httpx.Response(200, json={"object": "list", "data": []})
    for prefix in ("/v1/openai", "/v1"):
        gateway.get(prefix + "/models", headers=auth)
        gateway.get(prefix + "/models/mistralai/Mistral-7B-Instruct-v0.1", headers=auth)
        gateway.post(prefix + "/completions", json={"model": SEED_MODEL, "prompt": "x"}, headers=auth)
        gateway.post(prefix + "/embeddings", json={"model": SEED_MODEL, "input": "x"}, headers=auth)
    paths = [r.url.path for r in backend.requests]
    expected = [
        "/v1/openai/models",
        "/v1/openai/models/mistralai/Mistral-7B-Instruct-v0.1",
        "/v1/openai/completions",
        "/v1/openai/embeddings",
    ]
    assert paths == expected * 2


def test_every_forwarded_request_is_a_settled_ledger_row(
    gateway: TestClient, backend: Backend, key: str, db_path: str
) -> None:
    resp = _chat(gateway, key)
    gateway.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    _drain(gateway)
    rows = settled_rows(db_path)
    assert [r["route"] for r in rows] == ["/chat/completions", "/models"]
    chat = rows[0]
    assert chat["id"] == resp.headers["x-gateway-request-id"]
    assert (chat["state"], chat["status"], chat["model"]) == ("settled", 200, SEED_MODEL)
    assert (chat["prompt_tokens"], chat["completion_tokens"], chat["estimated"]) == (116, 32, 0)
    assert chat["duration_ms"] >= chat["upstream_ms"] > 0


def test_a_journal_the_disk_refuses_is_503_never_forwarded_and_holds_nothing(
    gateway: TestClient,
    backend: Backend,
    make_settings: Callable[..., Settings],
    db_path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pending record cannot be made durable (a full disk): the request is refused before
    it reaches the backend, and its concurrency slot is given back."""
    settings = make_settings()
    db = open_db(settings.db)
    limits = {"max_concurrent": 1, "tokens_per_day": 100_000}
    _, key = KeyStore(db, load_key_secret(settings)).create("acme", limits=limits)
    db.close()

    def full(self: Journal, entry: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(Journal, "append", full)
        error = _assert_error(_chat(gateway, key), 503, "service_unavailable")
        assert error["code"] == "ledger_unavailable" and backend.requests == []
    assert _chat(gateway, key).status_code == 200  # the slot was released
    _drain(gateway)
    assert [r["status"] for r in settled_rows(db_path)] == [200]


def test_backend_errors_pass_through_and_are_recorded(
    gateway: TestClient, backend: Backend, key: str, db_path: str
) -> None:
    body = {"error": {"message": "model overloaded", "type": "server_error", "code": 503}}
    backend.handler = lambda r: httpx.Response(503, json=body, headers={"retry-after": "3"})
    resp = _chat(gateway, key)
    assert resp.status_code == 503 and resp.json() == body
    assert resp.headers["retry-after"] == "3"
    _drain(gateway)
    (row,) = settled_rows(db_path)
    assert (row["status"], row["error"]) == (503, "backend status 503")


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        (httpx.ConnectError("refused"), 502, "upstream_unreachable"),
        (httpx.ReadTimeout("slow"), 504, "upstream_timeout"),
        (httpx.RemoteProtocolError("garbage"), 502, "upstream_error"),
    ],
)
def test_backend_faults_are_openai_shaped_and_recorded(
    gateway: TestClient, backend: Backend, key: str, db_path: str, failure: Exception, status: int, code: str
) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise failure

    backend.handler = fail
    error = _assert_error(_chat(gateway, key), status, "upstream_error")
    assert error["code"] == code
    assert "upstream.test" not in error["message"] and "sk-operator" not in error["message"]
    _drain(gateway)
    rows = settled_rows(db_path)
    assert [r["status"] for r in rows] == [status]
    # Connect failures are retried once (the backend cannot have served them); nothing else is.
    assert len(backend.requests) == (2 if status == 502 and code == "upstream_unreachable" else 1)


@pytest.mark.parametrize("content", [b'{"choices": [', b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}"])
def test_malformed_backend_answer_is_502(
    gateway: TestClient, backend: Backend, key: str, content: bytes
) -> None:
    backend.handler = lambda r: httpx.Response(
        200, content=content, headers={"content-type": "application/json"}
    )
    assert _assert_error(_chat(gateway, key), 502, "upstream_error")["code"] == "upstream_malformed"


def test_answer_numbers_survive_the_tool_tokens_rewrite(
    gateway: TestClient, backend: Backend, key: str
) -> None:
    """The answer is re-encoded to add tool_tokens: a huge integer or a NaN in it stays as it was."""
    raw = json.dumps(_completion(system_fingerprint=2**70, score=float("nan"))).encode()
    backend.handler = lambda r: httpx.Response(200, content=raw, headers={"content-type": "application/json"})
    body = json.loads(_chat(gateway, key, tools=SEED_TOOLS).content)
    assert body["system_fingerprint"] == 2**70 and body["score"] != body["score"]
    assert "tool_tokens" in body["usage"]["prompt_tokens_details"]


def test_re_encoded_request_keeps_a_lone_surrogate(gateway: TestClient, backend: Backend, key: str) -> None:
    """A stream is re-encoded (to ask for usage); JSON that json reads must be written back, not crash."""
    backend.handler = lambda r: httpx.Response(
        200, content=b"data: [DONE]\n\n", headers={"content-type": "text/event-stream"}
    )
    content = b'{"model": "%s", "stream": true, "messages": [{"role": "user", "content": "a\\ud800b"}]}' % (
        SEED_MODEL.encode()
    )
    resp = gateway.post(
        "/v1/chat/completions",
        content=content,
        headers={"Authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    assert resp.status_code == 200, resp.text
    sent = json.loads(backend.requests[0].content)
    assert sent["messages"][0]["content"] == "a\ud800b" and sent["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        ('{"model": "caf\u00e9"}'.encode("latin-1"), "UTF-8"),
        (b'{"messages": []}', "'model' is required"),
        (b'{"model": 5}', "'model' is required"),
        (b'{"model": "m\\ud800", "messages": []}', "'model' must be valid Unicode"),
        (b'{"model": "m", "stream": "yes"}', "'stream' must be a boolean"),
        (b'{"model": "m", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nests too deeply"),
        (
            b'{"model": "m", "messages": [{"role": "user"}], "stream": true, "stream_options": 3}',
            "'stream_options' must be an object",
        ),
    ],
)
def test_bad_bodies_get_400_before_the_backend(
    gateway: TestClient, backend: Backend, key: str, content: bytes, message: str
) -> None:
    resp = gateway.post(
        "/v1/chat/completions",
        content=content,
        headers={"Authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    assert message in _assert_error(resp, 400, "invalid_request_error")["message"]
    assert backend.requests == []


def test_body_over_the_limit_is_413(
    make_settings: Callable[..., Settings], backend: Backend, key: str
) -> None:
    app = create_app(make_settings(max_body_bytes=1000), transport=httpx.MockTransport(backend))
    with TestClient(app) as client:
        resp = _chat(client, key, messages=[{"role": "user", "content": "x" * 2000}])
    _assert_error(resp, 413, "invalid_request_error")
    assert backend.requests == []


def test_unknown_route_and_method_are_json(gateway: TestClient, key: str) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    assert _assert_error(gateway.get("/nope"), 404, "invalid_request_error")["code"] == "not_found"
    assert _assert_error(gateway.get("/v1/chat/completions", headers=auth), 405, "invalid_request_error")


def test_text_stream_is_relayed_event_by_event_with_usage_requested(
    gateway: TestClient, backend: Backend, key: str, db_path: str
) -> None:
    events = [
        b'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}\n\n',
        b'data: {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}\n\n',
        b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}\n\n',
        b"data: [DONE]\n\n",
    ]

    async def chunks() -> AsyncIterator[bytes]:
        for event in events:
            yield event

    def stream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=chunks())

    backend.handler = stream
    with gateway.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": SEED_MODEL, "messages": SEED_MESSAGES, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    ) as resp:
        received = b"".join(resp.iter_raw())
    # The gateway asked for usage; the client did not, so the usage chunk is not shown to it.
    assert json.loads(backend.requests[0].content)["stream_options"] == {"include_usage": True}
    assert received == events[0] + events[1] + events[3]
    _drain(gateway)
    (row,) = settled_rows(db_path)
    assert (row["stream"], row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (1, 9, 2, 0)


def test_client_that_asked_for_usage_gets_it(gateway: TestClient, backend: Backend, key: str) -> None:
    usage_event = b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}\n\n'
    backend.handler = lambda r: httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=usage_event + b"data: [DONE]\n\n"
    )
    resp = _chat(gateway, key, stream=True, stream_options={"include_usage": True})
    assert usage_event in resp.content
    assert json.loads(backend.requests[0].content)["stream_options"] == {"include_usage": True}


def test_stream_without_usage_is_marked_estimated(
    gateway: TestClient, backend: Backend, key: str, db_path: str
) -> None:
    backend.handler = lambda r: httpx.Response(
        200,
        headers={"content-type": "text/event-stream"},
        content=b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\n\ndata: [DONE]\n\n',
    )
    _chat(gateway, key, stream=True)
    _drain(gateway)
    (row,) = settled_rows(db_path)
    assert row["estimated"] == 1 and row["completion_tokens"] is not None


def test_health_needs_no_key(gateway: TestClient) -> None:
    assert gateway.get("/healthz").json() == {"status": "ok"}


def test_a_head_request_gets_the_backends_head(gateway: TestClient, backend: Backend, key: str) -> None:
    """HEAD on a proxied GET route: no body to read usage from, so not a malformed answer."""
    backend.handler = lambda r: httpx.Response(
        200, headers={"content-type": "application/json", "content-length": "42"}
    )
    response = gateway.head("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    assert response.headers["content-length"] == "42"
    assert [r.method for r in backend.requests] == ["HEAD"]


def _budget_key(settings: Settings, name: str = "budgeted", **limits: int) -> str:
    db = open_db(settings.db)
    try:
        return KeyStore(db, load_key_secret(settings)).create(name, limits=limits)[1]
    finally:
        db.close()


@pytest.fixture(params=["in-process", "redis"])
def store(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The quota store's settings: this process's counters, or a real Redis (fresh prefix)."""
    if request.param == "in-process":
        return {}
    server: RedisServer = request.getfixturevalue("redis_server")
    return {"redis_url": server.url, "redis_prefix": f"t{uuid.uuid4().hex[:8]}:"}


def _nothing_held(store: dict[str, Any]) -> None:
    """On Redis: no reservation, and no bound among them, is left on any key."""
    if not store:
        return
    client = redis.Redis.from_url(store["redis_url"], decode_responses=True)
    for name in client.scan_iter(match=store["redis_prefix"] + "*:live"):
        held = {k: v for k, v in client.hgetall(name).items() if v != "0"}
        assert not held, (name, held)


def _load_tokenizer(client: TestClient, settings: Settings) -> None:
    """A first request for a model loads its tokenizer (off the loop) and is counted first: a
    bound needs the model's profile built."""
    assert _chat(client, _budget_key(settings, "warm-up"), tools=SEED_TOOLS).status_code == 200


def _seed_demand(max_tokens: int) -> tuple[int, int]:
    """(the seed request's demand once counted, the bound its format gives) with this cap."""
    from gateway.accounting.accountant import Accountant
    from gateway.accounting.registry import Registry

    accountant = Accountant(Registry.load())
    counted = accountant.count(SEED_MODEL, SEED_MESSAGES, SEED_TOOLS).prompt_tokens
    bound = accountant.bound(SEED_MODEL, SEED_MESSAGES, SEED_TOOLS)
    assert bound is not None and bound > counted
    return counted + max_tokens, bound + max_tokens


def _when_counted(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[int]]:
    """Record, for each count, whether the backend had the request by then: (the records, and
    a cell to set to the number of requests the backend had before the one to watch)."""
    from gateway.proxy import Proxy

    events: list[str] = []
    count = Proxy._count
    sent = [0]

    async def recorded(self: Proxy, *args: Any, **kwargs: Any) -> Any:
        for _ in range(100):  # counted first, the request cannot reach the backend meanwhile
            if len(backend.requests) > sent[0]:
                break
            await asyncio.sleep(0.01)
        events.append(
            "counted after the backend had it" if len(backend.requests) > sent[0] else "counted first"
        )
        return await count(self, *args, **kwargs)

    monkeypatch.setattr(Proxy, "_count", recorded)
    return events, sent


def test_a_budgeted_request_is_counted_beside_the_backend_and_holds_its_count(
    make_settings: Callable[..., Settings],
    backend: Backend,
    db_path: str,
    monkeypatch: pytest.MonkeyPatch,
    store: dict[str, Any],
) -> None:
    """With a budget, the request goes out holding a bound; the count runs while the backend
    works, and replaces the bound before the answer: the rate headers and the ledger's hold
    are the count's, as if it had been counted first. On either quota store."""
    events, sent = _when_counted(backend, monkeypatch)
    settings = make_settings(**store)
    key = _budget_key(settings, tokens_per_day=100_000)
    exact, _ = _seed_demand(40)
    app = create_app(settings, transport=httpx.MockTransport(backend))
    with TestClient(app) as client:
        _load_tokenizer(client, settings)
        events.clear()
        sent[0] = len(backend.requests)
        resp = _chat(client, key, tools=SEED_TOOLS, max_tokens=40)
        assert resp.status_code == 200, resp.text
        assert events == ["counted after the backend had it"]
        assert resp.headers["x-ratelimit-remaining-tokens"] == str(100_000 - exact)
    rows = [r for r in settled_rows(db_path) if r["reserved_tokens"] is not None]
    assert [r["reserved_tokens"] for r in rows] == [exact]
    _nothing_held(store)


@pytest.mark.parametrize(
    ("preload", "first"),
    [
        ("", "counted first"),
        (SEED_MODEL, "counted after the backend had it"),
        ("*", "counted after the backend had it"),
    ],
)
def test_a_preloaded_model_is_forwarded_on_a_bound_from_its_first_request(
    make_settings: Callable[..., Settings],
    backend: Backend,
    monkeypatch: pytest.MonkeyPatch,
    preload: str,
    first: str,
) -> None:
    """Tokenizers load on a model's first request unless ``preload_models`` names the model:
    then that request needs no load, and goes out on its bound like every later one."""
    events, sent = _when_counted(backend, monkeypatch)
    settings = make_settings(preload_models=preload)
    key = _budget_key(settings, tokens_per_day=100_000)
    with TestClient(create_app(settings, transport=httpx.MockTransport(backend))) as client:
        for _ in range(2):
            sent[0] = len(backend.requests)
            assert _chat(client, key, tools=SEED_TOOLS, max_tokens=40).status_code == 200
    assert events == [first, "counted after the backend had it"]


def test_a_key_too_near_its_budget_for_the_bound_is_decided_on_the_count(
    make_settings: Callable[..., Settings], backend: Backend, store: dict[str, Any]
) -> None:
    """The bound does not fit what is left, the count does: the request is admitted, counted
    first, exactly as without bounds; the next one, which the count does not fit, is refused."""
    exact, bound = _seed_demand(40)
    settings = make_settings(**store)
    key = _budget_key(settings, tokens_per_day=exact)
    assert bound > exact
    with TestClient(create_app(settings, transport=httpx.MockTransport(backend))) as client:
        _load_tokenizer(client, settings)
        assert _chat(client, key, tools=SEED_TOOLS, max_tokens=40).status_code == 200
        _assert_error(_chat(client, key, tools=SEED_TOOLS, max_tokens=40), 429, "insufficient_quota")
    assert len(backend.requests) == 2
    _nothing_held(store)


def _both_admitted(first: TestClient, second: TestClient, key: str, first_sent: threading.Event) -> None:
    """A request through ``first``; once the backend has it (holding its bound while its count
    is slow), another through ``second``, refused beside that bound: both are served."""
    first_sent.clear()
    results: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: results.append(_chat(first, key, tools=SEED_TOOLS, max_tokens=40))
    )
    thread.start()
    assert first_sent.wait(10)
    later = _chat(second, key, tools=SEED_TOOLS, max_tokens=40)
    thread.join(10)
    assert later.status_code == 200, later.text
    assert [r.status_code for r in results] == [200]


def test_a_request_refused_beside_a_held_bound_is_decided_again_once_it_is_a_count(
    make_settings: Callable[..., Settings],
    backend: Backend,
    monkeypatch: pytest.MonkeyPatch,
    store: dict[str, Any],
) -> None:
    """Two requests whose counts fit the budget together. The first holds its bound while its
    count is slow; the second, refused beside that bound, waits for the count and is admitted:
    a bound never refuses what counting first would have admitted."""
    from gateway.proxy import Proxy

    exact, bound = _seed_demand(40)
    settings = make_settings(**store)
    limit = bound + 10  # the first one's bound fits; beside it, not even the second's count
    key = _budget_key(settings, tokens_per_day=limit)
    assert bound + exact > limit >= 2 * exact
    count = Proxy._count
    calls: list[int] = []

    async def first_is_slow(self: Proxy, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            await asyncio.sleep(0.5)
        return await count(self, *args, **kwargs)

    monkeypatch.setattr(Proxy, "_count", first_is_slow)
    first_sent = threading.Event()
    usage = {"prompt_tokens": 116, "completion_tokens": 1, "total_tokens": 117}

    def answer(request: httpx.Request) -> httpx.Response:
        first_sent.set()
        return httpx.Response(200, json=_completion(usage=usage))

    backend.handler = answer
    with TestClient(create_app(settings, transport=httpx.MockTransport(backend))) as client:
        _load_tokenizer(client, settings)
        calls.clear()
        _both_admitted(client, client, key, first_sent)
    assert len(backend.requests) == 3
    _nothing_held(store)


def test_a_refusal_beside_another_replicas_bound_waits_for_its_count(
    backend: Backend,
    monkeypatch: pytest.MonkeyPatch,
    postgres_server: PostgresServer,
    redis_server: RedisServer,
) -> None:
    """Two replicas (one PostgreSQL ledger, one Redis). Replica A forwards a request on its
    bound and counts slowly; replica B, refused beside that bound (which its process does not
    hold, so cannot await), asks again until A's count replaces it, and is admitted: across
    replicas too, a bound never refuses what counting first would have admitted."""
    from gateway.proxy import Proxy

    exact, bound = _seed_demand(40)
    limit = bound + 10
    assert bound + exact > limit >= 2 * exact
    db = postgres_server.create_database()
    shared = {"db": db, "redis_url": redis_server.url, "redis_prefix": f"t{uuid.uuid4().hex[:8]}:"}
    settings = Settings(upstream_url="http://upstream.test/v1/openai", **shared)
    key = _budget_key(settings, tokens_per_day=limit)
    count = Proxy._count
    slow: list[int] = []

    async def first_is_slow(self: Proxy, *args: Any, **kwargs: Any) -> Any:
        if slow and slow.pop():
            await asyncio.sleep(0.5)
        return await count(self, *args, **kwargs)

    monkeypatch.setattr(Proxy, "_count", first_is_slow)
    first_sent = threading.Event()

    def answer(request: httpx.Request) -> httpx.Response:
        first_sent.set()
        return httpx.Response(200, json=_completion())

    backend.handler = answer
    replica = functools.partial(create_app, settings, transport=httpx.MockTransport(backend))
    with TestClient(replica()) as a, TestClient(replica()) as b:
        for i, client in enumerate((a, b)):  # each replica loads its tokenizer: bounds from then on
            assert _chat(client, _budget_key(settings, f"warm-up-{i}"), tools=SEED_TOOLS).status_code == 200
        slow.append(1)
        _both_admitted(a, b, key, first_sent)
        assert not slow  # the slow count was the first request's
    assert len(backend.requests) == 4
    _nothing_held(shared)


class _Unreachable:
    """An Upstream that says when the request no longer needs the proxy (``sent``), after a
    while, and whose connection is then refused: what the proxy had counted by each moment."""

    def __init__(self, counted: list[str]) -> None:
        self.counted = counted
        self.seen: list[list[str]] = []

    def url(self, url: str) -> str:
        return url

    async def send(self, method: str, url: str, headers: Any, body: Any, timeouts: Any, sent: Any) -> Any:
        await asyncio.sleep(0.01)  # preparing (a count begun already would run meanwhile)
        self.seen.append(list(self.counted))
        sent(False)  # waiting for its connection
        await asyncio.sleep(0.01)  # connecting: the count runs meanwhile
        self.seen.append(list(self.counted))
        raise httpx.ConnectError("connection refused")


@pytest.mark.parametrize("limits", [{}, {"tokens_per_day": 100_000}], ids=["count", "bound"])
def test_the_count_beside_the_backend_begins_when_the_request_no_longer_needs_the_proxy(
    make_settings: Callable[..., Settings],
    backend: Backend,
    monkeypatch: pytest.MonkeyPatch,
    limits: dict[str, int],
) -> None:
    """The count runs beside the backend's work: it begins once the upstream says the request
    is written or waiting for its connection (``sent``), not before, so that making it never
    delays the request. With a budget too, where the request goes out on a bound held until
    its count; the refused connection is the proxy's 502, and nothing is left held."""
    from gateway import proxy

    counted: list[str] = []

    async def count(self: proxy.Proxy, model: str, *args: Any, **kwargs: Any) -> Any:
        counted.append(model)
        return None

    unreachable = _Unreachable(counted)
    monkeypatch.setattr(proxy.Proxy, "_count", count)
    monkeypatch.setattr(proxy, "upstream_for", lambda client: unreachable)
    settings = make_settings(preload_models=SEED_MODEL)  # a bound from the first request
    key = _budget_key(settings, **limits)
    with TestClient(create_app(settings, transport=httpx.MockTransport(backend))) as client:
        error = _assert_error(_chat(client, key, tools=SEED_TOOLS, max_tokens=40), 502, "upstream_error")
        assert error["code"] == "upstream_unreachable"
        limits_now = client.get("/v1/limits", headers={"Authorization": f"Bearer {key}"}).json()
    # Two attempts (a refused connection is tried twice), one count, begun at the first "sent".
    assert unreachable.seen == [[], [SEED_MODEL], [SEED_MODEL], [SEED_MODEL]]
    assert all(w["reserved"] == 0 for w in limits_now["limits"])


class _WrittenThenReset:
    """An Upstream that says ``sent(written)`` and then loses the connection: what the proxy had
    counted and released by the moment ``sent`` returned."""

    def __init__(self, written: bool, counted: list[str], released: list[int]) -> None:
        self.written = written
        self.counted = counted
        self.released = released
        self.seen: list[tuple[list[str], list[int]]] = []

    def url(self, url: str) -> str:
        return url

    async def send(self, method: str, url: str, headers: Any, body: Any, timeouts: Any, sent: Any) -> Any:
        sent(self.written)
        self.seen.append((list(self.counted), list(self.released)))
        await asyncio.sleep(0.01)
        raise httpx.ReadError("connection reset")


@pytest.mark.parametrize("written", [True, False], ids=["written", "handed-over"])
@pytest.mark.parametrize("limits", [{}, {"tokens_per_day": 100_000}], ids=["count", "bound"])
def test_a_request_just_written_is_counted_and_its_bound_traded_before_sent_returns(
    make_settings: Callable[..., Settings],
    backend: Backend,
    monkeypatch: pytest.MonkeyPatch,
    limits: dict[str, int],
    written: bool,
) -> None:
    """Right after the write the request needs nothing of the loop until its answer: the count
    (and with a budget, the trade of the bound for it) is done there and then, with no task.
    Before a hand-over (another pool) it leaves the loop to the request: a task, after ``sent``
    returns. Either way the lost connection is a 502 and nothing stays held."""
    from gateway import proxy
    from gateway.accounting.accountant import Accountant

    counted: list[str] = []
    released: list[int] = []
    real_count, real_release = Accountant.count, proxy.Proxy._release

    def count(self: Accountant, model: str, *args: Any) -> Any:
        counted.append(model)
        return real_count(self, model, *args)

    def release(self: proxy.Proxy, key_id: int, hold: Any) -> None:
        released.append(key_id)
        real_release(self, key_id, hold)

    upstream = _WrittenThenReset(written, counted, released)
    monkeypatch.setattr(Accountant, "count", count)
    monkeypatch.setattr(proxy.Proxy, "_release", release)
    monkeypatch.setattr(proxy, "upstream_for", lambda client: upstream)
    settings = make_settings(preload_models=SEED_MODEL)  # counted on the loop from the first request
    key = _budget_key(settings, **limits)
    with TestClient(create_app(settings, transport=httpx.MockTransport(backend))) as client:
        error = _assert_error(_chat(client, key, tools=SEED_TOOLS, max_tokens=40), 502, "upstream_error")
        assert error["code"] == "upstream_error"
        limits_now = client.get("/v1/limits", headers={"Authorization": f"Bearer {key}"}).json()
    ((counted_then, released_then),) = upstream.seen
    assert counted_then == ([SEED_MODEL] if written else [])
    assert len(released_then) == (1 if written and limits else 0)
    assert counted == [SEED_MODEL]  # counted once, either way
    assert all(w["reserved"] == 0 for w in limits_now["limits"])


@pytest.mark.parametrize("limits", [{}, {"tokens_per_day": 10_000_000}], ids=["count", "bound"])
def test_a_long_request_the_loop_cannot_count_goes_to_a_thread_without_a_second_try(
    make_settings: Callable[..., Settings],
    backend: Backend,
    monkeypatch: pytest.MonkeyPatch,
    limits: dict[str, int],
) -> None:
    """A long history never seen before, just written: the count on the spot runs out of its
    budget, and the task hands the count to a thread at once (the budget is not spent twice)."""
    import random

    from gateway import proxy
    from gateway.accounting import accountant as accountant_module
    from gateway.accounting.accountant import OFFLOAD_BYTES, Accountant

    tries: list[str] = []
    threads: list[str] = []
    real_inline, real_to_thread = Accountant.count_inline, asyncio.to_thread

    def count_inline(self: Accountant, model: str, *args: Any) -> Any:
        tries.append(model)
        return real_inline(self, model, *args)

    async def to_thread(fn: Any, /, *args: Any) -> Any:
        if getattr(fn, "__func__", None) is Accountant.count:  # (asyncio's, for every caller)
            threads.append(args[0])
        return await real_to_thread(fn, *args)

    upstream = _WrittenThenReset(True, [], [])
    monkeypatch.setattr(Accountant, "count_inline", count_inline)
    monkeypatch.setattr(accountant_module.asyncio, "to_thread", to_thread)
    monkeypatch.setattr(proxy, "upstream_for", lambda client: upstream)
    rng = random.Random(11)
    words = [f"w{rng.randrange(10**6)}" for _ in range(2000)]
    history = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": " ".join(rng.choices(words, k=150))}
        for i in range(45)
    ]
    assert len(json.dumps(history)) > OFFLOAD_BYTES
    settings = make_settings(preload_models=SEED_MODEL)
    key = _budget_key(settings, **limits)
    with TestClient(create_app(settings, transport=httpx.MockTransport(backend))) as client:
        payload = {"model": SEED_MODEL, "messages": history, "max_tokens": 40}
        response = client.post(
            "/v1/chat/completions", json=payload, headers={"Authorization": f"Bearer {key}"}
        )
        _assert_error(response, 502, "upstream_error")
        limits_now = client.get("/v1/limits", headers={"Authorization": f"Bearer {key}"}).json()
    assert tries == [SEED_MODEL] and threads == [SEED_MODEL]
    assert all(w["reserved"] == 0 for w in limits_now["limits"])


def test_a_dead_backend_releases_a_held_bound(
    make_settings: Callable[..., Settings], backend: Backend, store: dict[str, Any]
) -> None:
    """The backend fails while the request holds its bound (its count not in yet): the error
    is OpenAI-shaped, the row settled, and the whole bound is free again."""
    exact, bound = _seed_demand(40)
    settings = make_settings(**store)
    key = _budget_key(settings, tokens_per_day=bound)
    with TestClient(create_app(settings, transport=httpx.MockTransport(backend))) as client:
        _load_tokenizer(client, settings)

        def dead(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("connection refused", request=request)

        backend.handler = dead
        error = _assert_error(_chat(client, key, tools=SEED_TOOLS, max_tokens=40), 502, "upstream_error")
        assert error["code"] == "upstream_unreachable"
        backend.handler = lambda r: httpx.Response(200, json=_completion())
        resp = _chat(client, key, tools=SEED_TOOLS, max_tokens=40)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-ratelimit-remaining-tokens"] == str(bound - exact)
