"""Quota counters on Redis, shared by every gateway replica.

Check-and-reserve and settle are each one Lua script, so they are atomic across replicas: two
replicas can never both take the last tokens of a budget. Keys (``prefix`` defaults to "gw:"):

- ``{p}{key}:day:{YYYY-MM-DD}`` settled tokens of the UTC day, expiring a day after it ends;
- ``{p}{key}:month:{YYYY-MM}`` hash of settled tokens and spend, expiring after the month;
- ``{p}{key}:rpm`` / ``{p}{key}:tpm`` sorted sets of request starts and settled tokens in the
  sliding minute, trimmed on use and expiring a minute after the last write, and
  ``{p}{key}:tpm_sum`` the running sum of the tpm set (so no script scans the whole minute);
- ``{p}gone:{reservation}`` a short-lived tombstone of a reservation released after its reserve's
  answer was lost, which the reserve (if it arrives late) respects;
- ``{p}{key}:live`` hash of reserved tokens, spend and requests in flight, and of the bounds among
  them (``b`` how many, ``bt``/``bs`` their tokens and spend): requests forwarded on a bound
  while they are counted (see ``shrink``);
- ``{p}res:{instance}`` the reservations each replica holds (``"key tokens spend bound"``, what
  settling one releases), and ``{p}alive:{instance}`` its heartbeat. When a replica dies its
  heartbeat expires and any other replica releases its reservations: a crash leaks nothing for
  longer than ``replica_timeout``.

If Redis cannot be reached the operator's ``fail_open`` decides: refuse with a 503 (closed, the
default) or serve unchecked (open), counting ``gateway_quota_store_errors_total`` and logging.
Settlements that cannot be written are retried until Redis is back.

Redis (Lua) numbers are doubles: counts are exact up to 2**53.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from gateway.errors import QuotaStoreUnavailable
from gateway.limits import Limits
from gateway.quota import (
    Demand,
    RateWindows,
    Rejection,
    Reservation,
    WindowState,
    _day,
    _day_start,
    _month,
    _next_month_start,
    rate_windows_of,
    reject,
    window_states,
)

try:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    from gateway.resp import client_for
except ImportError as exc:  # pragma: no cover - depends on the install
    raise RuntimeError("Redis support needs redis-py: pip install 'llm-metering-gateway[redis]'") from exc

__all__ = ["RedisQuota"]

log = logging.getLogger("gateway.quota")

_NONE = -1  # "no limit" in the scripts' arguments
_KEEP = 86400  # counters outlive their period by a day (late settlements, /v1/limits)

# The sliding minute's settled tokens: a running sum beside the set, less what expires (each
# settlement is added and removed once: no script scans the whole minute per request).
_TRIM_TPM = """
local function trim_tpm(z, sum, horizon)
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', horizon)
  if #old > 0 then
    local gone = 0
    for i = 1, #old do gone = gone + tonumber(string.match(old[i], ':(%d+)$')) end
    redis.call('ZREMRANGEBYSCORE', z, '-inf', horizon)
    if redis.call('EXISTS', sum) == 1 then redis.call('DECRBY', sum, gone) end
  end
  return math.max(0, tonumber(redis.call('GET', sum) or 0))
end
"""

# What the rate-limit headers show, as a reservation left the windows (KEYS as the reserve's).
_RATE = """
local function rate(minute, reserved, day_used, month_tokens)
  local first = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
  local entries = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
  return {
    'ok', string.format('%d', redis.call('ZCARD', KEYS[4])), first[2] or '-1',
    string.format('%d', minute), entries[2] or '-1', string.format('%d', reserved),
    string.format('%d', day_used), string.format('%d', month_tokens),
  }
end
"""

# A reservation record ("key tokens spend bound"; records without the flag hold counts), and
# giving back what one holds to its key's live hash. Zero amounts are skipped: HINCRBY refuses
# "-0", and a script must not fail half-way (Redis keeps the writes before an error).
_RECORDS = """
local function parse(rec)
  local key, tokens, spend, bound = string.match(rec, '^(%d+) (%d+) (%d+) ?(%d?)$')
  return key, tonumber(tokens), tonumber(spend), bound == '1'
