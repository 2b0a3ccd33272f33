"""bench.instructions --cpu: the in-process measure runs both targets and reports each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_mode_measures_the_gateway_and_the_floor(tmp_path: Path) -> None:
    command = ["-m", "bench.instructions", "--cpu", "--requests", "64", "--rounds", "2"]
    run = subprocess.run(
        [sys.executable, *command, "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "cpu.json").read_text())
    assert result["requests"] == 64
    for target in ("gateway", "floor"):
        assert len(result["rounds"][target]) == 2
        assert result[target] == min(result["rounds"][target]) > 0
    # Full metering (auth, counting, quota, journal, metrics) costs more than a bare relay.
    assert result["gateway"] > result["floor"]
    assert result["gateway_minus_floor"] == round(result["gateway"] - result["floor"], 1)
    assert "µs of event-loop CPU per request" in run.stdout
