"""bench.stages: the gateway's and the floor's time split at the write, and their operations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_stages_split_each_request_at_the_write_and_count_operations(tmp_path: Path) -> None:
    command = ["-m", "bench.stages", "--requests", "6", "--idle", "0", "--request", "seed", "--ops"]
    run = subprocess.run(
        [sys.executable, *command, "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "stages-seed.json").read_text())
    assert (result["request"], result["requests"], result["idle_ms"]) == ("seed", 6, 0)
    assert result["backend_cpu"] is None
    for target in ("floor", "gateway"):
        phases = result[target]
        assert all(phases[p] > 0 for p in ("whole", "before", "backend", "after")), phases
        # Each phase is a part of the whole (medians of parts need not add up exactly).
        assert max(phases["before"], phases["backend"], phases["after"]) < phases["whole"]
    difference = result["gateway_minus_floor"]
    assert difference["before"] == round(result["gateway"]["before"] - result["floor"]["before"], 1)
    # Authentication, the checks, the reservation and the ledger's row all come before the
    # write, where the floor has nothing to do but read the body.
    assert result["gateway"]["before"] > result["floor"]["before"]
    ops = result["ops"]
    assert ops["gateway"]["before_write"] > 5 * ops["floor"]["before_write"] > 0
    for target in ("floor", "gateway"):
        assert ops[target]["to_last_send"] > ops[target]["before_write"]
        assert sum(ops[target]["top"].values()) <= ops[target]["to_last_send"]
    assert "gateway/proxy.py:_handle" in ops["gateway"]["top"]
    assert "bench/floor.py:app" in ops["floor"]["top"]
    assert "Python operations to the last send" in run.stdout
    assert "gateway - floor" in run.stdout
