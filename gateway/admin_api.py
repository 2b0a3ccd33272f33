"""The admin API under ``/admin/``: keys, plans, prices and everyone's usage, for operators.

Authenticated by ``Authorization: Bearer $GATEWAY_ADMIN_TOKEN`` (a pure ASGI middleware): no
token or a wrong one is a 401, a customer key a 403, and without a configured admin token the
whole API is off (404). Every operation mirrors a CLI command and runs in a worker thread on a
connection of its own.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.asgi import header, send_error
from gateway.errors import AuthenticationFailed, InvalidRequest, NotFound, PermissionDenied
from gateway.keys import KeyError_, KeyStore, Principal
from gateway.limits import LIMIT_NAMES, MAX_VALUE, PlanError, PlanStore
from gateway.prices import Price, PriceBook, PriceError
from gateway.usage import Query, buckets, request_lines
from gateway.usage_api import MAX_REQUEST_LINES, render_page, run_query

__all__ = ["AdminAPI", "AdminAuthMiddleware"]

PREFIX = "/admin/"


class AdminAuthMiddleware:
    def __init__(
        self, app: ASGIApp, *, token: str | None, authenticate: Callable[[str], Awaitable[Principal | None]]
    ) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        if self.token is None:
            await send_error(send, NotFound("The admin API is off: set GATEWAY_ADMIN_TOKEN to turn it on."))
            return
        scheme, _, given = (header(scope, b"authorization") or b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token):
            await self.app(scope, receive, send)
            return
        if scheme.lower() == "bearer" and await self.authenticate(given.strip()) is not None:
            await send_error(send, PermissionDenied("A customer key cannot use the admin API."))
            return
        await send_error(
            send,
            AuthenticationFailed(
                "The admin API needs 'Authorization: Bearer <admin token>'.", code="invalid_admin_token"
            ),
        )


class AdminAPI:
    def __init__(self, db_path: str, key_secret: bytes, currency: str) -> None:
        self.db_path = db_path
        self.key_secret = key_secret
        self.currency = currency

    def routes(self) -> list[Route]:
        return [
            Route("/admin/keys", self.list_keys, methods=["GET"]),
            Route("/admin/keys", self.create_key, methods=["POST"]),
            Route("/admin/keys/{key}", self.show_key, methods=["GET"]),
            Route("/admin/keys/{key}", self.update_key, methods=["PATCH"]),
            Route("/admin/keys/{key}/revoke", self.revoke_key, methods=["POST"]),
            Route("/admin/keys/{key}/rotate", self.rotate_key, methods=["POST"]),
            Route("/admin/plans", self.list_plans, methods=["GET"]),
            Route("/admin/plans", self.create_plan, methods=["POST"]),
            Route("/admin/plans/{name}", self.update_plan, methods=["PATCH"]),
            Route("/admin/plans/{name}", self.delete_plan, methods=["DELETE"]),
            Route("/admin/prices", self.list_prices, methods=["GET"]),
            Route("/admin/prices", self.set_price, methods=["POST"]),
            Route("/admin/usage", self.usage, methods=["GET"]),
            Route("/admin/usage/requests", self.usage_requests, methods=["GET"]),
        ]

    async def _run(self, fn: Callable[[Any], Any]) -> Any:
        def guarded(db: Any) -> Any:
            try:
                return fn(db)
            except (KeyError_, PlanError, PriceError) as exc:
                message = str(exc)
                raise (NotFound(message) if message.startswith("no ") else InvalidRequest(message)) from None

        return await run_query(self.db_path, guarded)

    def _keys(self, db: Any) -> KeyStore:
        return KeyStore(db, self.key_secret)

    # keys
    async def list_keys(self, request: Request) -> Response:
        keys = await self._run(lambda db: [k.as_dict() for k in self._keys(db).list()])
        return JSONResponse({"object": "list", "data": keys})

    async def create_key(self, request: Request) -> Response:
        body = await _json(request)
        name = body.get("name")
        if not isinstance(name, str):
            raise InvalidRequest("'name' is required and must be a string.", param="name")
        plan, limits = _plan(body), _limits(body)

        def create(db: Any) -> dict[str, Any]:
            info, secret = self._keys(db).create(name, plan=plan, limits=limits)
            return {**info.as_dict(), "key": secret}

        return JSONResponse(await self._run(create), status_code=201)

    async def show_key(self, request: Request) -> Response:
        ref = request.path_params["key"]
        return JSONResponse(await self._run(lambda db: self._keys(db).get(ref).as_dict()))

    async def update_key(self, request: Request) -> Response:
        ref = request.path_params["key"]
        body = await _json(request)
        clear_plan = "plan" in body and body["plan"] is None
        plan, limits = _plan(body), _limits(body)
        info = await self._run(
            lambda db: self._keys(db).update(ref, plan=plan, clear_plan=clear_plan, limits=limits).as_dict()
        )
        return JSONResponse(info)

    async def revoke_key(self, request: Request) -> Response:
        ref = request.path_params["key"]
        return JSONResponse(await self._run(lambda db: self._keys(db).revoke(ref).as_dict()))

    async def rotate_key(self, request: Request) -> Response:
        ref = request.path_params["key"]

        def rotate(db: Any) -> dict[str, Any]:
            info, secret = self._keys(db).rotate(ref)
            return {**info.as_dict(), "key": secret}

        return JSONResponse(await self._run(rotate))

    # plans
    async def list_plans(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": await self._run(lambda db: PlanStore(db).list())})

    async def create_plan(self, request: Request) -> Response:
        body = await _json(request)
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("'name' is required and must be a string.", param="name")
        limits = _limits(body)
        return JSONResponse(await self._run(lambda db: PlanStore(db).create(name, limits)), status_code=201)

    async def update_plan(self, request: Request) -> Response:
        name = request.path_params["name"]
        limits = _limits(await _json(request))
        return JSONResponse(await self._run(lambda db: PlanStore(db).update(name, limits)))

    async def delete_plan(self, request: Request) -> Response:
        name = request.path_params["name"]
        await self._run(lambda db: PlanStore(db).delete(name))
        return JSONResponse({"object": "plan.deleted", "name": name})

    # prices
    async def list_prices(self, request: Request) -> Response:
        history = request.query_params.get("history") in ("1", "true")

        def prices(db: Any) -> list[dict[str, Any]]:
            book = PriceBook(db)
            return [p.as_dict() for p in (book.history() if history else book.current())]

        return JSONResponse({"object": "list", "currency": self.currency, "data": await self._run(prices)})

    async def set_price(self, request: Request) -> Response:
        body = await _json(request)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("'model' is required ('*' for the default price).", param="model")
        values = {}
        for field in ("input_per_million", "output_per_million", "tool_per_million"):
            value = body.get(field, body.get("input_per_million") if field == "tool_per_million" else None)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_VALUE:
                raise InvalidRequest(
                    f"'{field}' must be an integer from 0 to 2**62 (micro-units).", param=field
                )
            values[field] = value
        effective = body.get("effective_from")
        if effective is not None and (
            not isinstance(effective, int | float)
            or isinstance(effective, bool)
            or not 0 <= effective < 2**40
        ):
            raise InvalidRequest("'effective_from' must be unix seconds.", param="effective_from")
        price = Price(values["input_per_million"], values["tool_per_million"], values["output_per_million"])
        saved = await self._run(lambda db: PriceBook(db).set(model, price, effective))
        return JSONResponse(saved.as_dict(), status_code=201)

    # usage
    async def usage(self, request: Request) -> Response:
        q = Query.parse(request.query_params, now=time.time(), allow_key_group=True)
        key_ref = request.query_params.get("key")

        def page(db: Any) -> dict[str, Any]:
            key_id = self._keys(db).get(key_ref).id if key_ref else None
            return buckets(db, key_id, q, currency=self.currency)

        return render_page(await self._run(page), request.query_params.get("format"))

    async def usage_requests(self, request: Request) -> Response:
        key_ref = request.query_params.get("key")
        if not key_ref:
            raise InvalidRequest("'key' (a key id or name) is required.", param="key")
        try:
            limit = int(request.query_params.get("limit", "100"))
        except ValueError:
            raise InvalidRequest("limit must be an integer.", param="limit") from None
        if not 1 <= limit <= MAX_REQUEST_LINES:
            raise InvalidRequest(f"limit must be between 1 and {MAX_REQUEST_LINES}.", param="limit")
        after = request.query_params.get("after") or None

        def lines(db: Any) -> dict[str, Any]:
            key_id = self._keys(db).get(key_ref).id
            return request_lines(db, key_id, limit=limit, before=after, currency=self.currency)

        return JSONResponse(await self._run(lines))


async def _json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise InvalidRequest("The body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.", code="invalid_json")
    return body


def _plan(body: dict[str, Any]) -> str | None:
    plan = body.get("plan")
    if plan is not None and not isinstance(plan, str):
        raise InvalidRequest("'plan' must be a plan name or null.", param="plan")
    return plan


def _limits(body: dict[str, Any]) -> dict[str, int | None]:
    limits = body.get("limits", {})
    if not isinstance(limits, dict):
        raise InvalidRequest("'limits' must be an object.", param="limits")
    out: dict[str, int | None] = {}
    for name, value in limits.items():
        if name not in LIMIT_NAMES:
            raise InvalidRequest(
                f"unknown limit {name!r}; limits are {', '.join(LIMIT_NAMES)}.", param="limits"
            )
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_VALUE
        ):
            raise InvalidRequest(
                f"limits.{name} must be an integer from 0 to 2**62, or null.", param="limits"
            )
        out[name] = value
    return out
