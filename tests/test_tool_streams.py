"""Streaming for everyone: tool requests streamed by the gateway for a backend that cannot."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import openai
import pytest

from gateway.stream_emulation import sse_events
from tests.conftest import SEED_MESSAGES, SEED_TOOLS, settled_rows
from tests.servers import ServerThread

V3 = "mistralai/Mistral-7B-Instruct-v0.3"
PARALLEL = [{"role": "user", "content": "What is the weather in Tokyo and Paris?"}]


def _client(gateway: ServerThread, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1/openai", api_key=key, max_retries=0)


def _assemble(stream: Any) -> tuple[dict[str, Any], str | None, Any]:
    """What the openai client's users do with a stream: join deltas into one message."""
    content, calls, finish, usage = "", {}, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for call in delta.tool_calls or []:
                slot = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = call.id or slot["id"]
                if call.function:
                    slot["name"] += call.function.name or ""
                    slot["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return {"content": content or None, "tool_calls": [calls[i] for i in sorted(calls)]}, finish, usage


def _plain(message: Any) -> dict[str, Any]:
    calls = [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for c in message.tool_calls or []
    ]
    return {"content": message.content, "tool_calls": calls}


@pytest.mark.e2e
@pytest.mark.parametrize("messages", [SEED_MESSAGES, PARALLEL], ids=["single", "parallel"])
def test_streamed_tool_calls_assemble_to_the_non_streaming_answer(
    live_gateway: Callable[..., ServerThread], new_key: Callable[[str], str], db_path: str, messages: Any
) -> None:
    client = _client(live_gateway(), new_key("acme"))
    whole = client.chat.completions.create(model=V3, messages=messages, tools=SEED_TOOLS, tool_choice="auto")
    streamed, finish, usage = _assemble(
        client.chat.completions.create(
            model=V3,
            messages=messages,
            tools=SEED_TOOLS,
            tool_choice="auto",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert streamed == _plain(whole.choices[0].message)
    assert finish == whole.choices[0].finish_reason == "tool_calls"
    assert len(streamed["tool_calls"]) == (2 if messages is PARALLEL else 1)
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.prompt_tokens_details.tool_tokens == whole.usage.prompt_tokens_details.tool_tokens > 0
    rows = settled_rows(db_path)
    assert [(r["stream"], r["status"], r["estimated"]) for r in rows] == [(0, 200, 0), (1, 200, 0)]
    assert rows[0]["tool_tokens"] == rows[1]["tool_tokens"]


@pytest.mark.e2e
def test_the_openai_stream_helper_yields_the_same_message(
    live_gateway: Callable[..., ServerThread], new_key: Callable[[str], str]
) -> None:
    client = _client(live_gateway(), new_key("acme"))
    whole = client.chat.completions.create(model=V3, messages=PARALLEL, tools=SEED_TOOLS)
    with client.chat.completions.stream(model=V3, messages=PARALLEL, tools=SEED_TOOLS) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert _plain(final.choices[0].message) == _plain(whole.choices[0].message)
    assert final.choices[0].finish_reason == "tool_calls"


@pytest.mark.e2e
def test_text_answers_with_tools_stream_too_and_usage_only_when_asked(
    live_gateway: Callable[..., ServerThread], new_key: Callable[[str], str]
) -> None:
    client = _client(live_gateway(), new_key("acme"))
    whole = client.chat.completions.create(
        model=V3, messages=SEED_MESSAGES, tools=SEED_TOOLS, tool_choice="none"
    )
    chunks = list(
        client.chat.completions.create(
            model=V3, messages=SEED_MESSAGES, tools=SEED_TOOLS, tool_choice="none", stream=True
        )
    )
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.e2e
def test_with_emulation_off_the_backends_refusal_passes_through(
    live_gateway: Callable[..., ServerThread], new_key: Callable[[str], str]
) -> None:
    client = _client(live_gateway(emulate_tool_streams=False), new_key("acme"))
    with pytest.raises(openai.BadRequestError, match="not supported with function calling"):
        list(client.chat.completions.create(model=V3, messages=SEED_MESSAGES, tools=SEED_TOOLS, stream=True))


@pytest.mark.e2e
def test_a_stream_without_usage_is_counted_with_the_tokenizer_and_marked(
    live_gateway: Callable[..., ServerThread], new_key: Callable[[str], str], db_path: str
) -> None:
    client = _client(live_gateway(), new_key("acme"))
    chunks = list(
        client.chat.completions.create(
            model=V3, messages=SEED_MESSAGES, stream=True, extra_headers={"x-emulator-no-usage": "1"}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    from gateway.accounting.accountant import Accountant
    from gateway.accounting.registry import Registry

    expected = Accountant(Registry.load()).count_text(V3, text)
    (row,) = settled_rows(db_path)
    assert (row["estimated"], row["completion_tokens"], row["prompt_tokens"]) == (1, expected, 11)


def test_event_shapes_for_several_choices_and_usage() -> None:
    completion = {
        "id": "c1",
        "created": 5,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "x" * 70}, "finish_reason": "length"},
            {
                "index": 1,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "a",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"k": "' + "v" * 40 + '"}'},
                        },
                    ],
                },
                "finish_reason": "tool_calls",
            },
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
    events = [json.loads(e[6:]) for e in sse_events(completion, True)[:-1]]
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == "c1" for e in events)
    assert all("usage" in e for e in events) and events[-1] == {
        **events[-1],
        "choices": [],
        "usage": completion["usage"],
    }
    first = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["index"] == 0]
    assert "".join(c["delta"].get("content") or "" for c in first) == "x" * 70
    assert first[-1]["finish_reason"] == "length"
    second = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["index"] == 1]
    head = second[1]["delta"]["tool_calls"][0]
    assert (head["id"], head["function"]["name"], head["function"]["arguments"]) == ("a", "f", "")
    args = "".join(c["delta"]["tool_calls"][0]["function"]["arguments"] for c in second[2:-1])
    assert json.loads(args) == {"k": "v" * 40}
    assert sse_events(completion, False)[-1] == b"data: [DONE]\n\n"
