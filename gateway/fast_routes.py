"""The proxied routes by exact path, ahead of Starlette's router and middleware (pure ASGI).

A proxied request needs none of what Starlette wraps around a route (its error and exception
middleware, regular-expression matching, a wrapper around every ``send``): that stack cost
about a tenth of a request's CPU. These endpoints render their own errors, so here a request
whose method and path match one of them goes straight to it; everything else (other routes,
wrong methods, paths with parameters, lifespan) goes to the full application.
"""

from __future__ import annotations

import contextlib
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.asgi import send_error
from gateway.errors import GatewayError

__all__ = ["FastRoutes"]

log = logging.getLogger("gateway.app")


class FastRoutes:
    def __init__(self, app: ASGIApp, *, routes: dict[tuple[str, str], ASGIApp]) -> None:
        """``routes`` maps (method, path) to an endpoint."""
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.routes.get((scope.get("method", ""), scope.get("path", "")))
        if endpoint is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await endpoint(scope, receive, send)  # (not wrapped: every send would pay for it)
        except Exception:
            # What Starlette's ServerErrorMiddleware does for the other routes: a JSON 500.
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            # Had the answer begun, the server refuses a second start (the ASGI spec has it raise
            # on a message out of turn), and the answer ends where it broke off.
            with contextlib.suppress(Exception):
                await send_error(send, GatewayError("The gateway hit an internal error."))
