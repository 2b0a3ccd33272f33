"""The gateway's own endpoints, fuzzed from their OpenAPI document: 4xx with a message, never 5xx."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from gateway.app import create_app
from gateway.db import open_db
from gateway.keys import KeyStore, load_key_secret
from gateway.ledger import Ledger
from gateway.settings import Settings
from tests.servers import ServerThread

ADMIN_TOKEN = "admin-fuzz-token"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, str]]:
    db = str(tmp_path_factory.mktemp("openapi") / "gateway.db")
    settings = Settings(db=db, upstream_url="http://127.0.0.1:9/v1", admin_token=ADMIN_TOKEN)
    key = KeyStore(open_db(db), load_key_secret(settings)).create("fuzz")[1]
    Ledger(db).recover()
    with ServerThread(create_app(settings)) as server:
        yield server, key


def test_the_document_is_served_and_valid(live: tuple[ServerThread, str]) -> None:
    server, _ = live
    doc = httpx.get(server.url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.") and "/v1/usage" in doc["paths"] and "/admin/keys" in doc["paths"]
    schema = schemathesis.openapi.from_dict(doc)
    assert len(list(schema.get_all_operations())) >= 17


@pytest.mark.e2e
def test_fuzzed_requests_never_get_a_5xx(live: tuple[ServerThread, str]) -> None:
    server, key = live
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures: list[str] = []
    deadline = time.monotonic() + 240  # bounded: the suite must stay fast
    for result in schema.get_all_operations():
        operation = result.ok()
        token = ADMIN_TOKEN if operation.path.startswith("/admin/") else key
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            if time.monotonic() < deadline:
                _fuzz(operation, mode, server.url, token, failures)
    assert not failures, "\n".join(failures[:10])


def _fuzz(operation: Any, mode: Any, base_url: str, token: str, failures: list[str]) -> None:
    """Valid requests (positive) and schema-violating ones (negative): absurd ranges, wrong types."""

    @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {token}"})
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text}")
        elif response.status_code >= 400:
            assert response.json()["error"]["message"], response.text

    check()
