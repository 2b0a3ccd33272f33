"""``GET /v1/usage`` and ``GET /v1/usage/requests``: a customer's own usage, nobody else's.

Queries run in a worker thread on a connection of their own: a big ledger never stalls the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.auth import PRINCIPAL
from gateway.db import open_db
from gateway.errors import InvalidRequest
from gateway.keys import Principal
from gateway.usage import Query, buckets, request_lines, to_csv

__all__ = ["UsageAPI", "run_query"]

T = TypeVar("T")
MAX_REQUEST_LINES = 1000


async def run_query(db_path: str, fn: Callable[[Any], T]) -> T:
    def work() -> T:
        db = open_db(db_path, migrate=False)
        try:
            return fn(db)
        finally:
            db.close()

    return await asyncio.to_thread(work)


def render_page(page: dict[str, Any], fmt: str | None) -> Response:
    if fmt == "csv":
        return Response(
            to_csv(page),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": 'attachment; filename="usage.csv"'},
        )
    if fmt not in (None, "", "json"):
        raise InvalidRequest("format must be json or csv.", param="format")
    return JSONResponse(page)


class UsageAPI:
    def __init__(self, db_path: str, currency: str) -> None:
        self.db_path = db_path
        self.currency = currency

    async def usage(self, request: Request) -> Response:
        principal: Principal = request.scope[PRINCIPAL]
        q = Query.parse(request.query_params, now=time.time())
        page = await run_query(
            self.db_path, lambda db: buckets(db, principal.key_id, q, currency=self.currency)
        )
        return render_page(page, request.query_params.get("format"))

    async def requests(self, request: Request) -> Response:
        principal: Principal = request.scope[PRINCIPAL]
        raw = request.query_params.get("limit", "100")
        try:
            limit = int(raw)
        except ValueError:
            raise InvalidRequest("limit must be an integer.", param="limit") from None
        if not 1 <= limit <= MAX_REQUEST_LINES:
            raise InvalidRequest(f"limit must be between 1 and {MAX_REQUEST_LINES}.", param="limit")
        after = request.query_params.get("after") or None
        page = await run_query(
            self.db_path,
            lambda db: request_lines(db, principal.key_id, limit=limit, before=after, currency=self.currency),
        )
        return JSONResponse(page)
