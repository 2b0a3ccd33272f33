"""Prometheus metrics, defined in one place against an injected registry.

Names start with ``gateway_``, use base units (seconds, tokens; money in micro-units of the
operator's currency) and counters end in ``_total``. Label values are bounded by design:
``model`` is only ever a model the backend served (anything refused counts as ``other``),
``route`` is one of the proxied routes, and no key, secret or request id is a label. Series per
customer are opt-in (``metrics_per_key``): the first N key names, alphabetically, get their own
``key`` label and every other key is ``other``.

With several worker processes, set ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess
mode): ``/metrics`` then aggregates every process's files.

Per-request figures are tallied in plain lists, one per set of label values (requests with the
same model, route, status, error and key share one), and folded into the prometheus-client
metrics whenever the registry is read (a scrape, or any ``collect``), and at most
:data:`FOLD_EVERY` seconds after a request (for other processes' scrapes in multiprocess mode):
a dozen locked increments per request cost a tenth of the gateway's own time per request;
a tally costs one lock and one lookup.
"""

from __future__ import annotations

import asyncio
import os
import threading
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.requests import Request
from starlette.responses import Response

__all__ = ["OTHER", "Metrics", "Timings"]

OTHER = "other"
FOLD_EVERY = 0.25  # seconds
DIFFERENCE_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
WRITE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)


class Timings:
    """Seconds measured for one request (None where a phase did not happen)."""

    __slots__ = ("backend", "first_token", "overhead", "send_at", "total")

    def __init__(self) -> None:
        self.send_at: float | None = None  # perf_counter when the request went to the backend
        self.total: float | None = None
        self.backend: float | None = None
        self.overhead: float | None = None
        self.first_token: float | None = None


class Metrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, *, per_key: frozenset[str] = frozenset()
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.per_key = per_key
        self._lock = threading.Lock()
        self._live = 0  # requests started less those finished, since the last fold
        # (model label, route, status class or -1, error, key label) -> [requests, tokens by
        # kind, cost, checks that matched, that did not]
        self._requests: dict[tuple[str, str, int, str | None, str | None], list[int]] = {}
        # route -> [sum, count per bucket...] of duration, backend, overhead and first token
        self._times: dict[str, list[list[float]]] = {}
        self._differences: dict[str, list[float]] = {}  # model label -> [sum, count per bucket...]
        self._fold_at: asyncio.TimerHandle | None = None
        r = self.registry
        # Registered first, so that any read of the registry folds the tallies in before the
        # metrics are collected.
        r.register(_Folder(self))
        self.requests = Counter(
            "gateway_requests",
            "Requests forwarded to the backend.",
            ["model", "route", "status_class"],
            registry=r,
        )
        self.tokens = Counter(
            "gateway_tokens", "Tokens billed, by kind (input includes tool).", ["model", "kind"], registry=r
        )
        self.cost = Counter(
            "gateway_cost_micros",
            "Cost billed, in micro-units of the operator's currency.",
            ["model"],
            registry=r,
        )
        self.key_tokens = Counter(
            "gateway_key_tokens",
            "Tokens billed per customer key (opt-in, capped; the rest is 'other').",
            ["key", "kind"],
            registry=r,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Whole request, as the client saw it.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.backend_duration = Histogram(
            "gateway_backend_duration_seconds",
            "Waiting on the backend (whole answer; streams: until headers).",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "The gateway's own time: the request minus the backend's time.",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "gateway_time_to_first_token_seconds",
            "Streams: until the first event reached the client.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            "gateway_quota_rejections", "Requests refused by a limit.", ["limit", "type"], registry=r
        )
        self.quota_store_errors = Counter(
            "gateway_quota_store_errors",
            "Operations the shared quota store (Redis) failed, by operation; reserve failures were "
            "refused (fail-closed) or served unchecked (fail-open).",
            ["op"],
            registry=r,
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight",
            "Proxied requests being served now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ledger_write = Histogram(
            "gateway_ledger_write_seconds",
            "One ledger commit (a batch of writes).",
            buckets=WRITE_BUCKETS,
            registry=r,
        )
        self.ledger_queue = Gauge(
            "gateway_ledger_queue_depth",
            "Ledger writes waiting for the writer thread.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.backend_errors = Counter(
            "gateway_backend_errors", "Backend failures by kind.", ["kind"], registry=r
        )
        self.accounting_checks = Counter(
            "gateway_accounting_checks",
            "Served chat requests whose prompt tokens the gateway cross-checked against the backend.",
            ["model", "result"],
            registry=r,
        )
        self.accounting_difference = Histogram(
            "gateway_accounting_difference_tokens",
            "Absolute difference between the backend's prompt_tokens and the gateway's own count.",
            ["model"],
            buckets=DIFFERENCE_BUCKETS,
            registry=r,
        )

    def key_label(self, name: str) -> str:
        return name if name in self.per_key else OTHER

    def started(self) -> None:
        """A proxied request is being served (``gateway_requests_in_flight``)."""
        with self._lock:
            self._live += 1
        self._schedule()

    def record(
        self,
        *,
        model: str | None,
        route: str,
        status: int,
        prompt_tokens: int | None,
        tool_tokens: int | None,
        completion_tokens: int | None,
        difference: int | None,
        cost_micros: int | None = None,
        key: str | None = None,
        timings: Timings | None = None,
        error: str | None = None,
    ) -> None:
        """One finished proxied request (and the end of the ``started`` one)."""
        served = 200 <= status < 300
        label = model if (served and model) else OTHER
        billed = served or status == 499
        who = self.key_label(key) if billed and key is not None and self.per_key else None
        # Requests with the same labels share one tally: a tuple and a lookup per request.
        signature = (label, route, status // 100 if status else -1, error, who)
        with self._lock:
            self._live -= 1
            tally = self._requests.get(signature)
            if tally is None:
                tally = self._requests[signature] = [0] * 7
            tally[_N] += 1
            if billed:
                tally[_INPUT] += prompt_tokens or 0
                tally[_TOOL] += tool_tokens or 0
                tally[_OUTPUT] += completion_tokens or 0
                tally[_COST] += cost_micros or 0
                if difference is not None:
                    tally[_MATCH if difference == 0 else _MISMATCH] += 1
                    differences = self._differences.get(label)
                    if differences is None:
                        differences = self._differences[label] = _empty(DIFFERENCE_BUCKETS)
                    _observe(differences, DIFFERENCE_BUCKETS, abs(difference))
            if timings is not None:
                times = self._times.get(route)
                if times is None:
                    times = self._times[route] = [_empty(bounds) for bounds in _TIME_BUCKETS]
                overhead = timings.overhead
                values = (
                    timings.total,
                    timings.backend,
                    None if overhead is None else max(0.0, overhead),
                    timings.first_token,
                )
                for observed, bounds, value in zip(times, _TIME_BUCKETS, values, strict=True):
                    if value is not None:
                        _observe(observed, bounds, value)
        self._schedule()

    def _schedule(self) -> None:
        if self._fold_at is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.fold()  # no loop to fold later on (a script, a test)
            return
        self._fold_at = loop.call_later(FOLD_EVERY, self.fold)

    def fold(self) -> None:
        """Add the tallies to the prometheus-client metrics (and so to multiprocess files)."""
        with self._lock:
            # A pending timer is left to fire (cancelling is not safe from another thread, and a
            # scrape may be one): it finds little or nothing to fold.
            self._fold_at = None
            live, self._live = self._live, 0
            requests, self._requests = self._requests, {}
            times, self._times = self._times, {}
            differences, self._differences = self._differences, {}
            if live:
                self.in_flight.inc(live)
            for (label, route, status_class, error, who), tally in requests.items():
                self.requests.labels(label, route, f"{status_class}xx" if status_class >= 0 else "none").inc(
                    tally[_N]
                )
                if error is not None:
                    self.backend_errors.labels(error).inc(tally[_N])
                for kind, i in (("input", _INPUT), ("tool", _TOOL), ("output", _OUTPUT)):
                    if tally[i]:
                        self.tokens.labels(label, kind).inc(tally[i])
                        if who is not None:
                            self.key_tokens.labels(who, kind).inc(tally[i])
                if tally[_COST]:
                    self.cost.labels(label).inc(tally[_COST])
                for result, i in (("match", _MATCH), ("mismatch", _MISMATCH)):
                    if tally[i]:
                        self.accounting_checks.labels(label, result).inc(tally[i])
            histograms = (self.duration, self.backend_duration, self.overhead, self.first_token)
            for route, per_kind in times.items():
                for histogram, observed in zip(histograms, per_kind, strict=True):
                    if any(observed[1:]):  # e.g. no first token for whole answers: no series
                        _fold_histogram(histogram.labels(route), observed)
            for label, observed in differences.items():
                _fold_histogram(self.accounting_difference.labels(label), observed)

    def rejected(self, limit: str, kind: str) -> None:
        self.rejections.labels(limit, kind).inc()

    def ledger_commit(self, seconds: float, writes: int) -> None:
        self.ledger_write.observe(seconds)

    async def endpoint(self, request: Request) -> Response:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self.fold()  # this process's tallies into its files; the registry below reads files
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


_N, _INPUT, _TOOL, _OUTPUT, _COST, _MATCH, _MISMATCH = range(7)
_TIME_BUCKETS = (LATENCY_BUCKETS, LATENCY_BUCKETS, OVERHEAD_BUCKETS, LATENCY_BUCKETS)


def _empty(bounds: tuple[float, ...]) -> list[float]:
    """A histogram's tally: [sum, count per bucket..., count past the last bound]."""
    return [0.0] * (len(bounds) + 2)


def _observe(tally: list[float], bounds: tuple[float, ...], value: float) -> None:
    tally[0] += value
    # The first bucket whose bound is >= value: prometheus-client's own rule.
    tally[1 + bisect_left(bounds, value)] += 1


def _fold_histogram(child: Any, tally: list[float]) -> None:
    child._sum.inc(tally[0])
    for bucket, n in zip(child._buckets, tally[1:], strict=True):
        if n:
            bucket.inc(n)


class _Folder:
    """A collector with no metrics of its own: collecting folds the tallies in first."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        self._metrics.fold()
        return []
