"""End to end, as users run it: real servers on loopback, the official openai client."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.emulator.app import create_emulator_app
from gateway.journal import Journal
from tests.conftest import SEED_MESSAGES, SEED_MODEL, SEED_TOOLS, ledger_rows, settled_rows
from tests.servers import EmulatorProcess, GatewayProcess, ServerThread

pytestmark = pytest.mark.e2e


def get_current_weather(location: str) -> str:
    """The seed's dummy function."""
    if "tokyo" in location.lower():
        return json.dumps({"location": "Tokyo", "temperature": "75"})
    if "san francisco" in location.lower():
        return json.dumps({"location": "San Francisco", "temperature": "60"})
    if "paris" in location.lower():
        return json.dumps({"location": "Paris", "temperature": "70"})
    return json.dumps({"location": location, "temperature": "unknown"})


def run_seed_example(client: openai.OpenAI, model: str = SEED_MODEL) -> tuple[Any, Any]:
    """The seed's example, unchanged but for the client it is given."""
    messages: list[Any] = [{"role": "user", "content": "What is the weather in San Francisco?"}]
    response = client.chat.completions.create(
        model=model, messages=messages, tools=SEED_TOOLS, tool_choice="auto"
    )
    tool_calls = response.choices[0].message.tool_calls
    assert tool_calls
    messages.append(response.choices[0].message)
    for tool_call in tool_calls:
        function_name = tool_call.function.name
        if function_name == "get_current_weather":
            function_args = json.loads(tool_call.function.arguments)
            function_response = get_current_weather(location=function_args.get("location"))
        messages.append({"tool_call_id": tool_call.id, "role": "tool", "content": function_response})
    second_response = client.chat.completions.create(model=model, messages=messages)
    return response, second_response


@pytest.mark.parametrize("base", ["/v1/openai", "/v1"])
def test_seed_example_two_steps_answered_and_recorded(
    live_gateway: Callable[..., ServerThread], new_key: Callable[[str], str], db_path: str, base: str
) -> None:
    gateway = live_gateway()
    client = openai.OpenAI(base_url=gateway.url + base, api_key=new_key("acme"), max_retries=0)
    first, second = run_seed_example(client)
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "get_current_weather"
    assert json.loads(call.function.arguments) == {"location": "San Francisco"}
    assert second.choices[0].message.content == (
        "According to the tool results: location is San Francisco, temperature is 60."
    )
    gateway.__exit__(None, None, None)
    rows = settled_rows(db_path)
    assert len(rows) == 2
    for row, response in zip(rows, (first, second), strict=True):
        assert (row["state"], row["status"], row["model"], row["route"]) == (
            "settled",
            200,
            SEED_MODEL,
            "/chat/completions",
        )
        assert row["prompt_tokens"] == response.usage.prompt_tokens
        assert row["completion_tokens"] == response.usage.completion_tokens
    # The seed model (Mistral v1) has no native tool format: its tool split is an estimate.
    assert [r["estimated"] for r in rows] == [1, 0]
    assert rows[0]["tool_tokens"] == first.usage.prompt_tokens_details.tool_tokens > 0


def test_text_stream_arrives_chunk_by_chunk(
    make_settings: Callable[..., Any], new_key: Callable[[str], str], db_path: str
) -> None:
    from gateway.app import create_app

    with (
        ServerThread(create_emulator_app(token_latency=0.05)) as slow,
        ServerThread(create_app(make_settings(upstream_url=slow.url + "/v1/openai"))) as gateway,
    ):
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=new_key("acme"), max_retries=0)
        start = time.monotonic()
        arrivals: list[tuple[float, str]] = []
        stream = client.chat.completions.create(
            model="mistralai/Mistral-7B-Instruct-v0.3", messages=SEED_MESSAGES, stream=True
        )
        for chunk in stream:
            assert chunk.choices, "the usage chunk the client did not ask for must not reach it"
            arrivals.append((time.monotonic() - start, chunk.choices[0].delta.content or ""))
    text = "".join(t for _, t in arrivals)
    assert text.startswith("You asked: What is the weather in San Francisco?")
    # ~17 tokens at 50 ms each: a buffered relay would deliver them all at the end.
    first_content = next(t for t, piece in arrivals if piece)
    assert arrivals[-1][0] - first_content > 0.5
    (row,) = settled_rows(db_path)
    assert row["stream"] == 1 and row["estimated"] == 0
    assert row["completion_tokens"] == sum(1 for _, piece in arrivals[1:] if piece) + 1  # + </s>
    assert row["first_byte_ms"] < row["duration_ms"] - 500


