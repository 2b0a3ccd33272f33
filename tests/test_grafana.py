"""Dashboards and alerts against a real Prometheus scraping a real gateway under traffic.

Every PromQL expression of every shipped dashboard and alert rule is evaluated and must return
data; a dashboard that queries a metric the gateway does not export fails. The rules pass
`promtool check rules` and their unit tests; the exposition passes `promtool check metrics`; the
dashboard JSON is checked against Grafana's own schema types (@grafana/schema, tsc --strict).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.observability import GRAFANA, observed_gateway

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: Debian's prometheus package provides it "
            "(bash scripts/test installs it)"
        )
    return path


def dashboard_exprs() -> list[tuple[str, str]]:
    found = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                found.append((f"{path.name}: {panel['title']}", target["expr"]))
    return found


def rule_exprs() -> list[tuple[str, str]]:
    """Each alert's expression, and the quantity it compares: that part must have data.

    Whether the comparison fires is what `promtool test rules` checks; seconds of test traffic
    cannot make a five-minute rate cross an operator's threshold.
    """
    rules = yaml.safe_load((GRAFANA / "alerts.yml").read_text())
    found = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            lhs = re.sub(r"\s*(>|<|>=|<=|==|!=)\s*[\d.e+-]+\s*$", "", rule["expr"])
            found.append((f"{rule['alert']} (quantity)", lhs))
            found.append((f"{rule['alert']} (rule, evaluated)", "@rule@" + rule["expr"]))
    return found


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(Prometheus URL, the gateway's /metrics text) after ~12 s of varied traffic, scraped each second."""
    with observed_gateway(tmp_path_factory.mktemp("prom"), _tool("prometheus"), seconds=12) as (
        url,
        _,
        metrics,
    ):
        yield url, metrics


def _query(url: str, expr: str) -> list[Any]:
    resp = httpx.get(url + "/api/v1/query", params={"query": expr}).json()
    assert resp["status"] == "success", (expr, resp)
    return list(resp["data"]["result"])


@pytest.mark.parametrize(("where", "expr"), dashboard_exprs() + rule_exprs())
def test_every_expression_returns_data(scraped: tuple[str, str], where: str, expr: str) -> None:
    url, exposition = scraped
    if expr.startswith("@rule@"):
        _query(url, expr.removeprefix("@rule@"))  # valid PromQL that Prometheus evaluates
        return
    exported = set(re.findall(r"^(gateway_\w+?)(?:_bucket|_sum|_count|_created)?(?:\{| )", exposition, re.M))
    for name in set(re.findall(r"gateway_\w+", expr)):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in exported or base in exported, f"{where}: {name} is not exported by the gateway"
    result = _query(url, expr)
    assert result, f"{where}: no data for {expr}"


def test_promtool_checks(scraped: tuple[str, str]) -> None:
    promtool = _tool("promtool")
    _, exposition = scraped
    metrics = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True)
    assert metrics.returncode == 0, metrics.stdout + metrics.stderr
    for args in (
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
        ["check", "config", "prometheus.yml"],
    ):
        done = subprocess.run([promtool, *args], cwd=GRAFANA, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def _schema_toolchain() -> Path:
    """@grafana/schema and TypeScript, installed once with npm into .cache/ (npm ships with Node.js)."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is not installed: the dashboard schema check needs Node.js and npm")
    cache = ROOT / ".cache" / "grafana-schema"
    if not (cache / "node_modules" / "@grafana" / "schema").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "package.json").write_text('{"private": true}')
        subprocess.run(
            [npm, "install", "--silent", "--no-audit", "--no-fund", "@grafana/schema@13", "typescript@5"],
            cwd=cache,
            check=True,
            timeout=600,
        )
    return cache


def _tsc(boards: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Type-check each dashboard JSON as `<json> satisfies Dashboard` under tsc --strict."""
    cache = _schema_toolchain()
    with tempfile.TemporaryDirectory(dir=cache) as work:
        for name, text in boards.items():
            Path(work, name + ".ts").write_text(
                'import type { Dashboard } from "@grafana/schema";\n'
                f"export const d = {text.strip()} satisfies Dashboard;\n"
            )
        Path(work, "tsconfig.json").write_text(
            json.dumps(
                {
                    "compilerOptions": {
                        "strict": True,
                        "noEmit": True,
                        "module": "nodenext",
                        "moduleResolution": "nodenext",
                        "target": "es2022",
                        "skipLibCheck": True,
                    },
                    "files": [n + ".ts" for n in boards],
                }
            )
        )
        return subprocess.run(
            [str(cache / "node_modules" / ".bin" / "tsc"), "-p", work],
            capture_output=True,
            text=True,
            timeout=300,
        )


def test_dashboards_satisfy_grafanas_schema_types() -> None:
    done = _tsc({re.sub(r"\W", "_", p.stem): p.read_text() for p in DASHBOARDS})
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_typo_in_a_dashboard_fails_the_schema_check() -> None:
    """The check above can fail: a misspelled field is an error, not silently dropped."""
    board = json.loads(DASHBOARDS[0].read_text())
    board["titel"] = board.pop("title")
    done = _tsc({"bad": json.dumps(board)})
    assert done.returncode != 0 and "titel" in done.stdout
