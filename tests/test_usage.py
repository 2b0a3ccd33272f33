"""Customer usage: OpenAI's bucket shape, sums equal to the ledger, only one's own key."""

from __future__ import annotations

import asyncio
import calendar
import csv
import io
import random
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.db import open_db
from gateway.keys import KeyStore, load_key_secret
from gateway.ledger import Ledger, PendingRow, Settlement
from gateway.settings import Settings
from gateway.usage import Query
from tests.conftest import ENGINES, settled_rows


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return str(request.param)


DAY0 = calendar.timegm((2026, 11, 1, 0, 0, 0))
MODELS = ["mistralai/Mistral-7B-Instruct-v0.3", "gpt-4"]


def _fill(settings: Settings, keys: list[int], n: int, seed: int = 1) -> None:
    """n settled requests spread over 10 days, written through the real ledger (rollups included)."""
    rng = random.Random(seed)

    async def run() -> None:
        ledger = Ledger(settings.db)
        ledger.start()
        for i in range(n):
            key = rng.choice(keys)
            at = DAY0 + rng.random() * 10 * 86400
            row = PendingRow(f"req_{seed}_{i}", key, rng.choice(MODELS), "/chat/completions", False, at)
            await ledger.pending(row)
            served = rng.random() > 0.1
            ledger.settle(
                Settlement(
                    row.id,
                    200 if served else 503,
                    prompt_tokens=rng.randint(1, 500) if served else None,
                    completion_tokens=rng.randint(0, 300) if served else None,
                    tool_tokens=rng.randint(0, 100) if served else None,
                    cost_micros=rng.randint(0, 10**6) if served else None,
                )
            )
        await ledger.close()

    asyncio.run(run())


@pytest.fixture
def setup(make_settings: Callable[..., Settings]) -> tuple[Settings, dict[str, str], dict[str, int]]:
    settings = make_settings()
    store = KeyStore(open_db(settings.db), load_key_secret(settings))
    secrets, ids = {}, {}
    for name in ("acme", "globex"):
        info, secret = store.create(name)
        secrets[name], ids[name] = secret, info.id
    _fill(settings, list(ids.values()), 400)
    return settings, secrets, ids


