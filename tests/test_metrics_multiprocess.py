"""Several worker processes: with PROMETHEUS_MULTIPROC_DIR, /metrics sums every process's counts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

WORKER = textwrap.dedent(
    """
    from gateway.metrics import Metrics
    m = Metrics()
    m.record(model="m", route="/chat/completions", status=200, prompt_tokens=10, tool_tokens=4,
             completion_tokens=5, difference=0)
    """
)
EXPOSE = textwrap.dedent(
    """
    import asyncio
    from starlette.requests import Request
    from gateway.metrics import Metrics
    response = asyncio.run(Metrics().endpoint(Request({"type": "http", "method": "GET", "headers": []})))
    print(response.body.decode())
    """
)


def test_counts_from_every_process_are_summed(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for _ in range(3):
        subprocess.run([sys.executable, "-c", WORKER], env=env, check=True)
    out = subprocess.run(
        [sys.executable, "-c", EXPOSE], env=env, check=True, capture_output=True, text=True
    ).stdout
    assert 'gateway_tokens_total{kind="tool",model="m"} 12.0' in out
    assert 'gateway_requests_total{model="m",route="/chat/completions",status_class="2xx"} 3.0' in out
