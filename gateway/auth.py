"""Authentication: a pure ASGI middleware that turns a bearer key into a principal.

Requests under the guarded prefixes must carry ``Authorization: Bearer <key>`` for an active
key; anything else gets a 401 here and never reaches a handler, let alone the backend.
The principal is left in ``scope["gateway.principal"]``.

A request the proxy was about to refuse under limits or prices that changed since its key was
read raises :class:`StaleConfiguration` before anything was sent, held or forwarded: it starts
over here, with the key read afresh and the body it already sent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.asgi import header, send_error
from gateway.errors import AuthenticationFailed, ServiceUnavailable
from gateway.keys import Principal

__all__ = ["PRINCIPAL", "AuthMiddleware", "StaleConfiguration"]

PRINCIPAL = "gateway.principal"
_WWW_AUTH = (b"www-authenticate", b'Bearer realm="gateway"')
# Starting over needs the configuration to hold between two reads a few milliseconds apart:
# more than this many changes in a row means an operator script is rewriting it in a loop.
MAX_RESTARTS = 3

Authenticate = Callable[..., Awaitable[Principal | None]]


class StaleConfiguration(Exception):
    """The key or price a request was judged by changed before it was admitted; nothing was
    written, held or forwarded. Carries the body already read, to start over with."""

    def __init__(self, body: bytes) -> None:
        super().__init__("the configuration changed while the request was admitted")
        self.body = body


class AuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticate: Authenticate,
        prefixes: tuple[str, ...] = ("/v1/",),
        cached: Callable[[str], Principal | None] = lambda key: None,
    ) -> None:
        """``cached``: what ``authenticate`` would answer from memory, or None (then it is asked)."""
        self.app = app
        self.authenticate = authenticate
        self.cached = cached
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
        key = key.strip()
        bearer = scheme.lower() == "bearer"
        for _ in range(MAX_RESTARTS + 1):
            principal = (self.cached(key) or await self.authenticate(key)) if bearer else None
            if principal is None:
                await send_error(
                    send,
                    AuthenticationFailed("Invalid API key: it is malformed, unknown or revoked."),
                    [_WWW_AUTH],
                )
                return
            scope[PRINCIPAL] = principal
            try:
                await self.app(scope, receive, send)
                return
            except StaleConfiguration as stale:
                receive = _replay(stale.body, receive)
        await send_error(
            send, ServiceUnavailable("The gateway's configuration kept changing; retry the request.")
        )


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that gives the body already read once more, then listens as before."""
    replayed = False

    async def again() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again
