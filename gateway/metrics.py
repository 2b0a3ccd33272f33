"""Prometheus metrics, defined in one place against an injected registry.

Label values are bounded by design: ``model`` is only ever a model the backend served (a
request the backend refused is labelled ``other``), and no key, secret or request id is a label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

__all__ = ["Metrics"]

OTHER = "other"
DIFFERENCE_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Requests forwarded to the backend.",
            ["model", "route", "status_class"],
            registry=r,
        )
        self.tokens = Counter(
            "gateway_tokens", "Tokens billed, by kind (input includes tool).", ["model", "kind"], registry=r
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
    ) -> None:
        served = 200 <= status < 300
        label = model if (served and model) else OTHER
        self.requests.labels(label, route, f"{status // 100}xx" if status else "none").inc()
        if not served:
            return
        if prompt_tokens:
            self.tokens.labels(label, "input").inc(prompt_tokens)
        if tool_tokens:
            self.tokens.labels(label, "tool").inc(tool_tokens)
        if completion_tokens:
            self.tokens.labels(label, "output").inc(completion_tokens)
        if difference is not None:
            self.accounting_checks.labels(label, "match" if difference == 0 else "mismatch").inc()
            self.accounting_difference.labels(label).observe(abs(difference))

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
