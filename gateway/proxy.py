"""Forwarding customer requests to the backend, metering each one into the ledger.

A proxied request: read and check the body -> pending ledger record (durable) -> forward ->
relay the answer (whole, or event by event for streams) -> settle the row with the backend's
usage. Settlement runs in ``finally``: whatever goes wrong after the pending row, the row is
settled (or, if the process dies, recovered at the next start).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.types import Receive, Scope, Send

from gateway import jsonio
from gateway.accounting.accountant import Accountant, Accounting, UnknownModel, bill
from gateway.accounting.encoders import TokenizerFileError
from gateway.accounting.types import FormatError
from gateway.asgi import ClientGone, header, read_body, send_error
from gateway.auth import PRINCIPAL, StaleConfiguration
from gateway.errors import GatewayError, InvalidRequest, QuotaExceeded, UpstreamError, UpstreamTimeout
from gateway.keys import Principal
from gateway.ledger import Ledger, PendingRow, Settlement, new_request_id
from gateway.limits import Limits
from gateway.metrics import Metrics, Timings
from gateway.prices import Price
from gateway.quota import Demand, QuotaStore, RateWindows, Rejection, Reservation, WindowState, rate_windows
from gateway.sse import StreamMeter
from gateway.stream_emulation import sse_events
from gateway.upstream import BackendResponse, Upstream, request_headers, response_headers, upstream_for
from gateway.validation import ChatRules, max_tokens, parse_document, require_model, stream_flag, with_member

__all__ = ["REQUEST_ID_HEADER", "Proxy"]

log = logging.getLogger("gateway.proxy")

REQUEST_ID_HEADER = b"x-gateway-request-id"
CLIENT_CLOSED = 499  # nginx's convention: the client went away before the answer was complete
CONNECT_RETRIES = 1
HOLD_WAIT = 5.0  # seconds a refused request waits for its key's bounds to become counts
_HELD_LIMITS = frozenset(("tpm", "tokens_per_day", "tokens_per_month", "spend_per_month"))
BACKEND_ERRORS = {
    "upstream_unreachable": "unreachable",
    "upstream_timeout": "timeout",
    "upstream_malformed": "malformed",
    "upstream_error": "connection",
}


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """What the gateway knows about one proxied route."""

    upstream_path: str  # appended to the upstream base URL
    needs_model: bool = False
    chat: bool = False
    generates: bool = False  # produces output tokens (a max_tokens cap applies)


class Proxy:
    """The ASGI endpoint for every proxied route; one instance per app."""

    def __init__(
        self,
        *,
        client: httpx.AsyncClient,
        ledger: Ledger,
        upstream_url: str,
        upstream_api_key: str | None,
        max_body_bytes: int,
        accountant: Accountant,
        metrics: Metrics,
        quota: QuotaStore,
        prices: Callable[[str | None, float, int | None], Awaitable[Price]],
        cached_price: Callable[[str | None, float, int | None], Price | None] = lambda *_: None,
        default_max_tokens: int = 1024,
        backend_counts_tools: bool = True,
        emulate_tool_streams: bool = True,
        rules: ChatRules | None = None,
        config_version: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.config_version = config_version  # the configuration version now (read afresh)
        self.emulate_tool_streams = emulate_tool_streams
        self.rules = rules or ChatRules()
        self.client = client
        # The hot path hands requests straight to the client's pool: httpx's client layer
        # (cookie jar, auth and redirect flows, header merging) costs a sixth of a request's CPU
        # and a transparent proxy needs none of it. Timeouts still come from the client.
        self._upstream: Upstream = upstream_for(client)
        self._timeout = client.timeout.as_dict()
        self.metrics = metrics
        self.quota = quota
        self.prices = prices
        self.cached_price = cached_price  # what prices() would answer from memory, else None
        self.default_max_tokens = default_max_tokens
        self.ledger = ledger
        self.accountant = accountant
        self.backend_counts_tools = backend_counts_tools
        self.base = upstream_url.rstrip("/")
        self.api_key = upstream_api_key
        self.max_body_bytes = max_body_bytes
        self._urls: dict[RouteSpec, Any] = {}
        # A store that can trade a held bound for the count later lets a budgeted request be
        # counted beside the backend's work; others count first.
        self._shrink: Callable[[Reservation, Limits, Demand, float], Awaitable[None]] | None = getattr(
            quota, "shrink", None
        )
        self._holds: dict[int, set[asyncio.Future[None]]] = {}  # key id -> bounds held while counting
        self._reserve_now: Callable[..., Reservation | Rejection] | None = getattr(quota, "reserve_now", None)
        self._shrink_now: Callable[[Reservation, Limits, Demand, float], None] | None = getattr(
            quota, "shrink_now", None
        )

    def endpoint(self, spec: RouteSpec) -> _Endpoint:
        return _Endpoint(self, spec)

    def _url(self, spec: RouteSpec, scope: Scope) -> Any:
        """The backend URL; parsed once per route (a URL parser is a tenth of a request's CPU)."""
        query = scope.get("query_string", b"")
        params = scope.get("path_params")
        if query or params:
            path = self.base + spec.upstream_path.format(**(params or {}))
            return path + "?" + query.decode("latin-1") if query else path
        url = self._urls.get(spec)
        if url is None:
            url = self._urls[spec] = self._upstream.url(self.base + spec.upstream_path)
        return url

    async def handle(self, spec: RouteSpec, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = new_request_id()
        id_header = (REQUEST_ID_HEADER, request_id.encode())
        try:
            await self._handle(spec, request_id, id_header, scope, receive, send)
        except ClientGone:
            return
        except GatewayError as exc:
            if isinstance(exc, QuotaExceeded):
                self.metrics.rejected(exc.rejection.limit, exc.rejection.kind)
            await send_error(send, exc, [id_header])

    async def _handle(
        self,
        spec: RouteSpec,
        request_id: str,
        id_header: tuple[bytes, bytes],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        principal: Principal = scope[PRINCIPAL]
        t0 = time.perf_counter()
        started_at = time.time()
        method: str = scope["method"]
        body = raw_body = b""
        model: str | None = None
        stream = strip_usage = False
        meter: _Metering | None = None
        to_count: tuple[str, Any, Any, int] | None = None
        max_out: int | None = None
        payload: dict[str, Any] = {}
        fast_json = True
        if method == "POST":
            body = raw_body = await read_body(receive, self.max_body_bytes, header(scope, b"content-length"))
            payload, fast_json = parse_document(body)
            model = require_model(payload, required=spec.needs_model)
            stream = stream_flag(payload)
            max_out = max_tokens(payload)
            if spec.chat:
                messages, tools = self.rules.check(payload)
                assert model is not None
                to_count = (model, messages, tools, len(body))
        modified = False
        replay: bool | None = None  # emulated tool stream: whether the client asked for usage
        if stream and spec.chat and payload.get("tools") and self.emulate_tool_streams:
            # This backend refuses streams with tools: ask for the whole answer, replay it as chunks.
            replay = _client_wants_usage(payload)
            payload.pop("stream", None)
            payload.pop("stream_options", None)
            modified = True
        elif stream and spec.chat:
            modified = strip_usage = _ask_for_stream_usage(payload)

        limits = principal.limits
        price: Price | None = None
        if method == "POST":
            price = self.cached_price(model, started_at, principal.version)
            if price is None:
                price = await self.prices(model, started_at, principal.version)
        demand = Demand(0, 0)
        counted: Accounting | None = None
        bound: int | None = None  # held instead of the count while the count runs beside the backend
        if limits.budgets_tokens and method == "POST":
            # A budget needs the request's size before it is forwarded: a bound the count cannot
            # exceed where the format gives one and the store can trade it for the count later,
            # else the count itself, now.
            if to_count is not None and self._shrink is not None:
                bound = self.accountant.bound(*to_count[:3])
            if to_count is not None and bound is None:
                counted = await self._count(*to_count)
                meter = _Metering(counted, bool(to_count[2]))
                to_count = None
            if max_out is None and spec.generates:
                # Without a cap the output is unbounded: reserve the configured cap and enforce it,
                # spliced into the body as sent where that is safe, else re-serialized below.
                cap = self.default_max_tokens
                spliced = None if modified else with_member(body, "max_tokens", cap, payload)
                max_out = payload["max_tokens"] = cap
                modified = spliced is None
                body = spliced or body
            assert price is not None
            demand = (
                _demand(counted, len(raw_body), max_out, price)
                if bound is None
                else _bound_demand(bound, len(raw_body), max_out, price)
            )
        if modified:
            body = jsonio.encode(payload, fast_json)
        reservation: Reservation | None = None
        rate_headers: list[tuple[bytes, bytes]] = []
        hold: asyncio.Future[None] | None = None
        if limits.any:
            now = time.time()
            if self._reserve_now is not None:
                result = self._reserve_now(principal.key_id, limits, demand, now, bound=bound is not None)
            else:
                result = await self.quota.reserve(
                    principal.key_id, limits, demand, now, bound=bound is not None
                )
            if isinstance(result, Rejection) and bound is not None and to_count is not None:
                # The bound does not fit: decide on the count, exactly as without a bound.
                assert price is not None
                counted = await self._count(*to_count)
                meter = _Metering(counted, bool(to_count[2]))
                to_count, bound = None, None
                demand = _demand(counted, len(raw_body), max_out, price)
                result = await self.quota.reserve(principal.key_id, limits, demand, now)
            if isinstance(result, Rejection) and result.limit in _HELD_LIMITS:
                result, now = await self._beside_bounds(principal.key_id, limits, demand, result, now)
            if isinstance(result, Rejection):
                current = self.config_version()  # None where it is not in memory (PostgreSQL)
                if principal.version is not None and current is not None and principal.version != current:
                    # Refused under limits or prices that changed since: decide again, afresh.
                    raise StaleConfiguration(raw_body)
                windows = await self.quota.windows(principal.key_id, limits, now)
                raise QuotaExceeded.from_rejection(result, rate_limit_headers(rate_windows(windows), now))
            reservation = result
            if bound is not None:
                hold = self._hold(principal.key_id)
            elif result.rate is not None:
                rate_headers = rate_limit_headers(result.rate, now)

        url = self._url(spec, scope)
        headers_out = request_headers(scope["headers"], self.api_key)
        settlement = Settlement(request_id, status=0, reserved_tokens=demand.tokens if reservation else None)
        counting: list[asyncio.Task[Accounting | None] | _Counted] = []  # the count beside the backend
        served = False
        timings = Timings()
        backend_error: str | None = None
        self.metrics.started()
        try:
            row = PendingRow(
                request_id,
                principal.key_id,
                model,
                spec.upstream_path,
                stream,
                started_at,
                prompt_estimate=counted.prompt_tokens if counted else len(body) // 4 + 1 if body else 0,
                output_estimate=max_out
                if max_out is not None
                else (self.default_max_tokens if spec.generates else 0),
            )
            if not self.ledger.pending_now(row):
                await self.ledger.pending(row)
            # Counting overlaps the backend's work: it begins once the request is on its way (or
            # waits for a connection), so that not even the task's creation delays the request.
            begin = None
            if to_count is not None:
                begin = functools.partial(
                    self._begin_count,
                    counting,
                    to_count,
                    reservation,
                    limits,
                    price,
                    max_out,
                    hold,
                    rate_headers,
                )
            timings.send_at = time.perf_counter()
            response = await self._send(method, url, headers_out, body or None, begin)
            timings.backend = time.perf_counter() - timings.send_at
            served = response.is_success
            if not served:
                backend_error = f"status_{response.status_code // 100}xx"
            if counting:
                first = counting[0]
                counted = first.counted if isinstance(first, _Counted) else await first
                meter = _Metering(counted, bool(to_count and to_count[2]))
            if hold is not None and reservation is not None:
                settlement.reserved_tokens = reservation.demand.tokens
            settlement.upstream_ms = (time.perf_counter() - t0) * 1000
            headers, content_type = response_headers(response.raw_headers)
            headers += (id_header, *rate_headers)
            if content_type.startswith("text/event-stream"):
                await self._relay_stream(
                    response, headers, settlement, strip_usage, t0, receive, send, meter, model
                )
            elif method == "HEAD":
                await self._relay_head(response, headers, settlement, send)
            else:
                await self._relay_whole(
                    response, content_type, headers, settlement, send, meter, replay, t0, timings
                )
        except GatewayError as exc:
            settlement.status = exc.status
            settlement.error = exc.message
            backend_error = BACKEND_ERRORS.get(exc.code or "", backend_error)
            raise
        except BaseException as exc:
            settlement.status = settlement.status or CLIENT_CLOSED
            settlement.error = settlement.error or f"interrupted: {type(exc).__name__}"
            raise
        finally:
            if counting and isinstance(counting[0], asyncio.Task) and not counting[0].done():
                counting[0].cancel()
            settlement.duration_ms = (time.perf_counter() - t0) * 1000
            used = (settlement.prompt_tokens or 0) + (settlement.completion_tokens or 0) if served else 0
            if served and price is not None:
                settlement.cost_micros = price.cost(
                    input_tokens=settlement.prompt_tokens or 0,
                    tool_tokens=settlement.tool_tokens or 0,
                    output_tokens=settlement.completion_tokens or 0,
                )
            if reservation is not None:
                self.quota.settle(reservation, used, settlement.cost_micros or 0, time.time())
            if hold is not None:
                self._release(principal.key_id, hold)
            self.ledger.settle(settlement)
            timings.total = settlement.duration_ms / 1000
            if timings.send_at is not None:
                pre = timings.send_at - t0
                # Streams: only the gateway's work before forwarding is its own for sure.
                timings.overhead = pre if stream else timings.total - (timings.backend or 0)
            if settlement.first_byte_ms is not None:
                timings.first_token = settlement.first_byte_ms / 1000
            if settlement.error and settlement.error.startswith("backend stream broke off"):
                backend_error = "stream_broken"
            self.metrics.record(
                model=model,
                route=spec.upstream_path,
                status=settlement.status,
                prompt_tokens=settlement.prompt_tokens,
                tool_tokens=settlement.tool_tokens,
                completion_tokens=settlement.completion_tokens,
                difference=meter.difference if meter is not None else None,
                cost_micros=settlement.cost_micros,
                key=principal.name,
                timings=timings,
                error=backend_error,
            )

    async def _beside_bounds(
        self, key_id: int, limits: Limits, demand: Demand, refused: Rejection, now: float
    ) -> tuple[Reservation | Rejection, float]:
        """A refusal beside bounds that requests of this key hold while they count is decided
        again once they hold counts: a bound never refuses what counting first would admit.
        This process's bounds are awaited; other replicas' (a shared store reports them) are
        polled, as their counts are milliseconds away. Gives up after HOLD_WAIT."""
        result: Reservation | Rejection = refused
        deadline = time.monotonic() + HOLD_WAIT
        holds = self._holds.get(key_id)
        if holds:
            await asyncio.wait(list(holds), timeout=HOLD_WAIT)
            now = time.time()
            result = await self.quota.reserve(key_id, limits, demand, now)
        delay = 0.002
        while (
            isinstance(result, Rejection)
            and result.bounds_held > len(self._holds.get(key_id, ()))
            and time.monotonic() + delay < deadline
        ):
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.05)
            now = time.time()
            result = await self.quota.reserve(key_id, limits, demand, now)
        return result, now

    def _hold(self, key_id: int) -> asyncio.Future[None]:
        """Mark a bound held for ``key_id`` until its count replaces it (or the request ends)."""
        hold: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._holds.setdefault(key_id, set()).add(hold)
        return hold

    def _release(self, key_id: int, hold: asyncio.Future[None]) -> None:
        if not hold.done():
            hold.set_result(None)
        holds = self._holds.get(key_id)
        if holds is not None:
            holds.discard(hold)
            if not holds:
                del self._holds[key_id]

    def _begin_count(
        self,
        begun: list[asyncio.Task[Accounting | None] | _Counted],
        to_count: tuple[str, Any, Any, int],
        reservation: Reservation | None,
        limits: Limits,
        price: Price | None,
        max_out: int | None,
        hold: asyncio.Future[None] | None,
        rate_headers: list[tuple[bytes, bytes]],
        written: bool = False,
    ) -> None:
        """Start counting the request (into ``begun``): with the trade of its bound for the
        count where it holds one, else the count alone. Once only, however often called.

        ``written`` (the request just went out, see :class:`gateway.upstream.Upstream`): the
        count is made here, where it needs no thread, and the trade where the store has no
        round trip to make. A task would cost its making and a turn of the loop, and on this
        two-core machine every microsecond of the gateway's work beside the backend's slowed
        the backend by about half as much (the emulator; a backend on its own machine would not
        feel it)."""
        if begun:
            return
        # The bound held, to trade for the count (None: the count alone).
        held = None
        if reservation is not None and price is not None and hold is not None:
            held = (reservation, price, hold)
        tried = written and (held is None or self._shrink_now is not None)
        if tried:
            made, counted = self._count_inline(*to_count)
            if made:
                if held is not None:
                    self._trade_now(counted, to_count[3], limits, max_out, *held, rate_headers)
                begun.append(_Counted(counted))
                return
        if held is None:
            begun.append(asyncio.create_task(self._count(*to_count, tried_inline=tried)))
            return
        reservation, price, hold = held
        exact = functools.partial(_demand, size=to_count[3], max_out=max_out, price=price)
        count = self._count_and_shrink(to_count, reservation, limits, exact, hold, rate_headers, tried)
        begun.append(hold.get_loop().create_task(count))  # (no getpid(), as get_running_loop costs)

    async def _count_and_shrink(
        self,
        to_count: tuple[str, Any, Any, int],
        reservation: Reservation,
        limits: Limits,
        exact: Callable[[Accounting | None], Demand],
        hold: asyncio.Future[None],
        rate_headers: list[tuple[bytes, bytes]],
        tried_inline: bool = False,
    ) -> Accounting | None:
        """The count, and the reservation's bound traded for the demand the count gives; fills
        ``rate_headers`` from the windows the trade leaves. They are built here, while the backend
        works, as a request without a bound builds them at its reservation: not after the answer."""
        counted = await self._count(*to_count, tried_inline=tried_inline)
        assert self._shrink is not None
        try:
            now = time.time()
            await self._shrink(reservation, limits, exact(counted), now)
        finally:
            self._release(reservation.key_id, hold)
        if reservation.rate is not None:
            rate_headers.extend(rate_limit_headers(reservation.rate, now))
        return counted

    def _trade_now(
        self,
        counted: Accounting | None,
        size: int,
        limits: Limits,
        max_out: int | None,
        reservation: Reservation,
        price: Price,
        hold: asyncio.Future[None],
        rate_headers: list[tuple[bytes, bytes]],
    ) -> None:
        """:meth:`_count_and_shrink`'s trade, for a count made on the spot and a store in memory."""
        assert self._shrink_now is not None
        now = time.time()
        try:
            self._shrink_now(reservation, limits, _demand(counted, size, max_out, price), now)
        finally:
            self._release(reservation.key_id, hold)
        if reservation.rate is not None:
            rate_headers.extend(rate_limit_headers(reservation.rate, now))

    async def _count(
        self, model: str, messages: Any, tools: Any, size: int, *, tried_inline: bool = False
    ) -> Accounting | None:
        """The gateway's own count of the request, or None when it cannot count this model
        (``tried_inline``: :meth:`_count_inline` found it needs a thread)."""
        try:
            return await self.accountant.acount(model, messages, tools, size, tried_inline=tried_inline)
        except Exception as exc:
            _count_failed(model, exc)
        return None

    def _count_inline(
        self, model: str, messages: Any, tools: Any, size: int
    ) -> tuple[bool, Accounting | None]:
        """(whether :meth:`_count`'s answer was found here, on the loop; that answer). Not found
        where the count needs a thread: a tokenizer to load, or a long request."""
        try:
            counted = self.accountant.count_inline(model, messages, tools, size)
        except Exception as exc:
            _count_failed(model, exc)
            return True, None
        return counted is not None, counted

    def _text_counter(self, model: str | None) -> Callable[[str], int | None]:
        def count(text: str) -> int | None:
            try:
                return self.accountant.count_text(model, text) if model else None
            except Exception:
                log.exception("counting streamed text failed for model %r", model)
                return None

        return count

    def _bill(self, settlement: Settlement, meter: _Metering | None) -> None:
        """Split the served request's input into message and tool tokens (chat routes)."""
        if meter is None:
            return
        counted = meter.counted
        backend_prompt = settlement.prompt_tokens
        b = bill(
            counted,
            settlement.prompt_tokens,
            has_tools=meter.has_tools,
            backend_counts_tools=self.backend_counts_tools,
        )
        settlement.prompt_tokens = b.prompt_tokens
        settlement.tool_tokens = b.tool_tokens
        settlement.estimated = settlement.estimated or b.estimated
        settlement.counted_prompt_tokens = counted.prompt_tokens if counted else None
        meter.difference = b.difference
        if b.difference and counted is not None:
            # A wrong template or tokenizer shows here first: the operator must see it.
            # With backend_counts_tools off the backend's figure is compared without the tools.
            expected = counted.prompt_tokens if self.backend_counts_tools else counted.message_tokens
            log.warning(
                "prompt-token mismatch for %s: backend %s, gateway %s (%s, %s)",
                counted.model,
                backend_prompt,
                expected,
                counted.tokenizer,
                counted.format,
            )

    async def _send(
        self,
        method: str,
        url: Any,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        sent: Callable[[bool], None] | None = None,
    ) -> BackendResponse:
        for attempt in range(CONNECT_RETRIES + 1):
            try:
                return await self._upstream.send(method, url, headers, body, self._timeout, sent)
            except httpx.ConnectError as exc:
                # Nothing reached the backend: the one failure that is always safe to retry.
                if attempt == CONNECT_RETRIES:
                    raise UpstreamError(
                        "The backend is unreachable (connection refused or failed).",
                        code="upstream_unreachable",
                    ) from exc
            except httpx.TimeoutException as exc:
                what = "take the request" if isinstance(exc, httpx.WriteTimeout) else "answer"
                raise UpstreamTimeout(
                    f"The backend did not {what} in time ({type(exc).__name__}).", code="upstream_timeout"
                ) from exc
            except httpx.HTTPError as exc:
                raise UpstreamError(
                    f"The backend connection failed ({type(exc).__name__}).", code="upstream_error"
                ) from exc
        raise AssertionError("unreachable")

    async def _relay_head(
        self,
        response: BackendResponse,
        headers: list[tuple[bytes, bytes]],
        settlement: Settlement,
        send: Send,
    ) -> None:
        """A HEAD answer has no body to read usage from: its headers, with the backend's length."""
        await response.aclose()
        settlement.status = response.status_code
        if not response.is_success:
            settlement.error = f"backend status {response.status_code}"
        headers += [(k.lower(), v) for k, v in response.raw_headers if k.lower() == b"content-length"]
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def _relay_whole(
        self,
        response: BackendResponse,
        content_type: str,
        headers: list[tuple[bytes, bytes]],
        settlement: Settlement,
        send: Send,
        meter: _Metering | None,
        replay: bool | None = None,
        t0: float = 0.0,
        timings: Timings | None = None,
    ) -> None:
        try:
            content = await response.aread()
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout("The backend did not finish its answer in time.") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"The backend broke off its answer ({type(exc).__name__}).") from exc
        finally:
            await response.aclose()
            if timings is not None and timings.send_at is not None:
                timings.backend = time.perf_counter() - timings.send_at
        settlement.status = response.status_code
        if response.is_success:
            obj, fast = _json_of(content, content_type)
            if obj is _MALFORMED:
                raise UpstreamError("The backend returned a malformed response.", code="upstream_malformed")
            usage = obj.get("usage") if isinstance(obj, dict) else None
            if isinstance(usage, dict):
                settlement.prompt_tokens = _int(usage.get("prompt_tokens"))
                settlement.completion_tokens = _int(usage.get("completion_tokens"))
            self._bill(settlement, meter)
            if meter is not None and isinstance(usage, dict) and settlement.tool_tokens is not None:
                details = usage.get("prompt_tokens_details")
                details = details if isinstance(details, dict) else {}
                usage["prompt_tokens_details"] = {**details, "tool_tokens": settlement.tool_tokens}
                content = jsonio.encode(obj, fast)
            if replay is not None and isinstance(obj, dict):
                await self._replay(obj, replay, headers, settlement, send, t0)
                return
        else:
            settlement.error = f"backend status {response.status_code}"
        headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    async def _replay(
        self,
        completion: dict[str, Any],
        include_usage: bool,
        headers: list[tuple[bytes, bytes]],
        settlement: Settlement,
        send: Send,
        t0: float,
    ) -> None:
        """Send a whole completion as the stream the client asked for (OpenAI's chunk format)."""
        headers = [(k, v) for k, v in headers if k != b"content-type"]
        headers += [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        settlement.first_byte_ms = (time.perf_counter() - t0) * 1000
        for event in sse_events(completion, include_usage):
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def _relay_stream(
        self,
        response: BackendResponse,
        headers: list[tuple[bytes, bytes]],
        settlement: Settlement,
        strip_usage: bool,
        t0: float,
        receive: Receive,
        send: Send,
        metering: _Metering | None,
        model: str | None = None,
    ) -> None:
        settlement.status = response.status_code
        meter = StreamMeter(strip_usage_chunk=strip_usage)
        relay = asyncio.current_task()
        assert relay is not None
        gone = False

        async def watch_disconnect() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            relay.cancel()

        watcher = asyncio.create_task(watch_disconnect())
        try:
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            async for chunk in response.aiter_bytes():
                out = meter.feed(chunk)
                if out:
                    if settlement.first_byte_ms is None:
                        settlement.first_byte_ms = (time.perf_counter() - t0) * 1000
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            await send({"type": "http.response.body", "body": meter.flush()})
        except asyncio.CancelledError:
            if not gone:
                raise
            relay.uncancel()
            settlement.status = CLIENT_CLOSED
            settlement.error = "client disconnected during the stream"
        except httpx.HTTPError as exc:
            # Headers are out: the client sees a truncated stream; the ledger says why.
            settlement.error = f"backend stream broke off ({type(exc).__name__})"
        finally:
            watcher.cancel()
            await response.aclose()
            _settle_stream(settlement, meter, self._text_counter(model))
            if response.is_success:
                self._bill(settlement, metering)


def _demand(counted: Accounting | None, size: int, max_out: int | None, price: Price) -> Demand:
    """What a budget holds for a request: its count (a guess from its size if it has none) and
    its output cap, and their price."""
    prompt = counted.prompt_tokens if counted else size // 2 + 1
    tool = counted.tool_tokens if counted else 0
    out = max_out or 0
    return Demand(prompt + out, price.cost(input_tokens=prompt, tool_tokens=tool, output_tokens=out))


def _bound_demand(bound: int, size: int, max_out: int | None, price: Price) -> Demand:
    """At least what :func:`_demand` can give once counted, or if counting fails: the cost is
    linear in the tool tokens, anywhere from none to the whole prompt, so an end is the most."""
    prompt = max(bound, size // 2 + 1)
    out = max_out or 0
    spend = max(
        price.cost(input_tokens=prompt, tool_tokens=0, output_tokens=out),
        price.cost(input_tokens=prompt, tool_tokens=prompt, output_tokens=out),
    )
    return Demand(prompt + out, spend)


class _Metering:
    """What the gateway counted for one chat request, carried to its settlement."""

    __slots__ = ("counted", "difference", "has_tools")

    def __init__(self, counted: Accounting | None, has_tools: bool) -> None:
        self.counted = counted
        self.has_tools = has_tools
        self.difference: int | None = None


class _Counted:
    """A count made on the spot: what a finished counting task would hold."""

    __slots__ = ("counted",)

    def __init__(self, counted: Accounting | None) -> None:
        self.counted = counted


def _count_failed(model: str, exc: Exception) -> None:
    if isinstance(exc, UnknownModel):
        log.debug("no tokenizer for model %r: tool tokens stay unknown", model)
    elif isinstance(exc, FormatError):
        log.info("cannot render the request for %r: %s", model, exc)
    elif isinstance(exc, TokenizerFileError):
        log.error("tokenizer for %r unavailable: %s", model, exc)
    else:
        # Accounting must never fail a request the backend may serve: record it as unknown.
        log.error("counting failed for model %r", model, exc_info=exc)


class _Endpoint:
    """Adapts one route to the ASGI signature Starlette's router calls."""

    def __init__(self, proxy: Proxy, spec: RouteSpec) -> None:
        self.proxy = proxy
        self.spec = spec

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.proxy.handle(self.spec, scope, receive, send)


def _ask_for_stream_usage(payload: dict[str, Any]) -> bool:
    """Make the backend report usage at the end of a stream; True if the client did not ask."""
    options = payload.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
    if options.get("include_usage") is True:
        return False
    payload["stream_options"] = {**options, "include_usage": True}
    return True


def _client_wants_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
    return bool(options and options.get("include_usage") is True)


def rate_limit_headers(windows: RateWindows, now: float) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-* headers: requests per minute, and tokens (per minute, else the
    tightest token budget)."""
    requests, tokens = windows
    headers = [] if requests is None else _window_headers("requests", requests, now)
    if tokens is not None:
        headers += _window_headers("tokens", tokens, now)
    return headers


_HEADER_NAMES = {
    kind: tuple(f"x-ratelimit-{part}-{kind}".encode() for part in ("limit", "remaining", "reset"))
    for kind in ("requests", "tokens")
}


def _window_headers(kind: str, window: WindowState, now: float) -> list[tuple[bytes, bytes]]:
    limit, remaining, reset = _HEADER_NAMES[kind]
    return [
        (limit, b"%d" % window.limit),
        (remaining, b"%d" % window.remaining),
        (reset, _duration(window.resets_at - now).encode()),
    ]


def _duration(seconds: float) -> str:
    """OpenAI's reset format: 20ms, 1s, 6m0s, 1h2m3s."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    total = int(seconds + 0.999)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


_MALFORMED = object()


def _json_of(content: bytes, content_type: str) -> tuple[Any, bool]:
    """A JSON answer's object (None for an answer that is not JSON; _MALFORMED if it is broken),
    and whether orjson read it."""
    if "json" not in content_type:
        return None, False
    try:
        obj, fast = jsonio.decode(content)
    except (ValueError, RecursionError):
        return _MALFORMED, False
    return (obj, fast) if isinstance(obj, dict) else (_MALFORMED, False)


def _settle_stream(settlement: Settlement, meter: StreamMeter, count: Callable[[str], int | None]) -> None:
    usage = meter.usage
    if usage is not None:
        settlement.prompt_tokens = _int(usage.get("prompt_tokens"))
        settlement.completion_tokens = _int(usage.get("completion_tokens"))
    elif meter.events:
        # No usage arrived (cut short, or a backend that never sends it): the streamed text,
        # counted with the model's tokenizer (else one token per event), marked an estimate.
        counted = count(meter.text())
        settlement.completion_tokens = counted if counted is not None else meter.events
        settlement.estimated = True


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
