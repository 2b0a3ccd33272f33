"""Small ASGI helpers shared by the hot-path handlers (no Starlette objects on the hot path)."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError, InvalidRequest, PayloadTooLarge

__all__ = ["ClientGone", "header", "read_body", "send_error", "send_json"]

JSON_CT = (b"content-type", b"application/json")


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


async def read_body(receive: Receive, limit: int, declared: bytes | None = None) -> bytes:
    """The whole request body, refusing (413) more than ``limit`` bytes without reading them all."""
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _too_large(limit)
        except ValueError:
            raise InvalidRequest("invalid Content-Length header") from None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body is larger than the gateway's limit of {limit} bytes")


async def send_json(
    send: Send,
    status: int,
    body: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    raw = [JSON_CT, (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, exc: GatewayError, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    await send_json(send, exc.status, exc.body(), [*extra, *headers])
