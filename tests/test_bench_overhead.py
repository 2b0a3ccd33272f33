"""bench.overhead's report: both requests, sequential and under concurrency, with their ratios."""

from __future__ import annotations

from typing import Any

from bench.overhead import CONNECTIONS, report

TARGETS = ("direct", "floor-httpx", "floor-aiohttp", "floor-http1", "gateway")
REQUESTS = ("seed", "20 tools, 8k tokens")


def _result() -> dict[str, Any]:
    figures = {"p50_ms": 2.0, "p99_ms": 3.0, "added_p50_ms": 0.5, "added_p99_ms": 0.7}
    rps = {
        "direct": 1000.0,
        "floor-httpx": 400.0,
        "floor-aiohttp": 900.0,
        "floor-http1": 960.0,
        "gateway": 720.0,
    }
    return {
        "python": "3.11.7",
        "cpus": 2,
        "rounds": 3,
        "rss_mb_at_rest": 58.0,
        "rss_mb_after_load": 88.0,
        "sequential": {name: {t: dict(figures) for t in TARGETS} for name in REQUESTS},
        "sweep": {
            name: {
                f"{t}@{c}": {"throughput_rps": rps[t] / (2 if name != "seed" else 1), "p99_ms": 9.5}
                for t in TARGETS
                for c in CONNECTIONS
            }
            for name in REQUESTS
        },
        "ratios": {
            name: {f"gateway/{t}@{c}": 0.8 for t in TARGETS if t != "gateway" for c in CONNECTIONS}
            for name in REQUESTS
        },
    }


def test_the_report_has_a_concurrency_table_per_request() -> None:
    md = report(_result())
    for name in REQUESTS:
        assert f"Concurrency sweep, {name} request:" in md
        assert f"| {name} | gateway - floor-aiohttp | | | 0.000 | 0.000 |" in md
        assert f"| {name} | gateway - floor-http1 | | | 0.000 | 0.000 |" in md
    # The seed's table shows its own throughput; the long request's its own (half, here).
    assert "| 32 | 1000 | 400 | 900 | 960 | 720 | 9.50 | 0.80 | 0.80 | 0.80 |" in md
    assert "| 32 | 500 | 200 | 450 | 480 | 360 | 9.50 | 0.80 | 0.80 | 0.80 |" in md
    assert "58.0 MB at rest, 88.0 MB at most under load" in md