def test_passthrough_routes_authenticated_and_metered(
    live_gateway: Callable[..., ServerThread], new_key: Callable[[str], str], db_path: str
) -> None:
    gateway = live_gateway()
    client = openai.OpenAI(base_url=gateway.url + "/v1/openai", api_key=new_key("acme"), max_retries=0)
    models = [m.id for m in client.models.list()]
    assert SEED_MODEL in models
    completion = client.completions.create(model=SEED_MODEL, prompt="Once upon a time")
    embedding = client.embeddings.create(model=SEED_MODEL, input=["hello", "world"])
    assert len(embedding.data) == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway.url + "/v1", api_key="gw-wrong", max_retries=0).models.list()
    gateway.__exit__(None, None, None)
    rows = {r["route"]: r for r in settled_rows(db_path)}
    assert set(rows) == {"/models", "/completions", "/embeddings"}
    assert rows["/completions"]["prompt_tokens"] == completion.usage.prompt_tokens
    assert rows["/embeddings"]["prompt_tokens"] == embedding.usage.prompt_tokens


def test_backend_error_reaches_the_openai_client_and_the_ledger(
    live_gateway: Callable[..., ServerThread], new_key: Callable[[str], str], db_path: str
) -> None:
    gateway = live_gateway()
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=new_key("acme"), max_retries=0)
    with pytest.raises(openai.InternalServerError, match="emulated backend failure"):
        client.chat.completions.create(
            model=SEED_MODEL, messages=SEED_MESSAGES, extra_headers={"x-emulator-status": "503"}
        )
    # A tool_choice the backend does not support is refused up front: it never reaches the backend.
    with pytest.raises(openai.BadRequestError, match="not supported by this backend"):
        client.chat.completions.create(
            model=SEED_MODEL, messages=SEED_MESSAGES, tools=SEED_TOOLS, tool_choice="required"
        )
    gateway.__exit__(None, None, None)
    (row,) = settled_rows(db_path)
    assert (row["status"], row["error"]) == (503, "backend status 503")


def _cli(*args: str, cwd: Path) -> str:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_operator_cli_and_server_process(tmp_path: Path, emulator: ServerThread) -> None:
    """keys create/list/revoke and `gateway serve` with the documented flags, as separate processes."""
    db = str(tmp_path / "gateway.db")
    key = _cli("keys", "create", "--name", "acme", "--db", db, cwd=tmp_path).strip().splitlines()[-1]
    details = json.loads(_cli("keys", "create", "--name", "globex", "--db", db, "--json", cwd=tmp_path))
    assert details["name"] == "globex" and details["key"].startswith("gw-")
    listing = _cli("keys", "list", "--db", db, cwd=tmp_path)
    assert "acme" in listing and "globex" in listing and key not in listing
    server = GatewayProcess(
        "--host",
        "127.0.0.1",
        "--upstream",
        emulator.url + "/v1/openai",
        "--db",
        db,
        env={"GATEWAY_UPSTREAM_API_KEY": "sk-operator-secret"},
        cwd=tmp_path,
    ).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1/openai", api_key=key, max_retries=0)
        first, _ = run_seed_example(client)
        assert first.choices[0].message.tool_calls
        assert server.proc is not None
        # Serving (tokenizers loaded, rows written) maps no numpy: see gateway.db._sqlite_utils.
        assert "numpy" not in Path(f"/proc/{server.proc.pid}/maps").read_text()
        _cli("keys", "revoke", "1", "--db", db, cwd=tmp_path)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    finally:
        output = server.stop()
    assert key not in output and "sk-operator-secret" not in output
    assert [r["status"] for r in settled_rows(db)] == [200, 200]