end
local function unhold(live, tokens, spend, bound)
  if tokens ~= 0 then redis.call('HINCRBY', live, 'tokens', -tokens) end
  if spend ~= 0 then redis.call('HINCRBY', live, 'spend', -spend) end
  redis.call('HINCRBY', live, 'n', -1)
  if bound then
    redis.call('HINCRBY', live, 'b', -1)
    if tokens ~= 0 then redis.call('HINCRBY', live, 'bt', -tokens) end
    if spend ~= 0 then redis.call('HINCRBY', live, 'bs', -spend) end
  end
end
"""

_RESERVE = (
    _TRIM_TPM
    + _RATE
    + """
local function d(x) return string.format('%d', x) end
local function f(x) return string.format('%.3f', x) end
local now = tonumber(ARGV[1])
local tokens, spend = tonumber(ARGV[2]), tonumber(ARGV[3])
local lim = {}
for i = 1, 6 do lim[i] = tonumber(ARGV[5 + i]) end
local day_reset, month_reset = tonumber(ARGV[12]), tonumber(ARGV[13])
if redis.call('EXISTS', KEYS[8]) == 1 then return {'released'} end
local horizon = now - 60
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', horizon)
local minute = trim_tpm(KEYS[5], KEYS[7], horizon)
local live = redis.call('HMGET', KEYS[3], 'tokens', 'spend', 'n', 'b', 'bt', 'bs')
local rtok, rsp, n = tonumber(live[1] or 0), tonumber(live[2] or 0), tonumber(live[3] or 0)
local bounds, btok, bsp = tonumber(live[4] or 0), tonumber(live[5] or 0), tonumber(live[6] or 0)
if lim[1] >= 0 and n + 1 > lim[1] then
  return {'max_concurrent', d(n), '0', '1', '1', '0'}
end
if lim[2] >= 0 then
  local count = redis.call('ZCARD', KEYS[4])
  if count + 1 > lim[2] then
    local first = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
    local wait = 60
    if first[2] then wait = tonumber(first[2]) + 60 - now end
    return {'rpm', d(count), '0', '1', f(wait), '0'}
  end
end
-- slack: what bounds hold of ``reserved``. A refusal reports the bounds held only if counts in
-- their place could admit the request (they hold at least nothing).
local function check(name, limit, used, reserved, wanted, wait, slack)
  if limit < 0 then return nil end
  if wanted > limit then return {name, d(used), d(reserved), d(wanted), '-1', '0'} end
  if used + reserved + wanted > limit then
    local held = 0
    if bounds > 0 and used + reserved - slack + wanted <= limit then held = bounds end
    return {name, d(used), d(reserved), d(wanted), f(wait(used)), d(held)}
  end
  return nil
end
if lim[3] >= 0 then
  local r = check('tpm', lim[3], minute, rtok, tokens, function(used)
    -- Only on refusal: walk the oldest settlements until enough of the minute has expired.
    local excess = used + rtok + tokens - lim[3]
    local start = 0
    while true do
      local chunk = redis.call('ZRANGE', KEYS[5], start, start + 63, 'WITHSCORES')
      if #chunk == 0 then return 60 end
      for i = 1, #chunk, 2 do
        excess = excess - tonumber(string.match(chunk[i], ':(%d+)$'))
        if excess <= 0 then return tonumber(chunk[i + 1]) + 60 - now end
      end
      start = start + 64
    end
  end, btok)
  if r then return r end
end
local day_used = tonumber(redis.call('GET', KEYS[1]) or 0)
local month = redis.call('HMGET', KEYS[2], 'tokens', 'spend')
local month_tokens, month_spend = tonumber(month[1] or 0), tonumber(month[2] or 0)
local function until_day() return day_reset - now end
local function until_month() return month_reset - now end
local r = check('tokens_per_day', lim[4], day_used, rtok, tokens, until_day, btok)
if r then return r end
r = check('tokens_per_month', lim[5], month_tokens, rtok, tokens, until_month, btok)
if r then return r end
r = check('spend_per_month', lim[6], month_spend, rsp, spend, until_month, bsp)
if r then return r end
if tokens ~= 0 then redis.call('HINCRBY', KEYS[3], 'tokens', tokens) end
if spend ~= 0 then redis.call('HINCRBY', KEYS[3], 'spend', spend) end
redis.call('HINCRBY', KEYS[3], 'n', 1)
if ARGV[14] == '1' then
  redis.call('HINCRBY', KEYS[3], 'b', 1)
  if tokens ~= 0 then redis.call('HINCRBY', KEYS[3], 'bt', tokens) end
  if spend ~= 0 then redis.call('HINCRBY', KEYS[3], 'bs', spend) end
