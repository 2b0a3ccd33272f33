"""Two gateway processes sharing one PostgreSQL ledger and one Redis, as operators deploy them.

Real servers on loopback (Debian's postgresql and redis-server, started by the test session),
real ``gateway serve`` processes, the official ``openai`` client, and a real Prometheus.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.db import open_db
from gateway.keys import KeyStore, load_key_secret
from gateway.prices import Price, PriceBook
from gateway.settings import Settings
from tests.conftest import SEED_MESSAGES, ledger_rows, settled_rows
from tests.observability import GRAFANA, prometheus
from tests.servers import EmulatorProcess, GatewayProcess
from tests.stores import PostgresServer, RedisServer

pytestmark = pytest.mark.e2e
REQUEST_ID = "x-gateway-request-id"
V3 = "mistralai/Mistral-7B-Instruct-v0.3"  # the seed message counts 11 prompt tokens
DEMAND = 11 + 5  # prompt + max_tokens
REPLICA_TIMEOUT = 3


@pytest.fixture(scope="module")
def backend() -> Iterator[EmulatorProcess]:
    with EmulatorProcess("--latency", "0.3") as server:
        yield server


class Cluster:
    def __init__(self, db: str, redis_url: str, prefix: str, backend: EmulatorProcess) -> None:
        self.db, self.redis_url, self.prefix = db, redis_url, prefix
        self.settings = Settings(db=db)
        self.store = KeyStore(open_db(db), load_key_secret(self.settings))
        self.env = {
            "GATEWAY_REDIS_URL": redis_url,
            "GATEWAY_REDIS_PREFIX": prefix,
            "GATEWAY_REPLICA_TIMEOUT": str(REPLICA_TIMEOUT),
            "GATEWAY_UPSTREAM_URL": backend.url + "/v1/openai",
        }
        self.replicas: list[GatewayProcess] = []

    def start(self, n: int = 2, **env: str) -> list[GatewayProcess]:
        for _ in range(n):
            self.replicas.append(GatewayProcess("--db", self.db, env={**self.env, **env}).start())
        return self.replicas

    def stop(self) -> None:
        for replica in self.replicas:
            if replica.proc is not None and replica.proc.poll() is None:
                replica.stop()


@pytest.fixture
def cluster(
    postgres_server: PostgresServer, redis_server: RedisServer, backend: EmulatorProcess, request: Any
) -> Iterator[Cluster]:
    c = Cluster(postgres_server.create_database(), redis_server.url, f"t{id(request)}:", backend)
    try:
        yield c
    finally:
        c.stop()


async def _fire(urls: list[str], key: str, n: int, **kw: Any) -> list[Any]:
    """n chat requests spread over the replicas, all at once: (ledger id, completion) or the error."""
    clients = [openai.AsyncOpenAI(base_url=u + "/v1", api_key=key, max_retries=0, timeout=30) for u in urls]

    async def one(i: int) -> Any:
        try:
            raw = await clients[i % len(clients)].chat.completions.with_raw_response.create(
                model=V3, messages=SEED_MESSAGES, max_tokens=5, **kw
            )
            return raw.headers[REQUEST_ID], raw.parse()
        except openai.APIStatusError as exc:
            return exc

    return await asyncio.gather(*(one(i) for i in range(n)))


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_budget_holds_across_replicas_and_every_row_lands_once(cluster: Cluster) -> None:
    _, key = cluster.store.create("acme", limits={"tokens_per_day": 15 * DEMAND})
    PriceBook(open_db(cluster.db)).set("*", Price(200_000, 100_000, 800_000), effective_from=0)
    a, b = cluster.start(2)
    results = asyncio.run(_fire([a.url, b.url], key, 60))
    served = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(served) == 15 and len(refused) == 45, [type(r) for r in results]
    assert refused[0].body["param"] == "tokens_per_day"

    rows = settled_rows(cluster.db)
    assert len(rows) == 15 and len({r["id"] for r in rows}) == 15  # none lost, none doubled
    assert {r["state"] for r in rows} == {"settled"}
    assert {r["id"] for r in rows} == {request_id for request_id, _ in served}
    used = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
    assert used <= 15 * DEMAND

    # /v1/usage and /v1/limits are the same whichever replica answers.
    today = {"start_time": int(time.time()) // 86400 * 86400}
    usage = [httpx.get(g.url + "/v1/usage", params=today, headers=_auth(key)).json() for g in (a, b)]
    assert usage[0] == usage[1]
    (bucket,) = [bk for bk in usage[0]["data"] if bk["results"]]
    (result,) = bucket["results"]
    assert result["num_model_requests"] == 15
    assert result["input_tokens"] + result["output_tokens"] == used
    assert result["cost"]["value_micros"] == sum(r["cost_micros"] for r in rows)
    limits = [httpx.get(g.url + "/v1/limits", headers=_auth(key)).json()["limits"] for g in (a, b)]
    assert limits[0] == limits[1]
    (day,) = [w for w in limits[0] if w["name"] == "tokens_per_day"]
    assert (day["used"], day["reserved"]) == (used, 0)


def test_rate_and_concurrency_limits_hold_across_replicas(cluster: Cluster) -> None:
    _, rpm_key = cluster.store.create("rpm", limits={"rpm": 10})
    _, conc_key = cluster.store.create("conc", limits={"max_concurrent": 3})
    a, b = cluster.start(2)
    by_rpm = asyncio.run(_fire([a.url, b.url], rpm_key, 30))
    assert sum(not isinstance(r, Exception) for r in by_rpm) == 10
    by_conc = asyncio.run(_fire([a.url, b.url], conc_key, 12))
    # 12 at once, each held 0.3 s by the backend: only 3 can be in flight together.
    served = sum(not isinstance(r, Exception) for r in by_conc)
    assert 3 <= served < 12
    refused = [r for r in by_conc if isinstance(r, Exception)]
    assert all(r.status_code == 429 and r.body["param"] == "max_concurrent" for r in refused)


def test_a_killed_replica_is_recovered_by_the_survivor(cluster: Cluster) -> None:
    _, key = cluster.store.create("acme", limits={"tokens_per_day": 100 * DEMAND, "max_concurrent": 20})
    with EmulatorProcess("--latency", "5") as slow:  # holds the five long enough to kill their replica
        a, b = cluster.start(2, GATEWAY_UPSTREAM_URL=slow.url + "/v1/openai")

        async def fire_and_kill() -> None:
            task = asyncio.ensure_future(_fire([a.url], key, 5))
            deadline = time.monotonic() + 15
            # Pending rows are on disk before forwarding: kill once all five are at the backend.
            while sum(r["state"] == "pending" for r in ledger_rows(cluster.db)) < 5:
                assert time.monotonic() < deadline, ledger_rows(cluster.db)
                await asyncio.sleep(0.05)
            a.kill()
            await asyncio.gather(task, return_exceptions=True)

        asyncio.run(fire_and_kill())
        pending = [r for r in ledger_rows(cluster.db) if r["state"] == "pending"]
        assert len(pending) == 5  # on disk before forwarding; their replica is gone
    deadline = time.monotonic() + 4 * REPLICA_TIMEOUT
    while time.monotonic() < deadline:
        rows = ledger_rows(cluster.db)
        windows = httpx.get(b.url + "/v1/limits", headers=_auth(key)).json()["limits"]
        reserved = {w["name"]: w for w in windows}
        if {r["state"] for r in rows} == {"recovered"} and reserved["max_concurrent"]["used"] == 0:
            break
        time.sleep(0.5)
    assert {r["state"] for r in rows} == {"recovered"} and all(r["estimated"] for r in rows)
    assert reserved["tokens_per_day"]["reserved"] == 0 and reserved["max_concurrent"]["used"] == 0
    today = {"start_time": int(time.time()) // 86400 * 86400}
    usage = httpx.get(b.url + "/v1/usage", params=today, headers=_auth(key)).json()
    assert sum(r["num_model_requests"] for bk in usage["data"] for r in bk["results"]) == 5
    assert "silent replica" in b.stop()


def test_redis_down_fails_closed_or_open_as_configured(cluster: Cluster, redis_server: RedisServer) -> None:
    _, key = cluster.store.create("acme", limits={"rpm": 100})
    closed = GatewayProcess(
        "--db", cluster.db, env={**cluster.env, "GATEWAY_REDIS_URL": "redis://127.0.0.1:1/0"}
    ).start()
    opened = GatewayProcess(
        "--db",
        cluster.db,
        env={**cluster.env, "GATEWAY_REDIS_URL": "redis://127.0.0.1:1/0", "GATEWAY_QUOTA_FAIL_OPEN": "true"},
    ).start()
    cluster.replicas += [closed, opened]
    body = {"model": V3, "messages": SEED_MESSAGES, "max_tokens": 5}
    refused = httpx.post(closed.url + "/v1/chat/completions", json=body, headers=_auth(key), timeout=30)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "quota_store_unavailable"
    served = httpx.post(opened.url + "/v1/chat/completions", json=body, headers=_auth(key), timeout=30)
    assert served.status_code == 200
    metrics = httpx.get(opened.url + "/metrics").text
    assert re.search(r'^gateway_quota_store_errors_total\{op="reserve"\} 1\.0$', metrics, re.M)
    assert "serving unchecked (fail_open)" in opened.stop()
    # The refused request never reached the backend, so only the served one is in the ledger.
    assert len(ledger_rows(cluster.db)) == 1


def _prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail(
            "prometheus is not installed: Debian's prometheus package (bash scripts/test installs it)"
        )
    return path


def test_dashboards_sum_across_replicas(cluster: Cluster, tmp_path: Path) -> None:
    """Prometheus scrapes both replicas; every panel aggregates them into one series per group."""
    _, key = cluster.store.create("acme")
    a, b = cluster.start(2)
    with prometheus(tmp_path, _prometheus_bin(), [a.url, b.url]) as url:
        results = asyncio.run(_fire([a.url, b.url], key, 10))
        assert all(not isinstance(r, Exception) for r in results)
        per_replica = [
            sum(
                float(v)
                for v in re.findall(
                    r'^gateway_requests_total\{[^}]*status_class="2xx"[^}]*\} (\S+)$', text, re.M
                )
            )
            for text in (httpx.get(g.url + "/metrics").text for g in (a, b))
        ]
        assert per_replica == [5.0, 5.0]

        def query(expr: str) -> list[Any]:
            data = httpx.get(url + "/api/v1/query", params={"query": expr}).json()
            assert data["status"] == "success", data
            return list(data["data"]["result"])

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            total = query('sum(gateway_requests_total{status_class="2xx"})')
            if total and float(total[0]["value"][1]) == 10.0 and len(query("up == 1")) == 2:
                break
            time.sleep(0.5)
        assert float(total[0]["value"][1]) == 10.0  # one number for the fleet, nothing counted twice
        for path in sorted((GRAFANA / "dashboards").glob("*.json")):
            for panel in json.loads(path.read_text())["panels"]:
                for target in panel["targets"]:
                    for series in query(target["expr"]):
                        labels = set(series["metric"])
                        assert not labels & {"instance", "job"}, (path.name, panel["title"], labels)
