"""Metrics: named and labelled as operators and Prometheus expect, bounded, no secrets."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.db import open_db
from gateway.keys import KeyStore, load_key_secret
from gateway.prices import Price, PriceBook
from gateway.settings import Settings
from tests.conftest import SEED_MESSAGES, SEED_TOOLS

V3 = "mistralai/Mistral-7B-Instruct-v0.3"


def _backend(request: httpx.Request) -> httpx.Response:
    if request.headers.get("x-fail") == "down":
        raise httpx.ConnectError("refused")
    if request.headers.get("x-fail"):
        return httpx.Response(503, json={"error": {"message": "busy"}})
    return httpx.Response(200, json={"choices": [], "usage": {"prompt_tokens": 95, "completion_tokens": 7}})


def _run(
    settings: Settings, registry: CollectorRegistry, calls: list[tuple[str, dict[str, str], dict[str, Any]]]
) -> str:
    with TestClient(
        create_app(settings, transport=httpx.MockTransport(_backend), registry=registry)
    ) as client:
        for key, headers, body in calls:
            client.post(
                "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}", **headers}
            )
        time.sleep(0.2)  # let the ledger writer commit
        return client.get("/metrics").text


def test_the_metrics_an_operator_needs(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    store = KeyStore(open_db(settings.db), load_key_secret(settings))
    _, key = store.create("acme")
    _, tight = store.create("tight", limits={"rpm": 1})
    PriceBook(open_db(settings.db)).set("*", Price(1_000_000, 500_000, 2_000_000), effective_from=0)
    body = {"model": V3, "messages": SEED_MESSAGES, "tools": SEED_TOOLS}
    registry = CollectorRegistry()
    text = _run(
        settings,
        registry,
        [
            (key, {}, body),
            (key, {"x-fail": "503"}, body),
            (key, {"x-fail": "down"}, body),
            (tight, {}, body),
            (tight, {}, body),
        ],
    )
    value = registry.get_sample_value
    assert (
        value("gateway_requests_total", {"model": V3, "route": "/chat/completions", "status_class": "2xx"})
        == 2
    )
    assert (
        value(
            "gateway_requests_total", {"model": "other", "route": "/chat/completions", "status_class": "5xx"}
        )
        == 2
    )
    assert value("gateway_tokens_total", {"model": V3, "kind": "tool"}) == 2 * 84
    assert value("gateway_cost_micros_total", {"model": V3}) == 2 * (11 + 84 * 0.5 + 7 * 2)
    assert value("gateway_request_duration_seconds_count", {"route": "/chat/completions"}) == 4
    assert value("gateway_overhead_seconds_count", {"route": "/chat/completions"}) == 4
    assert value("gateway_backend_duration_seconds_count", {"route": "/chat/completions"}) == 3
    assert value("gateway_quota_rejections_total", {"limit": "rpm", "type": "rate_limit_exceeded"}) == 1
    assert value("gateway_backend_errors_total", {"kind": "status_5xx"}) == 1
    assert value("gateway_backend_errors_total", {"kind": "unreachable"}) == 1
    assert value("gateway_requests_in_flight") == 0
    assert value("gateway_ledger_write_seconds_count") >= 1
    assert value("gateway_ledger_queue_depth") is not None
    assert value("gateway_accounting_checks_total", {"model": V3, "result": "match"}) == 2
    assert key not in text and tight not in text and "acme" not in text  # no per-key series unless opted in
    for name in re.findall(r"^# TYPE (\S+) (\S+)", text, flags=re.M):
        assert name[0].startswith("gateway_"), name


def test_per_key_series_are_opt_in_and_capped(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(metrics_per_key=1)
    store = KeyStore(open_db(settings.db), load_key_secret(settings))
    keys = {name: store.create(name)[1] for name in ("alpha", "beta", "gamma")}
    body = {"model": V3, "messages": SEED_MESSAGES}
    registry = CollectorRegistry()
    _run(settings, registry, [(k, {}, body) for k in keys.values()])
    value = registry.get_sample_value
    assert value("gateway_key_tokens_total", {"key": "alpha", "kind": "input"}) == 95
    assert value("gateway_key_tokens_total", {"key": "other", "kind": "input"}) == 2 * 95
    assert value("gateway_key_tokens_total", {"key": "beta", "kind": "input"}) is None