end
redis.call('ZADD', KEYS[4], now, ARGV[4])
redis.call('PEXPIRE', KEYS[4], 61000)
redis.call('HSET', KEYS[6], ARGV[4], ARGV[5])
return rate(minute, rtok + tokens, day_used, month_tokens)
"""
)

# Releases what the record holds, whether or not a shrink (which may arrive on another
# connection, before or after) has replaced its bound by a count.
_SETTLE = (
    _RECORDS
    + """
local rec = redis.call('HGET', KEYS[5], ARGV[1])
if not rec then
  -- Not reserved (yet): a release after a failed reserve leaves a tombstone, so that a reserve
  -- still on its way cannot take what no one will ever settle.
  if ARGV[7] == '1' then redis.call('SET', KEYS[7], '1', 'EX', 600) end
  return 0
end
redis.call('HDEL', KEYS[5], ARGV[1])
local _, rtok, rsp, bound = parse(rec)
unhold(KEYS[3], rtok, rsp, bound)
local used, spend, now = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if used > 0 then
  redis.call('INCRBY', KEYS[1], used)
  redis.call('EXPIREAT', KEYS[1], ARGV[5])
  redis.call('HINCRBY', KEYS[2], 'tokens', used)
  redis.call('ZADD', KEYS[4], now, ARGV[1] .. ':' .. used)
  redis.call('INCRBY', KEYS[6], used)
  -- The set and its sum expire together: an expired minute is an empty one.
  redis.call('PEXPIRE', KEYS[4], 61000)
  redis.call('PEXPIRE', KEYS[6], 61000)
end
if spend > 0 then redis.call('HINCRBY', KEYS[2], 'spend', spend) end
if used > 0 or spend > 0 then redis.call('EXPIREAT', KEYS[2], ARGV[6]) end
return 1
"""
)

# A bound traded for a count (KEYS as the reserve's; ARGV: now, id, and the count's tokens and
# spend, each at most the bound's): the difference is free at once, and the reservation is a
# count from then on. A record already settled or already a count is left alone.
_SHRINK = (
    _TRIM_TPM
    + _RATE
    + _RECORDS
    + """
local rec = redis.call('HGET', KEYS[6], ARGV[2])
if not rec then return {'gone'} end
local key, rtok, rsp, bound = parse(rec)
if not bound then return {'gone'} end
local tokens, spend = tonumber(ARGV[3]), tonumber(ARGV[4])
if tokens ~= rtok then redis.call('HINCRBY', KEYS[3], 'tokens', tokens - rtok) end
if spend ~= rsp then redis.call('HINCRBY', KEYS[3], 'spend', spend - rsp) end
redis.call('HINCRBY', KEYS[3], 'b', -1)
if rtok ~= 0 then redis.call('HINCRBY', KEYS[3], 'bt', -rtok) end
if rsp ~= 0 then redis.call('HINCRBY', KEYS[3], 'bs', -rsp) end
local d = function(x) return string.format('%d', x) end
redis.call('HSET', KEYS[6], ARGV[2], key .. ' ' .. d(tokens) .. ' ' .. d(spend) .. ' 0')
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - 60)
local minute = trim_tpm(KEYS[5], KEYS[7], now - 60)
local month = redis.call('HMGET', KEYS[2], 'tokens')
return rate(
  minute, tonumber(redis.call('HGET', KEYS[3], 'tokens') or 0),
  tonumber(redis.call('GET', KEYS[1]) or 0), tonumber(month[1] or 0)
)
"""
)

_WINDOWS = (
    _TRIM_TPM
    + """
local function d(x) return string.format('%d', x) end
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - 60)
local minute = trim_tpm(KEYS[5], KEYS[7], now - 60)
local live = redis.call('HMGET', KEYS[3], 'tokens', 'spend', 'n')
local month = redis.call('HMGET', KEYS[2], 'tokens', 'spend')
local first = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
local entries = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
return {
  redis.call('GET', KEYS[1]) or '0', month[1] or '0', month[2] or '0',
  live[1] or '0', live[2] or '0', live[3] or '0',
  d(redis.call('ZCARD', KEYS[4])), first[2] or '-1',
  d(minute), entries[2] or '-1',
}
"""
)

# Releases the reservations of replicas whose heartbeat expired. ARGV[1]: the key prefix.
_SWEEP = (
    _RECORDS
    + """