def _get(settings: Settings, key: str, path: str, **params: Any) -> httpx.Response:
    app = create_app(settings, transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    with TestClient(app) as client:
        return client.get(path, params=params, headers={"Authorization": f"Bearer {key}"})


def _ledger_sums(db_path: str, key_id: int, lo: int, hi: int) -> tuple[int, int, int, int, int]:
    rows = [
        r
        for r in settled_rows(db_path)
        if r["key_id"] == key_id and lo <= r["started_at"] < hi and r["prompt_tokens"] is not None
    ]
    return (
        len(rows),
        sum(r["prompt_tokens"] for r in rows),
        sum(r["tool_tokens"] for r in rows),
        sum(r["completion_tokens"] for r in rows),
        sum(r["cost_micros"] for r in rows),
    )


def _page_sums(page: dict[str, Any]) -> tuple[int, int, int, int, int]:
    results = [r for b in page["data"] for r in b["results"]]
    return (
        sum(r["num_model_requests"] for r in results),
        sum(r["input_tokens"] for r in results),
        sum(r["tool_tokens"] for r in results),
        sum(r["output_tokens"] for r in results),
        sum(r["cost"]["value_micros"] for r in results),
    )


@pytest.mark.parametrize(("width", "limit"), [("1d", 10), ("1h", 168), ("1m", 1440)])
def test_bucket_sums_equal_the_ledger(setup: Any, width: str, limit: int) -> None:
    settings, secrets, ids = setup
    lo, hi = DAY0 + 86400, DAY0 + 86400 + {"1d": 10 * 86400, "1h": 168 * 3600, "1m": 1440 * 60}[width]
    page = _get(
        settings,
        secrets["acme"],
        "/v1/usage",
        start_time=lo,
        end_time=hi,
        bucket_width=width,
        limit=limit,
        group_by="model",
    ).json()
    assert page["object"] == "page" and page["has_more"] is False
    assert all(
        b["object"] == "bucket"
        and b["end_time"] - b["start_time"] == {"1d": 86400, "1h": 3600, "1m": 60}[width]
        for b in page["data"]
    )
    assert _page_sums(page) == _ledger_sums(settings.db, ids["acme"], lo, hi)
    models = {r["model"] for b in page["data"] for r in b["results"]}
    assert models <= set(MODELS)


def test_pages_follow_next_page_and_cover_everything_once(setup: Any) -> None:
    settings, secrets, ids = setup
    lo, hi = DAY0, DAY0 + 10 * 86400
    seen, params = [], {"start_time": lo, "end_time": hi, "limit": 3}
    while True:
        page = _get(settings, secrets["acme"], "/v1/usage", **params).json()
        seen += page["data"]
        if not page["has_more"]:
            break
        params["page"] = page["next_page"]
    assert [b["start_time"] for b in seen] == list(range(lo, hi, 86400))
    assert _page_sums({"data": seen}) == _ledger_sums(settings.db, ids["acme"], lo, hi)


def test_a_customer_never_sees_another_keys_data_and_anonymous_gets_401(setup: Any) -> None:
    settings, secrets, ids = setup
    lo, hi = DAY0, DAY0 + 10 * 86400
    acme = _page_sums(
        _get(settings, secrets["acme"], "/v1/usage", start_time=lo, end_time=hi, limit=10).json()
    )
    globex = _page_sums(
        _get(settings, secrets["globex"], "/v1/usage", start_time=lo, end_time=hi, limit=10).json()
    )
    assert acme == _ledger_sums(settings.db, ids["acme"], lo, hi) != globex
    lines = _get(settings, secrets["globex"], "/v1/usage/requests", limit=1000).json()["data"]
    assert lines and all(
        line["id"] in {r["id"] for r in settled_rows(settings.db) if r["key_id"] == ids["globex"]}
        for line in lines
    )
    assert _get(settings, "", "/v1/usage").status_code == 401


def test_request_lines_newest_first_paged(setup: Any) -> None:
    settings, secrets, ids = setup
    collected, params = [], {"limit": 50}
    while True:
        page = _get(settings, secrets["acme"], "/v1/openai/usage/requests", **params).json()
        collected += page["data"]
        if not page["has_more"]:
            break
        params["after"] = page["last_id"]
    mine = [r for r in settled_rows(settings.db) if r["key_id"] == ids["acme"]]
    assert len(collected) == len(mine) and len({c["id"] for c in collected}) == len(mine)
    times = [c["created"] for c in collected]
    assert times == sorted(times, reverse=True)
    assert set(collected[0]) >= {
        "id",
        "created",
        "model",
        "status",
        "input_tokens",
        "tool_tokens",
        "output_tokens",
        "cost",
        "estimated",
    }


def test_csv(setup: Any) -> None:
    settings, secrets, ids = setup
    resp = _get(
        settings,
        secrets["acme"],
        "/v1/usage",
        start_time=DAY0,
        end_time=DAY0 + 10 * 86400,
        limit=10,
        format="csv",
        group_by="model",
    )
    assert resp.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(resp.text)))
    assert (
        sum(int(r["input_tokens"]) for r in rows)
        == _ledger_sums(settings.db, ids["acme"], DAY0, DAY0 + 10 * 86400)[1]
    )


@pytest.mark.parametrize(
    "params",
    [
        {"bucket_width": "2d"},
        {"start_time": 100, "end_time": 50},
        {"start_time": "yesterday"},
        {"limit": 0},
        {"limit": 10**9},
        {"group_by": "key"},
        {"page": 12345},
        {"format": "xml"},
        {"start_time": -5},
        {"end_time": 10**30},
    ],
)
def test_bad_parameters_are_400(setup: Any, params: dict[str, Any]) -> None:
    settings, secrets, _ = setup
    resp = _get(settings, secrets["acme"], "/v1/usage", **params)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_rollup_matches_raw_rows(setup: Any) -> None:
    settings, _, _ = setup
    db = open_db(settings.db)
    rolled = db.execute(
        "SELECT sum(requests), sum(input_tokens), sum(cost_micros) FROM usage_daily"
    ).fetchone()
    raw = db.execute(
        "SELECT count(*), sum(prompt_tokens), sum(cost_micros) FROM requests WHERE prompt_tokens IS NOT NULL"
    ).fetchone()
    assert tuple(rolled) == tuple(raw)


@pytest.mark.parametrize("hour", [0, 13.5, 23.99])
def test_the_default_window_is_the_last_seven_days_with_today_on_the_first_page(hour: float) -> None:
    """Without start_time, a customer's first page of daily buckets ends with today."""
    midnight = calendar.timegm((2026, 11, 24, 0, 0, 0))
    now = midnight + hour * 3600
    q = Query.parse({}, now=now)
    starts = list(range(q.start_time, q.end_time, 86400))
    assert len(starts) == q.limit == 7
    if hour:
        assert starts[-1] == midnight  # today, on the first page
    else:
        assert starts[-1] == midnight - 86400  # end_time is exclusive: at midnight, yesterday
    # An explicit end_time at a midnight covers the 7 days before it.
    explicit = Query.parse({"end_time": str(midnight)}, now=now + 86400 * 3)
    assert explicit.start_time == midnight - 7 * 86400
