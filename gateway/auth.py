"""Authentication: a pure ASGI middleware that turns a bearer key into a principal.

Requests under the guarded prefixes must carry ``Authorization: Bearer <key>`` for an active
key; anything else gets a 401 here and never reaches a handler, let alone the backend.
The principal is left in ``scope["gateway.principal"]``.

In front of the proxy (``checked_at_commit``), a cached key is used without reading the
configuration version: the proxy commits the request's pending row only if the version still
holds, and otherwise raises :class:`StaleConfiguration` before anything was sent or forwarded.
The request then starts over here, with the key read afresh and the body it already sent.
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
    """The key or price a request was admitted with changed before its pending row committed;
    nothing was written or forwarded. Carries the body already read, to start over with."""

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
        checked_at_commit: bool = False,
    ) -> None:
        self.app = app
        self.authenticate = authenticate
        self.prefixes = prefixes
        self.checked_at_commit = checked_at_commit

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
        checked_at_commit = self.checked_at_commit
        for _ in range(MAX_RESTARTS + 1):
            principal = await self.authenticate(key, checked_at_commit=checked_at_commit) if bearer else None
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
                checked_at_commit = False  # read the version afresh this time
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
