"""The operator's CLI, through its entry point: output, exit codes, clean errors."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from gateway.cli import main
from tests.conftest import SEED_MODEL


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_keys_create_prints_the_key_last_and_json_details(
    capsys: pytest.CaptureFixture[str], db_path: str
) -> None:
    code, out, _ = run(capsys, "keys", "create", "--name", "acme", "--db", db_path)
    assert code == 0 and out.strip().splitlines()[-1].startswith("gw-")
    code, out, _ = run(capsys, "keys", "create", "--name", "globex", "--db", db_path, "--json", "--rpm", "60")
    details = json.loads(out)
    assert details["limits"]["rpm"] == 60 and details["key"].startswith("gw-")


def test_plans_keys_and_limits(capsys: pytest.CaptureFixture[str], db_path: str) -> None:
    assert (
        run(
            capsys,
            "plans",
            "create",
            "pro",
            "--tokens-per-day",
            "1000",
            "--spend-per-month",
            "12.50",
            "--db",
            db_path,
        )[0]
        == 0
    )
    run(capsys, "keys", "create", "--name", "acme", "--plan", "pro", "--tpm", "500", "--db", db_path)
    code, out, _ = run(capsys, "keys", "update", "acme", "--max-concurrent", "2", "--json", "--db", db_path)
    limits = json.loads(out)["limits"]
    assert limits == {
        "tokens_per_day": 1000,
        "tokens_per_month": None,
        "spend_per_month": 12_500_000,
        "rpm": None,
        "tpm": 500,
        "max_concurrent": 2,
    }
    run(capsys, "plans", "update", "pro", "--tokens-per-day", "none", "--db", db_path)
    code, out, _ = run(capsys, "keys", "update", "acme", "--no-plan", "--json", "--db", db_path)
    assert (
        code == 0 and json.loads(out)["plan"] is None and json.loads(out)["limits"]["tokens_per_day"] is None
    )
    _code, out, _ = run(capsys, "plans", "list", "--json", "--db", db_path)
    assert json.loads(out)[0]["name"] == "pro"
    assert run(capsys, "plans", "delete", "pro", "--db", db_path)[0] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["keys", "create", "--name", "x", "--rpm", "-1"], "must be between 0 and 2**62"),
        (["keys", "create", "--name", "x", "--rpm", "lots"], "not a whole number"),
        (["keys", "create", "--name", "x", "--spend-per-month", "1.0000001"], "more than 6 decimals"),
        (["keys", "create", "--name", "x", "--plan", "nope"], "no plan 'nope'"),
        (["keys", "revoke", "42"], "no key '42'"),
        (["plans", "delete", "nope"], "no plan 'nope'"),
        (["prices", "set", "m", "--input", "abc", "--output", "1"], "not an amount"),
        (["prices", "set", "m", "--input", "1", "--output", "1", "--effective", "soon"], "is not a date"),
    ],
)
def test_bad_input_is_a_clean_error(
    capsys: pytest.CaptureFixture[str], db_path: str, args: list[str], message: str
) -> None:
    code, _, err = run(capsys, *args, "--db", db_path)
    assert code == 1 and message in err and "Traceback" not in err


def test_prices_with_effective_dates(capsys: pytest.CaptureFixture[str], db_path: str) -> None:
    run(
        capsys,
        "prices",
        "set",
        "default",
        "--input",
        "0.20",
        "--output",
        "0.80",
        "--effective",
        "2026-01-01",
        "--db",
        db_path,
    )
    run(
        capsys,
        "prices",
        "set",
        "default",
        "--input",
        "0.30",
        "--output",
        "0.90",
        "--effective",
        "2099-01-01",
        "--db",
        db_path,
    )
    code, out, _ = run(capsys, "prices", "list", "--json", "--db", db_path)
    assert code == 0
    (current,) = json.loads(out)
    assert (current["model"], current["input_per_million"], current["tool_per_million"]) == (
        "*",
        200_000,
        200_000,
    )
    _code, out, _ = run(capsys, "prices", "list", "--history", "--db", db_path)
    assert out.count("default") == 2


def test_usage_table_json_and_csv(capsys: pytest.CaptureFixture[str], db_path: str) -> None:
    import asyncio
    import time

    from gateway.ledger import Ledger, PendingRow, Settlement

    run(capsys, "keys", "create", "--name", "acme", "--db", db_path)

    async def fill() -> None:
        ledger = Ledger(db_path)
        ledger.start()
        for i, model in enumerate(["m1", "m1", "m2"]):
            await ledger.pending(PendingRow(f"r{i}", 1, model, "/chat/completions", False, time.time() - 60))
            ledger.settle(
                Settlement(
                    f"r{i}", 200, prompt_tokens=10, completion_tokens=5, tool_tokens=4, cost_micros=1_500_000
                )
            )
        await ledger.close()

    asyncio.run(fill())
    code, out, _ = run(capsys, "usage", "--by", "model", "--db", db_path)
    assert code == 0 and "m1" in out and "m2" in out
    assert out.strip().splitlines()[-1].split()[-5:] == ["3", "30", "12", "15", "4.5"]
    code, out, _ = run(capsys, "usage", "--key", "acme", "--since", "2h", "--json", "--db", db_path)
    results = [r for b in json.loads(out)["data"] for r in b["results"]]
    assert sum(r["num_model_requests"] for r in results) == 3
    code, out, _ = run(capsys, "usage", "--by", "key", "--csv", "--db", db_path)
    assert out.splitlines()[0].startswith("start_time,end_time,model,key,") and ",acme," in out
    code, _, err = run(capsys, "usage", "--key", "nobody", "--db", db_path)
    assert code == 1 and "no key" in err


def _serve_without_listening(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """``gateway serve`` up to the server's start: the application it would serve, or nothing."""
    import uvicorn

    served: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.append(app))
    return served


def test_serve_preloads_the_named_models_and_says_so(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    db_path: str,
) -> None:
    served = _serve_without_listening(monkeypatch)
    monkeypatch.setenv("GATEWAY_PRELOAD_MODELS", f" {SEED_MODEL} , gpt-4")
    caplog.set_level(logging.INFO, logger="gateway")
    code, _, _ = run(capsys, "serve", "--upstream", "http://127.0.0.1:9/v1/openai", "--db", db_path)
    assert code == 0 and len(served) == 1
    loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("preloaded")]
    assert [m.split(" in ")[0] for m in loaded] == [
        f"preloaded the tokenizer of {SEED_MODEL}",
        "preloaded the tokenizer of gpt-4",
    ]


def test_serve_refuses_to_preload_a_model_the_registry_does_not_know(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, db_path: str
) -> None:
    served = _serve_without_listening(monkeypatch)
    monkeypatch.setenv("GATEWAY_PRELOAD_MODELS", "acme/no-such-model")
    code, _, err = run(capsys, "serve", "--upstream", "http://127.0.0.1:9/v1/openai", "--db", db_path)
    assert code == 2 and not served and "Traceback" not in err
    assert err.strip() == (
        "gateway: configuration error: setting 'preload_models': "
        "model 'acme/no-such-model' is not in the model registry"
    )