def test_killed_gateway_loses_no_forwarded_request(tmp_path: Path, emulator: ServerThread) -> None:
    """SIGKILL while the backend is answering: the pending row is recovered at the next start."""
    db = str(tmp_path / "gateway.db")
    key = _cli("keys", "create", "--name", "acme", "--db", db, cwd=tmp_path).strip().splitlines()[-1]
    args = ("--upstream", emulator.url + "/v1/openai", "--db", db)
    server = GatewayProcess(*args, cwd=tmp_path).start()

    def call() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(
                server.url + "/v1/chat/completions",
                json={"model": SEED_MODEL, "messages": SEED_MESSAGES},
                headers={"Authorization": f"Bearer {key}", "x-emulator-delay": "3"},
                timeout=10,
            )

    caller = threading.Thread(target=call)
    caller.start()
    journal = Journal(db + "-ledger")
    deadline = time.monotonic() + 10
    while not list(journal.entries()) and time.monotonic() < deadline:
        time.sleep(0.005)
    server.kill()  # the moment the request was journaled: its row may not be committed yet
    caller.join()
    assert [r["state"] for r in ledger_rows(db)] in ([], ["pending"])
    # A price is set while the gateway is down: the recovered row is billed at its reserved estimate.
    _cli(
        "prices",
        "set",
        "default",
        "--input",
        "1",
        "--output",
        "2",
        "--effective",
        "2000-01-01",
        "--db",
        db,
        cwd=tmp_path,
    )
    server = GatewayProcess(*args, cwd=tmp_path).start()
    try:
        # The recovered request appears in the customer's usage, billed and priced.
        usage = httpx.get(
            server.url + "/v1/usage",
            params={"bucket_width": "1h", "start_time": int(time.time()) - 3600, "limit": 2},
            headers={"Authorization": f"Bearer {key}"},
        )
        results = [r for b in usage.json()["data"] for r in b["results"]]
    finally:
        server.stop()
    assert [r["num_model_requests"] for r in results] == [1] and results[0]["output_tokens"] == 1024
    (row,) = settled_rows(db)
    assert (row["state"], row["estimated"], row["model"]) == ("recovered", 1, SEED_MODEL)
    # No max_tokens in the request: the default cap (1024) stands in for the unknown output.
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] == 1024
    assert row["cost_micros"] == (row["prompt_tokens"] * 1_000_000 + 1024 * 2_000_000 + 500_000) // 1_000_000


def test_a_port_taken_before_the_gateway_binds_it_is_traded_for_another(tmp_path: Path) -> None:
    """The harness's own race: free_port() lets the port go, and any socket may get it before
    the gateway binds it (one did, once, in CI). The gateway is started again on another."""
    server = GatewayProcess("--db", str(tmp_path / "gateway.db"), cwd=tmp_path)
    taken = server.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        server.start()
        try:
            assert server.port != taken
            assert httpx.get(server.url + "/healthz").status_code == 200
        finally:
            server.stop()


def test_a_port_taken_before_the_emulator_binds_it_is_traded_for_another() -> None:
    emulator = EmulatorProcess()
    taken = emulator.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        with emulator:
            assert emulator.port != taken
            assert httpx.get(emulator.url + "/v1/models").status_code == 200


def test_demo_mode_serves_the_emulator_and_prints_a_working_key(tmp_path: Path) -> None:
    """`gateway serve` with no upstream: the README's first command."""
    db = str(tmp_path / "gateway.db")
    server = GatewayProcess("--db", db, cwd=tmp_path).start()
    try:
        banner = server.output()
        key = next(line.split()[-1] for line in banner.splitlines() if line.startswith("Demo key"))
        assert "curl" in banner and "/v1/openai/chat/completions" in banner
        client = openai.OpenAI(base_url=server.url + "/v1/openai", api_key=key, max_retries=0)
        _first, second = run_seed_example(client)
        assert "60" in second.choices[0].message.content
    finally:
        server.stop()
    assert [r["status"] for r in settled_rows(db)] == [200, 200]
    # Each demo start rotates the demo key: the old one stops working.
    server = GatewayProcess("--db", db, cwd=tmp_path).start()
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0).models.list()
    finally:
        server.stop()


@pytest.mark.parametrize(
    "model",
    [
        "mistralai/Mistral-7B-Instruct-v0.3",
        "mistralai/Mixtral-8x22B-Instruct-v0.1",
        "mistralai/Mistral-Nemo-Instruct-2407",
        "mistralai/Mistral-Large-Instruct-2411",
    ],
)
def test_tool_tokens_billed_exactly_against_an_independent_backend(
    live_gateway: Callable[..., ServerThread], new_key: Callable[[str], str], db_path: str, model: str
) -> None:
    """The emulator counts with mistral-common; the gateway with its own code: zero difference."""
    gateway = live_gateway()
    key = new_key("acme")
    client = openai.OpenAI(base_url=gateway.url + "/v1/openai", api_key=key, max_retries=0)
    first, second = run_seed_example(client, model)
    counted = httpx.post(
        gateway.url + "/v1/chat/completions/count_tokens",
        json={"model": model, "messages": SEED_MESSAGES, "tools": SEED_TOOLS},
        headers={"Authorization": f"Bearer {key}"},
    ).json()
    assert first.usage.prompt_tokens == counted["prompt_tokens"]
    assert first.usage.prompt_tokens_details.tool_tokens == counted["tool_tokens"] > 0
    assert second.usage.prompt_tokens_details.tool_tokens == 0
    gateway.__exit__(None, None, None)
    rows = settled_rows(db_path)
    assert [r["tool_tokens"] for r in rows] == [counted["tool_tokens"], 0]
    assert all(r["counted_prompt_tokens"] == r["prompt_tokens"] and r["estimated"] == 0 for r in rows)
