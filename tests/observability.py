"""A gateway under varied traffic with a real Prometheus scraping it (tests and the renderer)."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from gateway.app import create_app
from gateway.db import open_db
from gateway.emulator.app import create_emulator_app
from gateway.keys import KeyStore, load_key_secret
from gateway.prices import Price, PriceBook
from gateway.settings import Settings
from tests.conftest import SEED_MESSAGES, SEED_TOOLS
from tests.servers import ServerThread, free_port

GRAFANA = Path(__file__).resolve().parents[1] / "grafana"
V3 = "mistralai/Mistral-7B-Instruct-v0.3"


@contextlib.contextmanager
def observed_gateway(
    tmp: Path, prometheus_bin: str, seconds: float, scrape: str = "1s"
) -> Iterator[tuple[str, str, str]]:
    """Yield (Prometheus URL, gateway URL, the gateway's /metrics text) after ``seconds`` of traffic."""
    db = str(tmp / "gateway.db")
    # backend_counts_tools=false against a backend that does count them: every tool request is a
    # prompt-token mismatch, so the accounting panels and alert have data to show.
    settings = Settings(db=db, metrics_per_key=5, backend_counts_tools=False)
    store = KeyStore(open_db(db), load_key_secret(settings))
    keys = {
        "acme": store.create("acme")[1],
        "tight": store.create("tight", limits={"tokens_per_day": 10})[1],
        "slow": store.create("slow", limits={"rpm": 1})[1],
    }
    PriceBook(open_db(db)).set("*", Price(200_000, 100_000, 800_000), effective_from=0)
    with ServerThread(create_emulator_app(token_latency=0.002)) as emulator:
        settings = Settings(**{**settings.__dict__, "upstream_url": emulator.url + "/v1/openai"})
        with (
            ServerThread(create_app(settings)) as gateway,
            prometheus(tmp, prometheus_bin, [gateway.url], scrape) as url,
        ):
            traffic(gateway.url, keys, seconds)
            time.sleep(3)  # two more scrapes after the last request
            yield url, gateway.url, httpx.get(gateway.url + "/metrics").text


@contextlib.contextmanager
def prometheus(tmp: Path, binary: str, targets: list[str], scrape: str = "1s") -> Iterator[str]:
    """Debian's Prometheus scraping ``targets`` (base URLs) with the shipped alert rules; its URL."""
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": scrape, "evaluation_interval": scrape},
                "rule_files": [str(GRAFANA / "alerts.yml")],
                "scrape_configs": [
                    {
                        "job_name": "gateway",
                        "static_configs": [{"targets": [t.removeprefix("http://") for t in targets]}],
                    }
                ],
            }
        )
    )
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {proc.stderr.read() if proc.stderr else b''!r}")
        try:
            if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("prometheus did not become ready")


def traffic(base: str, keys: dict[str, str], seconds: float) -> None:
    """Tool calls, text streams, backend failures, budget and rate refusals, in a loop."""

    def auth(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {keys[name]}"}

    end = time.monotonic() + seconds
    with httpx.Client(base_url=base, timeout=30) as client:
        while time.monotonic() < end:
            client.post(
                "/v1/chat/completions",
                json={"model": V3, "messages": SEED_MESSAGES, "tools": SEED_TOOLS},
                headers=auth("acme"),
            )
            with client.stream(
                "POST",
                "/v1/chat/completions",
                json={"model": V3, "messages": SEED_MESSAGES, "stream": True},
                headers=auth("acme"),
            ) as resp:
                for _ in resp.iter_bytes():
                    pass
            client.post(
                "/v1/chat/completions",
                json={"model": V3, "messages": SEED_MESSAGES},
                headers={**auth("acme"), "x-emulator-status": "503"},
            )
            for _ in range(3):
                client.post(
                    "/v1/chat/completions",
                    json={"model": V3, "messages": SEED_MESSAGES},
                    headers=auth("tight"),
                )
            client.post(
                "/v1/chat/completions", json={"model": V3, "messages": SEED_MESSAGES}, headers=auth("slow")
            )
            time.sleep(0.1)
