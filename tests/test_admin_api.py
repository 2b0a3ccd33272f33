"""The admin API: off without a token, closed to customers, and able to run the business."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import ENGINES, SEED_MESSAGES


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return str(request.param)


ADMIN = {"Authorization": "Bearer admin-secret-token"}
V3 = "mistralai/Mistral-7B-Instruct-v0.3"


def _answer(request: httpx.Request) -> httpx.Response:
    usage = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
    return httpx.Response(200, json={"choices": [], "usage": usage})


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    app = create_app(make_settings(admin_token="admin-secret-token"), transport=httpx.MockTransport(_answer))
    with TestClient(app) as c:
        yield c


def test_off_without_a_configured_token(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings())) as c:
        resp = c.get("/admin/keys", headers=ADMIN)
    assert resp.status_code == 404 and "off" in resp.json()["error"]["message"]


def test_no_token_401_customer_key_403(client: TestClient) -> None:
    assert client.get("/admin/keys").status_code == 401
    assert client.get("/admin/keys", headers={"Authorization": "Bearer wrong"}).status_code == 401
    customer = client.post("/admin/keys", json={"name": "acme"}, headers=ADMIN).json()["key"]
    resp = client.get("/admin/keys", headers={"Authorization": f"Bearer {customer}"})
    assert resp.status_code == 403 and resp.json()["error"]["type"] == "permission_error"


def test_keys_lifecycle(client: TestClient) -> None:
    created = client.post("/admin/keys", json={"name": "acme", "limits": {"rpm": 5}}, headers=ADMIN)
    assert created.status_code == 201
    key, key_id = created.json()["key"], created.json()["id"]
    auth = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/limits", headers=auth).json()["limits"][0]["limit"] == 5
    assert [k["name"] for k in client.get("/admin/keys", headers=ADMIN).json()["data"]] == ["acme"]
    assert "key" not in client.get(f"/admin/keys/{key_id}", headers=ADMIN).json()
    updated = client.patch(f"/admin/keys/{key_id}", json={"limits": {"rpm": 50, "tpm": 1000}}, headers=ADMIN)
    assert updated.json()["limits"]["rpm"] == 50
    assert client.get("/v1/limits", headers=auth).json()["limits"][0]["limit"] == 50
    rotated = client.post("/admin/keys/acme/rotate", headers=ADMIN).json()["key"]
    assert client.get("/v1/limits", headers=auth).status_code == 401
    assert client.get("/v1/limits", headers={"Authorization": f"Bearer {rotated}"}).status_code == 200
    assert client.post(f"/admin/keys/{key_id}/revoke", headers=ADMIN).json()["active"] is False
    assert client.get("/v1/limits", headers={"Authorization": f"Bearer {rotated}"}).status_code == 401
    assert client.get("/admin/keys/999", headers=ADMIN).status_code == 404


def test_plans_and_prices(client: TestClient) -> None:
    plan = client.post("/admin/plans", json={"name": "pro", "limits": {"tokens_per_day": 100}}, headers=ADMIN)
    assert plan.status_code == 201
    key = client.post("/admin/keys", json={"name": "acme", "plan": "pro"}, headers=ADMIN).json()
    assert key["limits"]["tokens_per_day"] == 100
    assert (
        client.patch("/admin/plans/pro", json={"limits": {"tokens_per_day": 7}}, headers=ADMIN).json()[
            "tokens_per_day"
        ]
        == 7
    )
    refused = client.delete("/admin/plans/pro", headers=ADMIN)
    assert refused.status_code == 400 and "used by 1 key" in refused.json()["error"]["message"]
    client.patch("/admin/keys/acme", json={"plan": None}, headers=ADMIN)
    assert client.delete("/admin/plans/pro", headers=ADMIN).status_code == 200
    price = client.post(
        "/admin/prices",
        json={"model": "*", "input_per_million": 100_000, "output_per_million": 400_000, "effective_from": 0},
        headers=ADMIN,
    )
    assert price.status_code == 201 and price.json()["tool_per_million"] == 100_000
    assert client.get("/admin/prices", headers=ADMIN).json()["data"][0]["model"] == "*"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/admin/keys", {"name": 5}),
        ("post", "/admin/keys", {"name": "x", "limits": {"rpm": -1}}),
        ("post", "/admin/keys", {"name": "x", "limits": {"colour": 1}}),
        ("post", "/admin/keys", {"name": "x", "plan": "nope"}),
        ("post", "/admin/prices", {"model": "m", "input_per_million": 1.5, "output_per_million": 1}),
        ("post", "/admin/plans", {"limits": {}}),
    ],
)
def test_bad_admin_requests_are_4xx(client: TestClient, method: str, path: str, body: dict[str, Any]) -> None:
    resp = getattr(client, method)(path, json=body, headers=ADMIN)
    assert 400 <= resp.status_code < 500 and resp.json()["error"]["message"]


def test_usage_of_any_key_or_all_keys(client: TestClient) -> None:
    keys = {n: client.post("/admin/keys", json={"name": n}, headers=ADMIN).json()["key"] for n in ("a", "b")}
    for name, key in keys.items():
        for _ in range(2 if name == "a" else 1):
            client.post(
                "/v1/chat/completions",
                json={"model": V3, "messages": SEED_MESSAGES},
                headers={"Authorization": f"Bearer {key}"},
            )
    import time

    now = int(time.time())
    window = {"start_time": now - 3600, "end_time": now + 60, "bucket_width": "1h", "limit": 2}
    by_key: dict[str, int] = {}
    deadline = time.monotonic() + 5  # the ledger writer settles rows a moment after each answer
    while by_key != {"a": 2, "b": 1} and time.monotonic() < deadline:
        page = client.get("/admin/usage", params={**window, "group_by": "key"}, headers=ADMIN).json()
        by_key = {}
        for bucket in page["data"]:
            for r in bucket["results"]:
                by_key[r["key_name"]] = by_key.get(r["key_name"], 0) + r["num_model_requests"]
    assert by_key == {"a": 2, "b": 1}
    only_b = client.get("/admin/usage", params={**window, "key": "b"}, headers=ADMIN)
    assert sum(r["num_model_requests"] for b in only_b.json()["data"] for r in b["results"]) == 1
    lines = client.get("/admin/usage/requests", params={"key": "a"}, headers=ADMIN).json()["data"]
    assert len(lines) == 2
    # customers cannot group by key
    resp = client.get(
        "/v1/usage", params={"group_by": "key"}, headers={"Authorization": f"Bearer {keys['a']}"}
    )
    assert resp.status_code == 400
