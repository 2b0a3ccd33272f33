"""``create_app(settings)``: the gateway as one ASGI application (Starlette, with the proxied
routes dispatched ahead of it by :class:`FastRoutes`).

Nothing happens at import time. The lifespan owns the per-process resources: the shared
httpx client, the ledger's writer, the key store's read connection and, with Redis, the quota
store's connection and heartbeat.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from gateway import openapi
from gateway.accounting.accountant import Accountant
from gateway.accounting.encoders import TokenizerFileError
from gateway.accounting.registry import Registry, RegistryError
from gateway.admin_api import AdminAPI, AdminAuthMiddleware
from gateway.auth import AuthMiddleware
from gateway.config_version import ConfigVersion
from gateway.count_tokens import CountTokens
from gateway.db import open_db
from gateway.errors import GatewayError, MethodNotAllowed, NotFound, error_body
from gateway.fast_routes import FastRoutes
from gateway.keys import KeyStore, Principal, load_key_secret
from gateway.ledger import Ledger
from gateway.limits_api import LimitsAPI
from gateway.metrics import Metrics
from gateway.prices import Price, PriceBook
from gateway.proxy import Proxy, RouteSpec
from gateway.quota import LocalQuota, ledger_totals
from gateway.settings import ConfigError, Settings
from gateway.upstream import build_client
from gateway.usage_api import UsageAPI
from gateway.validation import ChatRules

if TYPE_CHECKING:
    from gateway.redis_quota import RedisQuota

__all__ = ["create_app"]

log = logging.getLogger("gateway")

CHAT = RouteSpec("/chat/completions", needs_model=True, chat=True, generates=True)
COMPLETIONS = RouteSpec("/completions", needs_model=True, generates=True)
EMBEDDINGS = RouteSpec("/embeddings", needs_model=True)
MODELS = RouteSpec("/models")
MODEL = RouteSpec("/models/{model_id}")

# The seed's base path (/v1/openai) and the plain OpenAI one (/v1) are twins.
PROXY_ROUTES: tuple[tuple[str, RouteSpec, str], ...] = tuple(
    (prefix + path, spec, method)
    for prefix in ("/v1/openai", "/v1")
    for path, spec, method in (
        ("/chat/completions", CHAT, "POST"),
        ("/completions", COMPLETIONS, "POST"),
        ("/embeddings", EMBEDDINGS, "POST"),
        ("/models", MODELS, "GET"),
        ("/models/{model_id:path}", MODEL, "GET"),
    )
)


@dataclass
class _Holder:
    """Late-bound resources the lifespan creates and the endpoints use."""

    keys: KeyStore | None = None
    prices: PriceBook | None = None
    version: ConfigVersion | None = None

    def version_now(self) -> int | None:
        return self.version.current() if self.version is not None else None

    async def authenticate(self, key: str) -> Principal | None:
        assert self.keys is not None, "the app's lifespan has not started"
        return await self.keys.authenticate(key)

    def cached_principal(self, key: str) -> Principal | None:
        return self.keys.cached(key) if self.keys is not None else None

    def price_book(self) -> PriceBook:
        assert self.prices is not None, "the app's lifespan has not started"
        return self.prices

    def recovery_cost(self, model: str | None, when: float, input_tokens: int, output_tokens: int) -> int:
        assert self.prices is not None, "the app's lifespan has not started"
        return self.prices.at(model, when).cost(
            input_tokens=input_tokens, tool_tokens=0, output_tokens=output_tokens
        )

    async def price(self, model: str | None, when: float, version: int | None = None) -> Price:
        assert self.prices is not None, "the app's lifespan has not started"
        return await self.prices.price_at(model, when, version)

    def cached_price(self, model: str | None, when: float, version: int | None = None) -> Price | None:
        return self.prices.cached_at(model, when, version) if self.prices is not None else None


def create_app(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    registry: CollectorRegistry | None = None,
) -> ASGIApp:
    """Build the gateway. ``transport`` replaces the network in unit tests (httpx.MockTransport);
    ``registry`` receives the Prometheus metrics (a fresh one per app by default)."""
    if not settings.upstream_url:
        raise ConfigError("no upstream configured: set --upstream or GATEWAY_UPSTREAM_URL")
    holder = _Holder()
    try:
        models = Registry.load(operator=settings.registry, operator_base=_config_dir(settings))
    except RegistryError as exc:
        raise ConfigError(str(exc)) from None
    if settings.fallback_model and models.profile(settings.fallback_model) is None:
        raise ConfigError(f"fallback_model {settings.fallback_model!r} is not in the model registry")
    _preload(models, settings.preload_models)
    accountant = Accountant(models, fallback_model=settings.fallback_model)
    metrics = Metrics(registry)
    choices = tuple(c.strip() for c in settings.tool_choices.split(",") if c.strip())
    rules = ChatRules(settings.max_tools, settings.max_schema_depth, choices or None)
    instance = uuid.uuid4().hex[:16]
    quota = _quota_store(settings, metrics, instance)
    client = build_client(settings, transport)
    ledger = Ledger(
        settings.db,
        on_commit=metrics.ledger_commit,
        instance=instance,
        replica_timeout=settings.replica_timeout,
    )
    metrics.ledger_queue.set_function(lambda: ledger.queue_depth)
    proxy = Proxy(
        client=client,
        ledger=ledger,
        upstream_url=settings.upstream_url,
        upstream_api_key=settings.upstream_api_key,
        max_body_bytes=settings.max_body_bytes,
        accountant=accountant,
        metrics=metrics,
        quota=quota,
        prices=holder.price,
        cached_price=holder.cached_price,
        default_max_tokens=settings.default_max_tokens,
        backend_counts_tools=settings.backend_counts_tools,
        emulate_tool_streams=settings.emulate_tool_streams,
        rules=rules,
        config_version=holder.version_now,
    )
    limits_api = LimitsAPI(quota, holder.price_book, settings.currency)
    count_tokens = CountTokens(accountant, settings.max_body_bytes, rules)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        db = open_db(settings.db)
        version = holder.version = ConfigVersion(db) if db.dialect.name == "sqlite" else None
        holder.keys = KeyStore(db, load_key_secret(settings), version=version)
        holder.prices = PriceBook(db, version=version)
        recovered = ledger.recover(holder.recovery_cost)
        if isinstance(quota, LocalQuota):
            quota.load(db, time.time())
        else:
            await quota.start(totals=functools.partial(_totals, settings.db))
        if settings.metrics_per_key:
            names = sorted(k.name for k in holder.keys.list())
            metrics.per_key = frozenset(names[: settings.metrics_per_key])
        if recovered:
            log.warning(
                "recovered %d request(s) left pending by a previous run (billed as estimates)", recovered
            )
        ledger.start(after_commit=version.refresh if version is not None else None)
        try:
            yield
        finally:
            await ledger.close()
            await client.aclose()
            if not isinstance(quota, LocalQuota):
                await quota.aclose()
            await db.aclose()
            db.close()

    routes = [
        Route("/healthz", _health, methods=["GET"]),
        Route("/metrics", metrics.endpoint, methods=["GET"]),
        Route("/openapi.json", openapi.endpoint, methods=["GET"]),
    ]
    routes += [
        Route(prefix + "/chat/completions/count_tokens", count_tokens.handle, methods=["POST"])
        for prefix in ("/v1/openai", "/v1")
    ]
    usage_api = UsageAPI(settings.db, settings.currency)
    for prefix in ("/v1/openai", "/v1"):
        routes += [
            Route(prefix + "/limits", limits_api.handle, methods=["GET"]),
            Route(prefix + "/usage", usage_api.usage, methods=["GET"]),
            Route(prefix + "/usage/requests", usage_api.requests, methods=["GET"]),
        ]
    routes += [Route(path, proxy.endpoint(spec), methods=[method]) for path, spec, method in PROXY_ROUTES]
    routes += AdminAPI(settings.db, load_key_secret(settings), settings.currency).routes()
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            HTTPException: _http_error,
            GatewayError: _gateway_error,
            Exception: _unexpected_error,
        },
    )
    app.add_middleware(AuthMiddleware, authenticate=holder.authenticate)
    app.add_middleware(AdminAuthMiddleware, token=settings.admin_token, authenticate=holder.authenticate)
    fast: dict[tuple[str, str], ASGIApp] = {
        (method, path): AuthMiddleware(
            # The handler itself, not the router's adapter: one coroutine fewer at every step.
            functools.partial(proxy.handle, spec),
            authenticate=holder.authenticate,
            cached=holder.cached_principal,
        )
        for path, spec, method in PROXY_ROUTES
        if "{" not in path
    }
    return FastRoutes(app, routes=fast)


def _preload(models: Registry, setting: str) -> None:
    """Load the tokenizers of the models the operator named before the gateway listens: their
    first requests then count at once (a tekken file takes most of a second to load), and a
    budgeted one is forwarded on a bound instead of waiting for its count."""
    names = [name.strip() for name in setting.split(",") if name.strip()]
    if "*" in names:
        names = models.models()
    unknown = [name for name in names if not models.knows(name)]
    if unknown:  # before any load: a typo is reported at once, not after seconds of loading
        raise ConfigError(f"setting 'preload_models': model {unknown[0]!r} is not in the model registry")
    for name in names:
        started = time.perf_counter()
        try:
            built = models.warm([name])
        except (RegistryError, TokenizerFileError) as exc:
            raise ConfigError(f"setting 'preload_models': {exc}") from None
        if built:
            log.info("preloaded the tokenizer of %s in %.2f s", name, time.perf_counter() - started)


def _quota_store(settings: Settings, metrics: Metrics, instance: str) -> LocalQuota | RedisQuota:
    """In-process counters, or Redis when replicas must share them."""
    if not settings.redis_url:
        return LocalQuota()
    from gateway.redis_quota import RedisQuota

    if settings.redis_max_connections < 1:
        raise ConfigError(
            f"setting 'redis_max_connections': {settings.redis_max_connections} is not at least 1"
        )
    return RedisQuota(
        settings.redis_url,
        fail_open=settings.quota_fail_open,
        prefix=settings.redis_prefix,
        instance=instance,
        on_error=lambda op: metrics.quota_store_errors.labels(op).inc(),
        replica_timeout=settings.replica_timeout,
        max_connections=settings.redis_max_connections,
    )


def _totals(target: str, now: float) -> list[tuple[int, int, int, int]]:
    db = open_db(target, migrate=False)
    try:
        return ledger_totals(db, now)
    finally:
        db.close()


def _config_dir(settings: Settings) -> Path:
    """Relative paths in the operator's registry tables are relative to the config file."""
    return Path(settings.config_file).resolve().parent if settings.config_file else Path.cwd()


async def _health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        err: GatewayError = NotFound(f"No route {request.method} {request.url.path}.")
    elif exc.status_code == 405:
        err = MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}.")
    else:
        err = GatewayError(str(exc.detail))
        err.status = exc.status_code
    return _render(err)


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return _render(exc)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return Response(
        error_body("The gateway hit an internal error.", "api_error", "internal_error"),
        status_code=500,
        media_type="application/json",
    )


def _render(exc: GatewayError) -> Response:
    return Response(exc.body(), status_code=exc.status, media_type="application/json", headers=exc.headers)
