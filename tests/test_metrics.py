"""Metrics: named and labelled as operators and Prometheus expect, bounded, no secrets."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.db import open_db
from gateway.keys import KeyStore, load_key_secret
from gateway.metrics import FOLD_EVERY, Metrics, Timings
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


def _exposition(registry: CollectorRegistry) -> str:
    """Every sample line but the creation timestamps, sorted (series appear in the order they
    were first used, which a tally folded later need not keep)."""
    text = generate_latest(registry).decode()
    return "\n".join(sorted(line for line in text.splitlines() if "_created" not in line))


def test_tallies_fold_into_exactly_what_direct_observations_give() -> None:
    """Per-request figures are tallied and folded in later: the result is the same, bucket
    bounds included (a value equal to a bound is in that bucket; past the last, in +Inf)."""
    registry, reference = CollectorRegistry(), CollectorRegistry()
    metrics = Metrics(registry, per_key=frozenset({"acme"}))
    direct = Metrics(reference, per_key=frozenset({"acme"}))
    values = [0.0, 0.005, 0.0050001, 0.01, 1, 299.9, 300, 301, 1e9, *[i / 997 for i in range(200)]]

    async def serve() -> None:
        for i, seconds in enumerate(values):
            metrics.started()
            timings = Timings()
            timings.total, timings.backend, timings.overhead = seconds, seconds / 2, seconds / 1000 - 0.001
            timings.first_token = seconds / 3 if i % 2 else None
            figures: dict[str, Any] = dict(
                model=V3 if i % 3 else None,
                route="/chat/completions",
                status=(200, 503, 499, 0)[i % 4],
                prompt_tokens=i,
                tool_tokens=i % 5,
                completion_tokens=2 * i,
                difference=i % 4 - 1,
                cost_micros=3 * i,
                timings=timings,
                error=("timeout", None, "status_5xx")[i % 3] if i % 7 < 3 else None,
                key=("acme", "zeta", None)[i % 3],
            )
            metrics.record(**figures)
            _record_directly(direct, **figures)

    asyncio.run(serve())
    assert _exposition(registry) == _exposition(reference)
    assert registry.get_sample_value("gateway_requests_in_flight") == 0


def _record_directly(m: Metrics, **figures: Any) -> None:
    """What Metrics.record did before tallies: prometheus-client's own inc and observe."""
    status, timings = figures["status"], figures["timings"]
    served = 200 <= status < 300
    label = figures["model"] if served and figures["model"] else "other"
    route = figures["route"]
    m.requests.labels(label, route, f"{status // 100}xx" if status else "none").inc()
    m.duration.labels(route).observe(timings.total)
    m.backend_duration.labels(route).observe(timings.backend)
    m.overhead.labels(route).observe(max(0.0, timings.overhead))
    if timings.first_token is not None:
        m.first_token.labels(route).observe(timings.first_token)
    if figures["error"] is not None:
        m.backend_errors.labels(figures["error"]).inc()
    if not served and status != 499:
        return
    for kind, name in (("input", "prompt_tokens"), ("tool", "tool_tokens"), ("output", "completion_tokens")):
        if figures[name]:
            m.tokens.labels(label, kind).inc(figures[name])
            if figures["key"] is not None:
                m.key_tokens.labels(m.key_label(figures["key"]), kind).inc(figures[name])
    if figures["cost_micros"]:
        m.cost.labels(label).inc(figures["cost_micros"])
    difference = figures["difference"]
    m.accounting_checks.labels(label, "match" if difference == 0 else "mismatch").inc()
    m.accounting_difference.labels(label).observe(abs(difference))


def test_tallies_reach_the_metrics_soon_without_a_scrape() -> None:
    """Another process's scrape reads this one's values (multiprocess files), not its tallies:
    they are folded in within FOLD_EVERY seconds of a request, and in_flight counts as it goes."""
    metrics = Metrics(CollectorRegistry())
    requests = metrics.requests.labels(V3, "/chat/completions", "2xx")

    async def serve() -> tuple[float, float, float]:
        metrics.started()
        await asyncio.sleep(FOLD_EVERY + 0.2)
        in_flight = metrics.in_flight._value.get()
        metrics.record(
            model=V3,
            route="/chat/completions",
            status=200,
            prompt_tokens=1,
            tool_tokens=0,
            completion_tokens=1,
            difference=None,
        )
        before = requests._value.get()
        await asyncio.sleep(FOLD_EVERY + 0.2)
        return in_flight, before, requests._value.get()

    assert asyncio.run(serve()) == (1, 0, 1)
    assert metrics.in_flight._value.get() == 0
