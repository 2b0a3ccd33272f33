"""``GET /v1/limits``: the caller's limits, what is used and reserved in each window, and prices.

{"object": "limits", "key": {"id": 1, "name": "acme"}, "plan": "pro",
 "limits": [{"name": "tokens_per_day", "limit": 100000, "used": 1200, "reserved": 0,
             "remaining": 98800, "resets_at": 1795564800, "unit": "tokens"}, ...],
 "prices": {"currency": "USD", "unit": "micro-units per million tokens",
            "models": [{"model": "*", "input_per_million": ..., ...}]}}
"""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.auth import PRINCIPAL
from gateway.keys import Principal
from gateway.prices import PriceBook
from gateway.quota import QuotaStore

__all__ = ["LimitsAPI"]

UNITS = {"rpm": "requests", "max_concurrent": "requests", "spend_per_month": "micro-units"}


class LimitsAPI:
    def __init__(self, quota: QuotaStore, prices: Callable[[], PriceBook], currency: str) -> None:
        self.quota = quota
        self.prices = prices
        self.currency = currency

    async def handle(self, request: Request) -> Response:
        principal: Principal = request.scope[PRINCIPAL]
        now = time.time()
        windows = await self.quota.windows(principal.key_id, principal.limits, now)
        prices = await self.prices().acurrent(now)
        return JSONResponse(
            {
                "object": "limits",
                "key": {"id": principal.key_id, "name": principal.name},
                "plan": principal.plan,
                "limits": [
                    {
                        "name": w.name,
                        "limit": w.limit,
                        "used": w.used,
                        "reserved": w.reserved,
                        "remaining": w.remaining,
                        "resets_at": int(w.resets_at),
                        "unit": UNITS.get(w.name, "tokens"),
                    }
                    for w in windows
                ],
                "prices": {
                    "currency": self.currency,
                    "unit": "micro-units per million tokens",
                    "models": [p.as_dict() for p in prices],
                },
            }
        )
