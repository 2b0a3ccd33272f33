"""Authentication: a pure ASGI middleware that turns a bearer key into a principal.

Requests under the guarded prefixes must carry ``Authorization: Bearer <key>`` for an active
key; anything else gets a 401 here and never reaches a handler, let alone the backend.
The principal is left in ``scope["gateway.principal"]``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.asgi import header, send_error
from gateway.errors import AuthenticationFailed
from gateway.keys import Principal

__all__ = ["PRINCIPAL", "AuthMiddleware"]

PRINCIPAL = "gateway.principal"
_WWW_AUTH = (b"www-authenticate", b'Bearer realm="gateway"')


class AuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticate: Callable[[str], Awaitable[Principal | None]],
        prefixes: tuple[str, ...] = ("/v1/",),
    ) -> None:
        self.app = app
        self.authenticate = authenticate
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefixes):
            await self.app(scope, receive, send)
            return
        raw = header(scope, b"authorization")
        if raw is None:
            await send_error(
                send,
                AuthenticationFailed(
                    "Missing API key: pass it as 'Authorization: Bearer <key>'.", code="missing_api_key"
                ),
                [_WWW_AUTH],
            )
            return
        scheme, _, key = raw.decode("latin-1").partition(" ")
        principal = await self.authenticate(key.strip()) if scheme.lower() == "bearer" else None
        if principal is None:
            await send_error(
                send,
                AuthenticationFailed("Invalid API key: it is malformed, unknown or revoked."),
                [_WWW_AUTH],
            )
            return
        scope[PRINCIPAL] = principal
        await self.app(scope, receive, send)
