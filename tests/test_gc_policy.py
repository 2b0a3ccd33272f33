"""gateway.gc_policy: the serving process's collector thresholds, and the heap frozen at start-up."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import pytest

from gateway import cli
from gateway.gc_policy import GcPolicy
from gateway.settings import ConfigError


@pytest.fixture(autouse=True)
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


class _App:
    """An application with a lifespan whose start-up makes a long-lived object."""

    def __init__(self) -> None:
        self.kept: list[Any] = []
        self.scopes: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope["type"])
        if scope["type"] != "lifespan":
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.kept.append([{"state": i} for i in range(100)])
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _lifespan(app: Any) -> list[str]:
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    for message in ({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}):
        inbox.put_nowait(message)
    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send)
    return sent


def _tracked(obj: Any) -> bool:
    return any(o is obj for o in gc.get_objects())


def test_what_start_up_made_is_frozen_out_of_collections() -> None:
    inner = _App()
    policy = GcPolicy(inner, threshold=7000, freeze=True)
    assert asyncio.run(_lifespan(policy)) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    state = inner.kept[0]
    assert gc.get_freeze_count() > 0
    # No collection walks it any more (a full collection walks every tracked object it finds).
    assert not _tracked(state)
    assert gc.get_threshold()[0] == 7000


def test_without_the_policy_start_up_objects_stay_in_the_collected_generations() -> None:
    inner = _App()
    asyncio.run(_lifespan(inner))
    assert _tracked(inner.kept[0])


def test_freeze_off_and_threshold_zero_leave_python_alone() -> None:
    before = gc.get_threshold()
    inner = _App()
    asyncio.run(_lifespan(GcPolicy(inner, threshold=0, freeze=False)))
    assert gc.get_freeze_count() == 0
    assert _tracked(inner.kept[0])
    assert gc.get_threshold() == before


def test_requests_pass_through_untouched() -> None:
    inner = _App()

    async def call() -> None:
        await GcPolicy(inner, threshold=0, freeze=True)({"type": "http"}, None, None)

    asyncio.run(call())
    assert inner.scopes == ["http"]
    assert gc.get_freeze_count() == 0


def test_a_negative_threshold_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="gc_threshold"):
        GcPolicy(_App(), threshold=-1, freeze=True)


def test_gateway_serve_applies_the_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    served: list[Any] = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: served.append(app))
    monkeypatch.setenv("GATEWAY_GC_THRESHOLD", "5000")
    monkeypatch.setenv("GATEWAY_GC_FREEZE", "false")
    code = cli.main(["serve", "--upstream", "http://127.0.0.1:9/v1", "--db", str(tmp_path / "g.db")])
    assert code == 0
    [app] = served
    assert isinstance(app, GcPolicy)
    assert (app.threshold, app.freeze) == (5000, False)
    assert gc.get_threshold()[0] == 5000


def test_gateway_serve_refuses_a_negative_threshold(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: pytest.fail("served"))
    monkeypatch.setenv("GATEWAY_GC_THRESHOLD", "-5")
    code = cli.main(["serve", "--upstream", "http://127.0.0.1:9/v1", "--db", str(tmp_path / "g.db")])
    assert code != 0
    assert "gc_threshold" in capsys.readouterr().err