local p = ARGV[1]
local released = 0
for _, inst in ipairs(redis.call('SMEMBERS', p .. 'instances')) do
  if redis.call('EXISTS', p .. 'alive:' .. inst) == 0 then
    local res = redis.call('HGETALL', p .. 'res:' .. inst)
    for i = 1, #res, 2 do
      local key, tokens, spend, bound = parse(res[i + 1])
      unhold(p .. key .. ':live', tokens, spend, bound)
      released = released + 1
    end
    redis.call('DEL', p .. 'res:' .. inst)
    redis.call('SREM', p .. 'instances', inst)
  end
end
return released
"""
)

# Seconds a quota call waits for one of the process's Redis connections to be free.
POOL_WAIT = 5.0

# (key_id, day tokens, month tokens, month spend) per key, from the ledger.
Totals = Callable[[float], Iterable[tuple[int, int, int, int]]]


class RedisQuota:
    def __init__(
        self,
        url: str,
        *,
        fail_open: bool = False,
        prefix: str = "gw:",
        instance: str | None = None,
        on_error: Callable[[str], None] | None = None,
        timeout: float = 0.5,
        replica_timeout: float = 30.0,
        max_connections: int = 64,
        pipelined: bool = True,
    ) -> None:
        """``pipelined=False`` keeps every call on redis-py's client (bench/redis_calls.py compares)."""
        self._alive_ttl = max(1, round(replica_timeout))
        self.url = url
        self.fail_open = fail_open
        self.prefix = prefix
        self.instance = instance or uuid.uuid4().hex[:16]
        self._on_error = on_error
        # A bounded pool that queues: concurrent requests share a few connections instead of
        # opening one each (redis-py's own pool opens up to 100, then refuses the next call with
        # "Too many connections", a 503 here). A call waits for a free connection up to
        # POOL_WAIT: under overload that queue is as long as the event loop's. Redis itself
        # still gets ``timeout`` per call.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=max(timeout, POOL_WAIT),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
            client_name=f"gateway-{self.instance}",  # which replica a connection is, in CLIENT LIST
        )
        self._redis = aioredis.Redis.from_pool(pool)
        # The scripts, on every request's path, go over one pipelined connection (resp.py):
        # redis-py's per-call cost was most of a request's quota cost. Other calls use the pool.
        name = f"gateway-{self.instance}"
        self._pipelined = client_for(url, timeout=timeout, client_name=name) if pipelined else None
        self._reserve = self._script(_RESERVE)
        self._settle = self._script(_SETTLE)
        self._shrink = self._script(_SHRINK)
        self._windows = self._script(_WINDOWS)
        self._sweep = self._script(_SWEEP)
        self._tasks: set[asyncio.Task[None]] = set()
        self._retry: list[tuple[Reservation, int, int, float, bool]] = []
        self._beat: asyncio.Task[None] | None = None
        self._totals: Totals | None = None

    # lifecycle
    async def start(self, totals: Totals | None = None) -> None:
        """Check Redis answers, rebuild lost counters from the ledger, start the heartbeat."""
        self._totals = totals
        try:
            await self._redis.ping()
            await self._heartbeat()
        except RedisError as exc:
            self._error("start", exc)
        self._beat = asyncio.create_task(self._beat_loop(), name="quota-heartbeat")

    async def aclose(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._flush_retries()
        with contextlib.suppress(RedisError):
            if not self._retry:
                # Nothing left to settle: forget this replica now rather than when it expires.
                await self._redis.delete(self._k("alive:" + self.instance))
                await self._redis.srem(self._k("instances"), self.instance)
        if self._pipelined is not None:
            await self._pipelined.aclose()
        await self._redis.aclose()

    # QuotaStore
    async def reserve(
        self, key_id: int, limits: Limits, demand: Demand, now: float, *, bound: bool = False
    ) -> Reservation | Rejection:
        day, month = _day(now), _month(now)
        reservation = Reservation(key_id, demand, day, month, now, id=uuid.uuid4().hex)
        args: list[str | int | float] = [
            now,
            demand.tokens,
            demand.spend,
            reservation.id,
            f"{key_id} {demand.tokens} {demand.spend} {int(bound)}",
            *(_arg(getattr(limits, name)) for name in _ORDER),
            _day_start(now) + 86400,
            _next_month_start(now),
            int(bound),
        ]
        try:
            result = await self._reserve(
                keys=[*self._keys(key_id, day, month), self._k("gone:" + reservation.id)], args=args
            )
        except RedisError as exc:
            self._error("reserve", exc)
            # The script may have run even though its answer was lost (a timeout): release it,
            # or the reservation would be held until this replica stops.
            self._queue(self._apply(reservation, 0, 0, now, release=True))
            if not self.fail_open:
                raise QuotaStoreUnavailable(
                    "Quotas cannot be checked right now (the quota store is unreachable); retry shortly."
                ) from None
            reservation.unchecked = True
            return reservation
        if result[0] == "ok":
            reservation.rate = _rate(limits, now, result)
            return reservation
        if result[0] == "released":  # a reservation id is never reused: cannot happen
            raise QuotaStoreUnavailable("Quota reservation was released before it was made; retry.")
        name, used, reserved, wanted, wait, held = result
        limit = getattr(limits, name)
        return reject(
            name,
            limit,
            int(used),
            int(reserved),
            int(wanted),
            None if wait == "-1" else float(wait),
            int(held),
        )

    async def shrink(self, reservation: Reservation, limits: Limits, demand: Demand, now: float) -> None:
        """Hold ``demand`` instead of the reservation's bound (its count, found after it was
        forwarded), and refresh its rate windows. A hold never grows. If Redis cannot be reached
        the bound stays held until the request settles: too much held for a while, never too little."""
        if reservation.released or reservation.unchecked:
            return
        held = reservation.demand
        tokens, spend = min(demand.tokens, held.tokens), min(demand.spend, held.spend)
        keys = self._keys(reservation.key_id, reservation.day, reservation.month)
        try:
            result = await self._shrink(keys=keys, args=[now, reservation.id, tokens, spend])
        except RedisError as exc:
            self._error("shrink", exc)
            return
        if result[0] == "ok":  # else settled meanwhile (the client went away): nothing to trade
            reservation.demand = Demand(tokens, spend)
            reservation.rate = _rate(limits, now, result)

    def settle(self, reservation: Reservation, tokens: int, spend: int, now: float) -> None:
        """Queue the settlement (never blocks, never raises); retried until Redis takes it."""
        if reservation.released:
            return
        reservation.released = True
        if reservation.unchecked:
            return
        self._queue(self._apply(reservation, tokens, spend, now))

    def _queue(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def windows(self, key_id: int, limits: Limits, now: float) -> list[WindowState]:
        day, month = _day(now), _month(now)
        try:
            raw = await self._windows(keys=self._keys(key_id, day, month), args=[now])
        except RedisError as exc:
            self._error("windows", exc)
            return []
        (day_used, month_tokens, month_spend, rtok, rsp, n, rpm_count, rpm_first, minute, tpm_first) = (
            float(x) for x in raw
        )
        return window_states(
            limits,
            now,
            requests=int(rpm_count),
            first_request=rpm_first if rpm_first >= 0 else None,
            minute_tokens=int(minute),
            first_tokens=tpm_first if tpm_first >= 0 else None,
            day_tokens=int(day_used),
            month_tokens=int(month_tokens),
            month_spend=int(month_spend),
            reserved_tokens=int(rtok),
            reserved_spend=int(rsp),
            in_flight=int(n),
        )

    async def outstanding_async(self) -> tuple[int, int]:
        """(in-flight requests, reserved tokens) over all keys, as Redis has them."""
        requests = tokens = 0
        async for name in self._redis.scan_iter(match=self._k("*:live")):
            live = await self._redis.hmget(name, "n", "tokens")
            requests += int(live[0] or 0)
            tokens += int(live[1] or 0)
        return requests, tokens

    # internals
    def _script(self, source: str) -> Callable[..., Awaitable[Any]]:
        """``await script(keys=..., args=...)``: on the pipelined client where it speaks the URL."""
        if self._pipelined is None:
            return self._redis.register_script(source)
        return functools.partial(self._pipelined.script, source)

    def _k(self, suffix: str) -> str:
        return self.prefix + suffix

    def _keys(self, key_id: int, day: str, month: str) -> list[str]:
        base = f"{self.prefix}{key_id}:"
        return [
            base + "day:" + day,
            base + "month:" + month,
            base + "live",
            base + "rpm",
            base + "tpm",
            self._k("res:" + self.instance),
            base + "tpm_sum",
        ]

    async def _apply(
        self, r: Reservation, tokens: int, spend: int, now: float, *, release: bool = False
    ) -> None:
        for attempt in range(3):
            try:
                await self._settle_once(r, tokens, spend, now, release)
                return
            except RedisError as exc:
                if attempt == 2:
                    self._error("release" if release else "settle", exc)
                    self._retry.append((r, tokens, spend, now, release))
                    return
                await asyncio.sleep(0.05 * (attempt + 1))

    async def _settle_once(
        self, r: Reservation, tokens: int, spend: int, now: float, release: bool = False
    ) -> None:
        keys = self._keys(r.key_id, r.day, r.month)
        del keys[3]  # no rpm set
        keys.append(self._k("gone:" + r.id))
        # Usage counts in the period the request started in (as the ledger and /v1/usage do).
        day_expiry = int(_day_start(r.started_at)) + 86400 + _KEEP
        month_expiry = int(_next_month_start(r.started_at)) + _KEEP
        # What is released is what the record holds (a shrink may be on its way): no amounts.
        await self._settle(keys=keys, args=[r.id, tokens, spend, now, day_expiry, month_expiry, int(release)])

    async def _flush_retries(self) -> None:
        pending, self._retry = self._retry, []
        for i, (r, tokens, spend, now, release) in enumerate(pending):
            try:
                await self._settle_once(r, tokens, spend, now, release)
            except RedisError:
                self._retry.extend(pending[i:])
                return

    async def _beat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._alive_ttl / 3)
            try:
                await self._heartbeat()
            except RedisError as exc:
                self._error("heartbeat", exc)

    async def _heartbeat(self) -> None:
        await self._redis.set(self._k("alive:" + self.instance), "1", ex=self._alive_ttl)
        await self._redis.sadd(self._k("instances"), self.instance)
        await self._flush_retries()
        released = await self._sweep(keys=[], args=[self.prefix])
        if released:
            log.warning("released %d reservation(s) of replicas that stopped answering", released)
        await self._rebuild_if_lost()

    async def _rebuild_if_lost(self) -> None:
        """After Redis lost its data (or on first use), one replica reloads the month from the ledger."""
        if self._totals is None:
            return
        now = time.time()
        month = _month(now)
        marker = self._k("loaded:" + month)
        if not await self._redis.set(marker, "1", nx=True, ex=int(_next_month_start(now) - now) + _KEEP):
            return
        rows = await asyncio.to_thread(lambda: list(self._totals(now)) if self._totals else [])
        day = _day(now)
        day_expiry = int(_day_start(now)) + 86400 + _KEEP
        month_expiry = int(_next_month_start(now)) + _KEEP
        async with self._redis.pipeline(transaction=True) as pipe:
            for key_id, day_tokens, month_tokens, month_spend in rows:
                base = f"{self.prefix}{key_id}:"
                pipe.set(base + "day:" + day, day_tokens)
                pipe.expireat(base + "day:" + day, day_expiry)
                pipe.hset(base + "month:" + month, mapping={"tokens": month_tokens, "spend": month_spend})
                pipe.expireat(base + "month:" + month, month_expiry)
            await pipe.execute()
        log.info("quota counters for %s loaded from the ledger (%d keys)", month, len(rows))

    def _error(self, op: str, exc: BaseException) -> None:
        log.error(
            "quota store (Redis) %s failed: %s%s",
            op,
            exc,
            " - serving unchecked (fail_open)" if self.fail_open and op == "reserve" else "",
        )
        if self._on_error is not None:
            self._on_error(op)


_ORDER = ("max_concurrent", "rpm", "tpm", "tokens_per_day", "tokens_per_month", "spend_per_month")


def _arg(value: Any) -> int:
    return _NONE if value is None else int(value)


def _rate(limits: Limits, now: float, result: list[str]) -> RateWindows:
    """The rate windows of a script's ``{'ok', ...}`` answer (see ``_RATE``)."""
    requests, first_request, minute, first_tokens, reserved, day_used, month_tokens = (
        float(x) for x in result[1:]
    )
    return rate_windows_of(
        limits,
        now,
        requests=int(requests),
        first_request=first_request if first_request >= 0 else None,
        minute_tokens=int(minute),
        first_tokens=first_tokens if first_tokens >= 0 else None,
        day_tokens=int(day_used),
        month_tokens=int(month_tokens),
        reserved_tokens=int(reserved),
    )
