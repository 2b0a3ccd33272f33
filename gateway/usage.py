"""Usage out of the ledger, in the bucket shape of OpenAI's organization usage API.

Daily buckets read the ``usage_daily`` rollup; minute and hour buckets read the ledger rows
(a bounded range of an indexed column). A billed request is a ledger row with usage; sums
equal the ledger exactly (tokens, and cost in integer micro-units).

>>> Query.parse({"bucket_width": "1h"}, now=7200.0).bucket_width
'1h'
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from gateway.db import Database
from gateway.errors import InvalidRequest

__all__ = ["Query", "buckets", "request_lines", "to_csv"]

WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
DEFAULT_LIMIT = {"1m": 60, "1h": 24, "1d": 7}
MAX_LIMIT = {"1m": 1440, "1h": 168, "1d": 31}
WEEK = 7 * 86400
GROUPS = ("model", "key")
BILLED = "(prompt_tokens IS NOT NULL OR completion_tokens IS NOT NULL)"


@dataclass(frozen=True)
class Query:
    start_time: int
    end_time: int
    bucket_width: str
    group_by: tuple[str, ...]
    limit: int
    page: int | None

    @classmethod
    def parse(cls, params: Mapping[str, str], *, now: float, allow_key_group: bool = False) -> Query:
        width = params.get("bucket_width", "1d")
        if width not in WIDTHS:
            raise InvalidRequest("bucket_width must be one of 1m, 1h, 1d.", param="bucket_width")
        end = _int_param(params, "end_time", int(now))
        # By default the last 7 UTC days, today included: the first page (7 daily buckets by
        # default) ends with the current day instead of leaving it to a second page.
        start = _int_param(params, "start_time", _align(end - 1, "1d") - WEEK + 86400)
        if start < 0 or end <= start:
            raise InvalidRequest(
                "start_time must be before end_time (unix seconds, not negative).", param="start_time"
            )
        if end - start > 366 * 86400 * 5:
            raise InvalidRequest("The time range is longer than 5 years.", param="end_time")
        groups = tuple(g for g in params.get("group_by", "").split(",") if g)
        allowed = GROUPS if allow_key_group else ("model",)
        for group in groups:
            if group not in allowed:
                raise InvalidRequest(f"group_by accepts {', '.join(allowed)}.", param="group_by")
        limit = _int_param(params, "limit", DEFAULT_LIMIT[width])
        if not 1 <= limit <= MAX_LIMIT[width]:
            raise InvalidRequest(
                f"limit must be between 1 and {MAX_LIMIT[width]} for bucket_width {width}.", param="limit"
            )
        page = _int_param(params, "page", None) if "page" in params else None
        return cls(start, end, width, groups, limit, page)


def _int_param(params: Mapping[str, str], name: str, default: int | None) -> Any:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer.", param=name) from None
    if not -(2**62) < value < 2**62:
        raise InvalidRequest(f"{name} is out of range.", param=name)
    return value


def _align(ts: int, width: str) -> int:
    return ts - ts % WIDTHS[width]


def _day(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


def buckets(db: Database, key_id: int | None, q: Query, *, currency: str) -> dict[str, Any]:
    """One page of buckets; ``key_id`` None means every key (the admin's view)."""
    width = WIDTHS[q.bucket_width]
    first = _align(q.start_time, q.bucket_width)
    if q.page is not None:
        if q.page < first or q.page >= q.end_time or (q.page - first) % width:
            raise InvalidRequest("page is not a cursor from this query's next_page.", param="page")
        first = q.page
    starts = list(range(first, q.end_time, width))
    page, rest = starts[: q.limit], starts[q.limit :]
    if not page:
        return {"object": "page", "data": [], "has_more": False, "next_page": None}
    rows = _rows(db, key_id, q, page[0], page[-1] + width)
    grouped: dict[int, list[dict[str, Any]]] = {s: [] for s in page}
    for row in rows:
        start = row["bucket"]
        if start not in grouped:
            continue
        result: dict[str, Any] = {
            "object": "organization.usage.completions.result",
            "input_tokens": row["input_tokens"],
            "tool_tokens": row["tool_tokens"],
            "output_tokens": row["output_tokens"],
            "num_model_requests": row["requests"],
            "model": row.get("model") if "model" in q.group_by else None,
            "cost": {
                "value": float(Decimal(row["cost_micros"]) / 1_000_000),
                "value_micros": row["cost_micros"],
                "currency": currency.lower(),
            },
        }
        if "key" in q.group_by:
            result["key_id"] = row["key_id"]
            result["key_name"] = row["key_name"]
        grouped[start].append(result)
    data = [{"object": "bucket", "start_time": s, "end_time": s + width, "results": grouped[s]} for s in page]
    return {
        "object": "page",
        "data": data,
        "has_more": bool(rest),
        "next_page": str(rest[0]) if rest else None,
    }


def _rows(db: Database, key_id: int | None, q: Query, lo: int, hi: int) -> list[dict[str, Any]]:
    by_model = "model" in q.group_by
    by_key = "key" in q.group_by
    where_key = "" if key_id is None else " AND u.key_id = :key_id"
    params: dict[str, Any] = {"key_id": key_id, "lo": lo, "hi": hi, "width": WIDTHS[q.bucket_width]}
    if q.bucket_width == "1d":
        params.update(lo_day=_day(lo), hi_day=_day(hi))
        bucket = db.dialect.day_start.format("u.day")
        model = "nullif(u.model, '')"
        source = "usage_daily u"
        where = "u.day >= :lo_day AND u.day < :hi_day"
        sums = (
            "sum(u.requests)",
            "sum(u.input_tokens)",
            "sum(u.tool_tokens)",
            "sum(u.output_tokens)",
            "sum(u.cost_micros)",
        )
    else:
        bucket = ":lo + " + db.dialect.floor.format("(u.started_at - :lo) / :width") + " * :width"
        model = "u.model"
        source = "requests u"
        where = f"u.started_at >= :lo AND u.started_at < :hi AND {BILLED} AND u.state != 'pending'"
        sums = (
            "count(*)",
            "sum(coalesce(u.prompt_tokens, 0))",
            "sum(coalesce(u.tool_tokens, 0))",
            "sum(coalesce(u.completion_tokens, 0))",
            "sum(coalesce(u.cost_micros, 0))",
        )
    columns = [f"{bucket} AS bucket"]
    group = ["bucket"]
    if by_model:
        columns.append(f"{model} AS model")
        group.append("model")
    if by_key:
        columns += ["u.key_id AS key_id", "(SELECT name FROM keys k WHERE k.id = u.key_id) AS key_name"]
        group.append("u.key_id")
    columns += [
        # Sums are cast back to integers: PostgreSQL widens sum(bigint) to numeric.
        f"CAST({sums[0]} AS BIGINT) AS requests",
        f"CAST({sums[1]} AS BIGINT) AS input_tokens",
        f"CAST({sums[2]} AS BIGINT) AS tool_tokens",
        f"CAST({sums[3]} AS BIGINT) AS output_tokens",
        f"CAST({sums[4]} AS BIGINT) AS cost_micros",
    ]
    sql = (
        f"SELECT {', '.join(columns)} FROM {source} WHERE {where}{where_key} "
        f"GROUP BY {', '.join(group)} ORDER BY {', '.join(group)}"
    )
    return list(db.query(sql, params))


def request_lines(
    db: Database, key_id: int, *, limit: int, before: str | None, currency: str
) -> dict[str, Any]:
    """The key's requests, newest first; ``before`` is the last id of the previous page."""
    params: list[Any] = [key_id]
    cursor = ""
    if before:
        row = db.execute(
            "SELECT started_at FROM requests WHERE id = ? AND key_id = ?", [before, key_id]
        ).fetchone()
        if row is None:
            raise InvalidRequest("after is not a request id of yours.", param="after")
        cursor = " AND (started_at < ? OR (started_at = ? AND id < ?))"
        params += [row[0], row[0], before]
    rows = db.execute(
        "SELECT id, started_at, model, route, status, state, prompt_tokens, tool_tokens, completion_tokens, "
        f"cost_micros, estimated, stream FROM requests WHERE key_id = ?{cursor} "
        "ORDER BY started_at DESC, id DESC LIMIT ?",
        [*params, limit + 1],
    ).fetchall()
    data = [
        {
            "object": "usage.request",
            "id": r[0],
            "created": int(r[1]),
            "model": r[2],
            "route": r[3],
            "status": r[4],
            "state": r[5],
            "input_tokens": r[6],
            "tool_tokens": r[7],
            "output_tokens": r[8],
            "cost": None
            if r[9] is None
            else {
                "value": float(Decimal(r[9]) / 1_000_000),
                "value_micros": r[9],
                "currency": currency.lower(),
            },
            "estimated": bool(r[10]),
            "stream": bool(r[11]),
        }
        for r in rows[:limit]
    ]
    more = len(rows) > limit
    return {
        "object": "list",
        "data": data,
        "has_more": more,
        "last_id": data[-1]["id"] if data and more else None,
    }


CSV_COLUMNS = (
    "start_time",
    "end_time",
    "model",
    "key",
    "input_tokens",
    "tool_tokens",
    "output_tokens",
    "num_model_requests",
    "cost",
    "currency",
)


def to_csv(page: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for bucket in page["data"]:
        for r in bucket["results"]:
            cost = Decimal(r["cost"]["value_micros"]) / 1_000_000
            writer.writerow(
                [
                    bucket["start_time"],
                    bucket["end_time"],
                    r["model"] or "",
                    r.get("key_name") or "",
                    r["input_tokens"],
                    r["tool_tokens"],
                    r["output_tokens"],
                    r["num_model_requests"],
                    f"{cost:f}",
                    r["cost"]["currency"],
                ]
            )
    return out.getvalue()
