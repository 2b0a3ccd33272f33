"""bench.instructions --cpu: the in-process measure runs both targets and reports each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_mode_measures_the_gateway_and_the_floor(tmp_path: Path) -> None:
    command = ["-m", "bench.instructions", "--cpu", "--requests", "64", "--rounds", "2", "--request", "seed"]
    run = subprocess.run(
        [sys.executable, *command, "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "cpu-seed.json").read_text())
    assert (result["request"], result["requests"]) == ("seed", 64)
    for target in ("gateway", "floor"):
        assert len(result["rounds"][target]) == 2
        assert result[target] == min(result["rounds"][target]) > 0
    # Full metering (auth, counting, quota, journal, metrics) costs more than a bare relay.
    assert result["gateway"] > result["floor"]
    assert result["gateway_minus_floor"] == round(result["gateway"] - result["floor"], 1)
    assert "µs of event-loop CPU per request" in run.stdout


@pytest.mark.parametrize("name", ["plain", "seed", "long"])
def test_the_canned_answer_reports_the_gateways_own_count(name: str) -> None:
    """Else every measured request would log a prompt-token mismatch, which costs work too."""
    from bench.instructions import answer_to, request_body
    from gateway.accounting.accountant import Accountant
    from gateway.accounting.registry import Registry

    body = request_body(name)
    counted = Accountant(Registry.load()).count(body["model"], body["messages"], body.get("tools"))
    assert json.loads(answer_to(body))["usage"]["prompt_tokens"] == counted.prompt_tokens
    assert bool(body.get("tools")) == (name != "plain") and ("max_tokens" in body) == (name == "plain")
    if name == "long":
        assert len(body["tools"]) == 20 and counted.prompt_tokens > 7000
