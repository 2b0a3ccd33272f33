"""Quotas on a real server under real concurrency: never overshot, never leaked, clearly refused."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.db import open_db
from gateway.emulator.app import create_emulator_app
from gateway.keys import KeyStore, load_key_secret
from gateway.prices import Price, PriceBook
from gateway.quota import LocalQuota
from gateway.settings import Settings
from tests.conftest import SEED_MESSAGES, settled_rows
from tests.servers import ServerThread

pytestmark = pytest.mark.e2e
V3 = "mistralai/Mistral-7B-Instruct-v0.3"  # the seed message counts 11 prompt tokens
DEMAND = 11 + 5  # prompt + max_tokens


def _store(settings: Settings) -> KeyStore:
    return KeyStore(open_db(settings.db), load_key_secret(settings))


@pytest.fixture
def slow_backend() -> Any:
    with ServerThread(create_emulator_app(latency=0.5)) as server:
        yield server


def test_sixty_simultaneous_requests_against_a_budget_that_fits_fifteen(
    make_settings: Callable[..., Settings], slow_backend: ServerThread, db_path: str
) -> None:
    settings = make_settings(upstream_url=slow_backend.url + "/v1/openai")
    _, key = _store(settings).create("acme", limits={"tokens_per_day": 15 * DEMAND})
    with ServerThread(create_app(settings)) as gateway:

        async def fire() -> list[Any]:
            client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=30)

            async def one() -> Any:
                try:
                    return await client.chat.completions.create(
                        model=V3, messages=SEED_MESSAGES, max_tokens=5
                    )
                except openai.RateLimitError as exc:
                    return exc

            return await asyncio.gather(*(one() for _ in range(60)))

        results = asyncio.run(fire())
        limits = httpx.get(gateway.url + "/v1/limits", headers={"Authorization": f"Bearer {key}"}).json()
    served = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(served) == 15 and len(refused) == 45
    error = refused[0].body
    assert error["type"] == "insufficient_quota" and error["param"] == "tokens_per_day"
    assert "tokens_per_day" in error["message"] and refused[0].response.headers["retry-after"]
    rows = settled_rows(db_path)
    assert len(rows) == 15  # refused requests never reached the backend
    used = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
    assert used <= 15 * DEMAND
    (day,) = [w for w in limits["limits"] if w["name"] == "tokens_per_day"]
    assert (day["used"], day["reserved"], day["limit"]) == (used, 0, 15 * DEMAND)


def test_rate_headers_limits_endpoint_prices_and_live_limit_changes(
    make_settings: Callable[..., Settings], emulator: ServerThread, db_path: str
) -> None:
    settings = make_settings(upstream_url=emulator.url + "/v1/openai")
    store = _store(settings)
    _, key = store.create("acme", limits={"rpm": 3, "tpm": 10_000})
    PriceBook(open_db(settings.db)).set("*", Price(200_000, 100_000, 800_000), effective_from=0)
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": V3, "messages": SEED_MESSAGES}
    with ServerThread(create_app(settings)) as gateway:
        first = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=auth)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "3"
        assert first.headers["x-ratelimit-remaining-requests"] == "2"
        assert first.headers["x-ratelimit-reset-requests"].endswith("s")
        assert first.headers["x-ratelimit-limit-tokens"] == "10000"
        assert int(first.headers["x-ratelimit-remaining-tokens"]) < 10000
        # Only this request's reservation is held: the window is whole again a minute after it
        # settles, not now.
        assert first.headers["x-ratelimit-reset-tokens"] == "1m0s"
        httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=auth)
        httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=auth)
        limited = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=auth)
        assert limited.status_code == 429
        assert limited.json()["error"]["type"] == "rate_limit_exceeded"
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert limited.headers["x-ratelimit-remaining-requests"] == "0"
        # The operator raises the limit in another process: it applies from the next request.
        store.update("acme", limits={"rpm": 100})
        assert httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=auth).status_code == 200
        limits = httpx.get(gateway.url + "/v1/openai/limits", headers=auth).json()
    by_name = {w["name"]: w for w in limits["limits"]}
    assert by_name["rpm"]["limit"] == 100 and by_name["rpm"]["used"] == 4
    assert limits["prices"]["currency"] == "USD"
    assert limits["prices"]["models"][0]["input_per_million"] == 200_000
    rows = settled_rows(db_path)
    # 11 prompt tokens at 0.20/M and the answer's tokens at 0.80/M, in micro-units, rounded.
    assert all(
        r["cost_micros"] == (11 * 200_000 + r["completion_tokens"] * 800_000 + 500_000) // 1_000_000
        for r in rows
    )


def test_missing_max_tokens_is_capped_for_budgeted_keys(
    make_settings: Callable[..., Settings], db_path: str
) -> None:
    seen: list[dict[str, Any]] = []
    raw: list[bytes] = []

    def backend(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        raw.append(request.content)
        return httpx.Response(
            200, json={"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3}}
        )

    settings = make_settings(default_max_tokens=64)
    _, key = _store(settings).create("acme", limits={"tokens_per_month": 1000})
    from starlette.testclient import TestClient

    with TestClient(create_app(settings, transport=httpx.MockTransport(backend))) as client:
        # The client's layout is kept: the cap is added without re-encoding the body.
        body = json.dumps({"model": V3, "messages": SEED_MESSAGES}, indent=1)
        resp = client.post(
            "/v1/chat/completions",
            content=body.encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        # A null cap spelt with an escape is the same member: a spliced cap would come first,
        # and the backend would read the null after it (no cap at all).
        escaped = client.post(
            "/v1/chat/completions",
            content=(body[:-1] + ', "max\\u005ftokens": null}').encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        too_big = client.post(
            "/v1/chat/completions",
            json={"model": V3, "messages": SEED_MESSAGES, "max_tokens": 5000},
            headers={"Authorization": f"Bearer {key}"},
        )
        negative = client.post(
            "/v1/chat/completions",
            json={"model": V3, "messages": SEED_MESSAGES, "max_tokens": -1},
            headers={"Authorization": f"Bearer {key}"},
        )
    assert resp.status_code == 200 and seen[0]["max_tokens"] == 64
    assert raw[0] == b'{"max_tokens":64,' + body.encode()[1:]
    assert too_big.status_code == 429 and "Request too large" in too_big.json()["error"]["message"]
    assert "retry-after" not in too_big.headers
    assert escaped.status_code == 200 and seen[1]["max_tokens"] == 64
    assert raw[1].count(b"max_tokens") == 1
    assert negative.status_code == 400 and negative.json()["error"]["param"] == "max_tokens"
    assert len(seen) == 2
    assert [r["reserved_tokens"] for r in settled_rows(db_path)] == [11 + 64, 11 + 64]


def test_backend_failure_releases_the_reservation(
    make_settings: Callable[..., Settings], emulator: ServerThread
) -> None:
    settings = make_settings(upstream_url=emulator.url + "/v1/openai")
    _, key = _store(settings).create("acme", limits={"tokens_per_day": 100, "max_concurrent": 1})
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": V3, "messages": SEED_MESSAGES, "max_tokens": 5}
    with ServerThread(create_app(settings)) as gateway:
        for _ in range(3):
            failed = httpx.post(
                gateway.url + "/v1/chat/completions", json=body, headers={**auth, "x-emulator-status": "503"}
            )
            assert failed.status_code == 503
        ok = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=auth)
        limits = httpx.get(gateway.url + "/v1/limits", headers=auth).json()
    assert ok.status_code == 200
    by_name = {w["name"]: w for w in limits["limits"]}
    assert by_name["max_concurrent"]["used"] == 0 and by_name["tokens_per_day"]["reserved"] == 0
    assert by_name["tokens_per_day"]["used"] == ok.json()["usage"]["total_tokens"]


@pytest.mark.parametrize("store", ["local", "redis"])
def test_an_admitted_request_takes_its_rate_headers_from_its_reservation(
    store: str,
    make_settings: Callable[..., Settings],
    emulator: ServerThread,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """One look at the quota store per admitted request (with Redis, one round trip): the
    headers come from the reserve; only a refusal reads the windows again, to say why."""
    looks: list[int] = []
    extra: dict[str, Any] = {}
    if store == "redis":
        from gateway.redis_quota import RedisQuota

        server = request.getfixturevalue("redis_server")
        extra = {"redis_url": server.url, "redis_prefix": f"t{uuid.uuid4().hex[:8]}:"}
        cls: Any = RedisQuota
    else:
        cls = LocalQuota
    windows = cls.windows

    async def counted(self: Any, key_id: int, limits: Any, now: float) -> Any:
        looks.append(key_id)
        return await windows(self, key_id, limits, now)

    monkeypatch.setattr(cls, "windows", counted)
    settings = make_settings(upstream_url=emulator.url + "/v1/openai", **extra)
    _, key = _store(settings).create("acme", limits={"rpm": 3, "tokens_per_day": 1_000_000})
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": V3, "messages": SEED_MESSAGES, "max_tokens": 5}
    with ServerThread(create_app(settings)) as gateway:
        url = gateway.url + "/v1/chat/completions"
        answers = [httpx.post(url, json=body, headers=auth) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0", "0"]
    # Each admitted request holds its demand (16) while it runs; the day's budget is the tokens window.
    remaining = [int(a.headers["x-ratelimit-remaining-tokens"]) for a in answers]
    assert remaining[0] == 1_000_000 - DEMAND and remaining[1] < remaining[0] and remaining[3] <= remaining[2]
    assert all(a.headers["x-ratelimit-limit-tokens"] == "1000000" for a in answers)
    assert len(looks) == 1  # the refusal's
