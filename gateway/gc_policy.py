"""The serving process's garbage-collector policy: fewer young collections, and the start-up
heap frozen out of the old ones.

CPython collects its youngest generation every 700 net container allocations. A proxied
request allocates a few hundred, so under load a collection ran every request or two and walked
every request still in flight, out of the caches: 3% of the gateway's CPU under 32 concurrent
requests (``perf``), 0.2% with this policy. A higher first threshold lets most of a request's
objects die by reference counting before any collection sees them.

A full collection walks every tracked object in the process: the registry, the tokenizers,
the modules (41 to 47 ms in a running gateway, an event loop stalled that long). Once the
application has started, :func:`gc.freeze` moves all of that to a permanent generation that
collections skip; only what is created later (a tokenizer loaded on its model's first request)
is walked again.

Only ``gateway serve`` applies it (:class:`GcPolicy`, around the application): the collector is
the process's, and a test suite or an embedding program that builds many applications must not
have their objects frozen for good.
"""

from __future__ import annotations

import gc

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.settings import ConfigError

__all__ = ["GcPolicy"]

# Python's second and third thresholds are 10 and 10; with a tenfold first one, the older
# generations are collected at about the same rate as before in objects allocated.
OLDER_THRESHOLDS = (10, 10)


class GcPolicy:
    """Pure ASGI: sets the first-generation threshold (``threshold``; 0 leaves Python's) and,
    with ``freeze``, freezes the heap once the wrapped application reports its start-up done."""

    def __init__(self, app: ASGIApp, *, threshold: int, freeze: bool) -> None:
        if threshold < 0:
            raise ConfigError(f"setting 'gc_threshold': {threshold} is negative (0 keeps Python's own)")
        self.app = app
        self.threshold = threshold
        self.freeze = freeze
        if threshold:
            gc.set_threshold(threshold, *OLDER_THRESHOLDS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan" or not self.freeze:
            await self.app(scope, receive, send)
            return

        async def started(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                # Garbage first: what is frozen is never collected.
                gc.collect()
                gc.freeze()
            await send(message)

        await self.app(scope, receive, started)
