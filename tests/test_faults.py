"""Faults on real loopback servers: nothing lost, no reservation leaked, clear errors."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.db import open_db
from gateway.emulator.app import create_emulator_app
from gateway.keys import KeyStore, load_key_secret
from gateway.settings import Settings
from tests.conftest import SEED_MESSAGES, ledger_rows
from tests.servers import ServerThread, free_port

pytestmark = pytest.mark.e2e
V3 = "mistralai/Mistral-7B-Instruct-v0.3"
LIMITS = {"tokens_per_day": 100_000, "max_concurrent": 5}


@pytest.fixture(params=["http1", "aiohttp", "httpx"])
def make_settings(
    make_settings: Callable[..., Settings], request: pytest.FixtureRequest
) -> Callable[..., Settings]:
    """Every fault on both upstream transports: each must map it to the same answer."""

    def make(**overrides: Any) -> Settings:
        return make_settings(**{"upstream_transport": request.param, **overrides})

    return make


def _key(settings: Settings, **limits: int) -> str:
    store = KeyStore(open_db(settings.db), load_key_secret(settings))
    return store.create("acme", limits={**LIMITS, **limits})[1]


def _settled(db_path: str, n: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = ledger_rows(db_path)
        if len(rows) >= n and all(r["state"] != "pending" for r in rows):
            return rows
        time.sleep(0.05)
    raise AssertionError(f"ledger rows did not settle: {ledger_rows(db_path)}")


def _outstanding(gateway: ServerThread, key: str) -> tuple[int, int]:
    limits = httpx.get(gateway.url + "/v1/limits", headers={"Authorization": f"Bearer {key}"}).json()
    by_name = {w["name"]: w for w in limits["limits"]}
    return by_name["max_concurrent"]["used"], by_name["tokens_per_day"]["reserved"]


def test_backend_down_is_502_recorded_and_released(
    make_settings: Callable[..., Settings], db_path: str
) -> None:
    settings = make_settings(upstream_url=f"http://127.0.0.1:{free_port()}/v1/openai", connect_timeout=2)
    key = _key(settings)
    with ServerThread(create_app(settings)) as gateway:
        resp = httpx.post(
            gateway.url + "/v1/chat/completions",
            json={"model": V3, "messages": SEED_MESSAGES},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert _outstanding(gateway, key) == (0, 0)
    error = resp.json()["error"]
    assert resp.status_code == 502 and error["code"] == "upstream_unreachable"
    assert "127.0.0.1" not in error["message"]
    (row,) = _settled(db_path)
    assert (row["status"], row["prompt_tokens"], row["cost_micros"]) == (502, None, None)


def test_slow_backend_is_504_recorded_and_released(
    make_settings: Callable[..., Settings], db_path: str
) -> None:
    with ServerThread(create_emulator_app()) as emulator:
        settings = make_settings(upstream_url=emulator.url + "/v1/openai", read_timeout=0.5)
        key = _key(settings)
        with ServerThread(create_app(settings)) as gateway:
            t0 = time.monotonic()
            resp = httpx.post(
                gateway.url + "/v1/chat/completions",
                json={"model": V3, "messages": SEED_MESSAGES},
                headers={"Authorization": f"Bearer {key}", "x-emulator-delay": "3"},
                timeout=10,
            )
            assert time.monotonic() - t0 < 2.5
            assert _outstanding(gateway, key) == (0, 0)
    assert resp.status_code == 504 and resp.json()["error"]["code"] == "upstream_timeout"
    (row,) = _settled(db_path)
    assert row["status"] == 504


@contextlib.contextmanager
def _backend_that_stops_reading() -> Iterator[str]:
    """A backend that accepts a connection and reads nothing from it: its URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1/openai"
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


def test_backend_that_stops_reading_the_request_is_504_recorded_and_released(
    make_settings: Callable[..., Settings], db_path: str
) -> None:
    """The request is bigger than the kernel's buffers and the backend takes none of it: the
    write timeout ends the wait, on every transport."""
    with _backend_that_stops_reading() as url:
        settings = make_settings(upstream_url=url, write_timeout=0.3, read_timeout=2, max_body_bytes=32 << 20)
        key = _key(settings, tokens_per_day=10**9)
        long_text = "word " * (12 << 18)  # 12 MB
        with ServerThread(create_app(settings)) as gateway:
            t0 = time.monotonic()
            resp = httpx.post(
                gateway.url + "/v1/chat/completions",
                # A model without a tokenizer: no count of 12 MB competes with the wait.
                json={"model": "acme/unknown", "messages": [{"role": "user", "content": long_text}]},
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )
            waited = time.monotonic() - t0
            assert _outstanding(gateway, key) == (0, 0)
    assert resp.status_code == 504 and resp.json()["error"]["code"] == "upstream_timeout"
    assert waited < 1.8  # the write timeout, not the read timeout (2 s)
    message = "The backend did not take the request in time (WriteTimeout)."
    assert resp.json()["error"]["message"] == message
    (row,) = _settled(db_path)
    assert (row["status"], row["error"]) == (504, message)


def test_malformed_backend_answer_is_502(
    make_settings: Callable[..., Settings], emulator: ServerThread
) -> None:
    settings = make_settings(upstream_url=emulator.url + "/v1/openai")
    key = _key(settings)
    with ServerThread(create_app(settings)) as gateway:
        resp = httpx.post(
            gateway.url + "/v1/chat/completions",
            json={"model": V3, "messages": SEED_MESSAGES},
            headers={"Authorization": f"Bearer {key}", "x-emulator-malformed": "1"},
        )
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_malformed"


def test_client_gone_mid_stream_is_billed_for_what_was_generated(
    make_settings: Callable[..., Settings], db_path: str
) -> None:
    with ServerThread(create_emulator_app(token_latency=0.1)) as emulator:
        settings = make_settings(upstream_url=emulator.url + "/v1/openai")
        key = _key(settings)
        with ServerThread(create_app(settings)) as gateway:
            body = {"model": V3, "messages": SEED_MESSAGES, "stream": True}
            with (
                httpx.Client(timeout=10) as client,
                client.stream(
                    "POST",
                    gateway.url + "/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {key}"},
                ) as resp,
            ):
                received = 0
                for line in resp.iter_lines():
                    received += line.startswith("data: {")
                    if received == 4:
                        break  # the client walks away: the connection closes with the stream unread
            (row,) = _settled(db_path)
            assert _outstanding(gateway, key) == (0, 0)
    # The whole answer is 17 tokens; the client saw 3 of them before it went away.
    assert (row["status"], row["estimated"]) == (499, 1)
    assert 1 <= row["completion_tokens"] < 17
    assert row["prompt_tokens"] == 11 and "disconnected" in row["error"]
