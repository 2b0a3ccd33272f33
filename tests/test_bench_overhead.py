"""bench.overhead's report: both requests, sequential and under concurrency, with their ratios."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from bench.overhead import CONNECTIONS, report, split_cpus, target_checks
from tests.servers import EmulatorProcess

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


def test_the_report_judges_each_target_of_the_issue() -> None:
    result = _result()
    seed = result["sequential"]["seed"]
    seed["gateway"] = {**seed["gateway"], "p50_ms": 2.35, "added_p99_ms": 3.5}  # floor-http1: 2.0
    result["ratios"]["seed"]["gateway/floor-http1@32"] = 0.75
    result["ratios"]["seed"]["gateway/litellm@32"] = 40.0
    result["rss_mb_after_load"] = 151.0
    checks = {what: (figure, met) for what, figure, _, met in target_checks(result)}
    assert checks["seed: added p50 over floor-http1"] == ("+0.350 ms", False)
    assert checks["seed: added p99 at concurrency 1"] == ("+3.500 ms", False)
    assert checks["20 tools, 8k tokens: added p50 over floor-http1"] == ("+0.000 ms", True)
    assert checks["seed: throughput at 32 connections / floor-http1"] == ("0.75x", False)
    assert checks["20 tools, 8k tokens: throughput at 32 connections / floor-http1"] == ("0.80x", True)
    assert checks["seed: throughput at 32 connections / litellm"] == ("40.00x", True)
    assert "20 tools, 8k tokens: throughput at 32 connections / litellm" not in checks  # not run
    assert checks["RSS under load"] == ("151.0 MB", False)
    md = report(result)
    assert "| seed: added p50 over floor-http1 | +0.350 ms | <= 0.3 ms | **no** |" in md
    assert "| RSS under load | 151.0 MB | <= 150 MB | **no** |" in md


def test_the_report_says_where_the_backend_ran() -> None:
    result = _result()
    assert "The backend ran on CPU" not in report(result)
    result["backend_cpu"] = 1
    assert "The backend ran on CPU 1 alone, every other process on the other CPUs." in report(result)


def test_backend_cpu_splits_this_processs_cpus() -> None:
    assert split_cpus(1, {0, 1}) == ({1}, {0})
    assert split_cpus(0, {0, 1, 2, 3}) == ({0}, {1, 2, 3})
    with pytest.raises(SystemExit, match="not one of this process's CPUs"):
        split_cpus(5, {0, 1})
    with pytest.raises(SystemExit, match="at least two CPUs"):
        split_cpus(0, {0})


def test_a_pinned_emulator_runs_every_thread_on_its_cpu() -> None:
    """--backend-cpu's backend: the mask is set before the emulator starts, so that the threads
    it makes later (the loop's, the tokenizers') keep to the CPU too. (On this project's two
    CPUs the mask is narrower than the one the emulator would inherit.)"""
    cpu = max(os.sched_getaffinity(0))
    with EmulatorProcess(cpus={cpu}) as emulator:
        assert emulator.proc is not None
        tasks = list(Path(f"/proc/{emulator.proc.pid}/task").iterdir())
        assert tasks
        for task in tasks:
            assert os.sched_getaffinity(int(task.name)) == {cpu}
