"""The bundled backend emulator behaves as the seed documents, and counts like vLLM."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from starlette.testclient import TestClient

from gateway.emulator.app import create_emulator_app
from gateway.emulator.models import EMULATED_MODELS
from tests.conftest import SEED_MESSAGES, SEED_MODEL, SEED_TOOLS, corpus_tools

V3 = "mistralai/Mistral-7B-Instruct-v0.3"


@pytest.fixture(scope="module")
def emu() -> Iterator[TestClient]:
    with TestClient(create_emulator_app()) as client:
        yield client


def _chat(emu: TestClient, **body: Any) -> Any:
    payload = {"model": V3, "messages": SEED_MESSAGES, **body}
    return emu.post("/v1/openai/chat/completions", json=payload)


def test_seed_flow_tool_call_then_answer(emu: TestClient) -> None:
    first = _chat(emu, model=SEED_MODEL, tools=SEED_TOOLS, tool_choice="auto").json()
    message = first["choices"][0]["message"]
    assert first["choices"][0]["finish_reason"] == "tool_calls"
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "get_current_weather"
    assert json.loads(call["function"]["arguments"]) == {"location": "San Francisco"}
    messages = [
        *SEED_MESSAGES,
        message,
        {
            "role": "tool",
            "tool_call_id": call["id"],
            "content": '{"location": "San Francisco", "temperature": "60"}',
        },
    ]
    second = _chat(emu, model=SEED_MODEL, messages=messages).json()
    content = second["choices"][0]["message"]["content"]
    assert "San Francisco" in content and "60" in content
    assert "tool_calls" not in second["choices"][0]["message"]


def test_tools_after_a_tool_result_never_nest(emu: TestClient) -> None:
    call = _chat(emu, tools=SEED_TOOLS).json()["choices"][0]["message"]
    messages = [
        *SEED_MESSAGES,
        call,
        {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": "7"},
    ]
    answer = _chat(emu, messages=messages, tools=SEED_TOOLS).json()["choices"][0]
    assert answer["finish_reason"] == "stop" and answer["message"]["content"]


def test_parallel_calls(emu: TestClient) -> None:
    messages = [{"role": "user", "content": "What is the weather in Tokyo and Paris?"}]
    calls = _chat(emu, messages=messages, tools=SEED_TOOLS).json()["choices"][0]["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"])["location"] for c in calls] == ["Tokyo", "Paris"]
    assert len({c["id"] for c in calls}) == 2


def test_tool_choice_none_answers_in_text(emu: TestClient) -> None:
    choice = _chat(emu, tools=SEED_TOOLS, tool_choice="none").json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "x"}}])
def test_other_tool_choices_are_400(emu: TestClient, tool_choice: Any) -> None:
    resp = _chat(emu, tools=SEED_TOOLS, tool_choice=tool_choice)
    assert resp.status_code == 400 and "auto" in resp.json()["error"]["message"]


def test_streaming_with_tools_is_400(emu: TestClient) -> None:
    resp = _chat(emu, tools=SEED_TOOLS, stream=True)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "stream_with_tools"


def test_unknown_model_is_404(emu: TestClient) -> None:
    assert _chat(emu, model="nobody/none").status_code == 404


def test_text_stream_chunks_and_usage(emu: TestClient) -> None:
    resp = _chat(emu, stream=True, stream_options={"include_usage": True})
    events = [json.loads(line[6:]) for line in resp.text.split("\n\n") if line.startswith("data: {")]
    assert resp.text.endswith("data: [DONE]\n\n")
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    plain = _chat(emu).json()
    assert text == plain["choices"][0]["message"]["content"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]
    no_usage = _chat(emu, stream=True)
    assert '"usage"' not in no_usage.text


@pytest.mark.parametrize("model", [m for m, e in EMULATED_MODELS.items() if e.native_tools])
def test_usage_is_the_official_encoders_count_of_the_whole_prompt(emu: TestClient, model: str) -> None:
    tools = corpus_tools(5, offset=40)
    messages = [{"role": "system", "content": "Be brief. Ünïcödé ✓"}, *SEED_MESSAGES]
    usage = _chat(emu, model=model, messages=messages, tools=tools).json()["usage"]
    tokenizer = EMULATED_MODELS[model]._tokenizer
    request = ChatCompletionRequest.from_openai(messages, tools=tools, model=model)
    assert usage["prompt_tokens"] == len(tokenizer.encode_chat_completion(request).tokens)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_measured_seed_counts_from_the_design_notes(emu: TestClient) -> None:
    def prompt(model: str, tools: Any) -> int:
        return int(_chat(emu, model=model, tools=tools).json()["usage"]["prompt_tokens"])

    assert (prompt(V3, None), prompt(V3, SEED_TOOLS)) == (11, 95)
    nemo = "mistralai/Mistral-Nemo-Instruct-2407"
    assert (prompt(nemo, None), prompt(nemo, SEED_TOOLS)) == (11, 92)
    assert prompt(SEED_MODEL, None) == 16
    assert prompt(SEED_MODEL, SEED_TOOLS) > 16  # v1: tools injected as text (an assumption, documented)


def test_max_tokens_cuts_the_answer(emu: TestClient) -> None:
    body = _chat(emu, max_tokens=3).json()
    assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"


def test_models_completions_embeddings(emu: TestClient) -> None:
    ids = [m["id"] for m in emu.get("/v1/models").json()["data"]]
    assert SEED_MODEL in ids and V3 in ids
    comp = emu.post("/v1/completions", json={"model": V3, "prompt": "Once"}).json()
    assert comp["usage"]["prompt_tokens"] > 0 and comp["choices"][0]["text"]
    emb = emu.post("/v1/embeddings", json={"model": V3, "input": ["a", "b"]}).json()
    assert len(emb["data"]) == 2 and emb["usage"]["prompt_tokens"] > 0


def test_fault_hooks(emu: TestClient) -> None:
    resp = emu.post("/v1/chat/completions", json={"model": V3}, headers={"x-emulator-status": "503"})
    assert resp.status_code == 503 and resp.json()["error"]["message"]
    resp = _chat(emu)
    assert "usage" in resp.json()
    resp = emu.post(
        "/v1/chat/completions",
        json={"model": V3, "messages": SEED_MESSAGES},
        headers={"x-emulator-no-usage": "1"},
    )
    assert "usage" not in resp.json()
    resp = emu.post("/v1/chat/completions", json={}, headers={"x-emulator-malformed": "1"})
    with pytest.raises(ValueError):
        resp.json()
