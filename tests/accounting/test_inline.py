"""Long requests counted on the event loop while that stays cheap, in a thread otherwise."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from typing import Any

import pytest

from gateway.accounting import accountant as accountant_module
from gateway.accounting import inline
from gateway.accounting.accountant import OFFLOAD_BYTES, Accountant
from gateway.accounting.registry import Registry
from gateway.emulator.seed import SEED_TOOLS

V3 = "mistralai/Mistral-7B-Instruct-v0.3"
GPT4 = "gpt-4"
LLAMA = "meta-llama/Meta-Llama-3.1-8B-Instruct"  # a chat template: rendered whole, never inline


def test_spend_raises_past_the_budget_and_only_within_it() -> None:
    inline.spend(10**9)  # no budget set: no limit
    with inline.budget(100):
        inline.spend(60)
        inline.spend(40)
        with pytest.raises(inline.OverBudget):
            inline.spend(1)
    inline.spend(10**9)
    with pytest.raises(inline.OverBudget), inline.budget(5):
        inline.spend(6)
    inline.spend(10**9)  # the budget is gone after the block, however it ended


def test_the_budget_is_per_thread() -> None:
    errors: list[BaseException] = []

    def other() -> None:
        try:
            inline.spend(10**9)
        except BaseException as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    with inline.budget(0):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert errors == []


def _long_history(seed: int, turns: int = 40, chars: int = 1000) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    words = ["weather", "forecast", "Paris", "rain", "tomorrow", "umbrella", "wind", "the", "a", "is"]
    messages = []
    for i in range(turns):
        text = ""
        while len(text) < chars:
            text += rng.choice(words) + " "
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": "And now?"})
    return messages


def _size(messages: list[dict[str, Any]]) -> int:
    """The request body's size, as the proxy passes it."""
    return len(json.dumps({"model": V3, "messages": messages, "tools": SEED_TOOLS}))


class _Threads:
    """Records the counts ``acount`` hands to a worker thread."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = asyncio.to_thread

        async def to_thread(fn: Any, /, *args: Any) -> Any:
            self.calls += 1
            return await real(fn, *args)

        monkeypatch.setattr(accountant_module.asyncio, "to_thread", to_thread)


@pytest.mark.parametrize("model", [V3, GPT4])
def test_a_long_request_seen_before_is_counted_on_the_loop_and_exactly(
    monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    acc = Accountant(Registry.load())
    acc.count(model, [{"role": "user", "content": "warm the tokenizer up"}], None)
    threads = _Threads(monkeypatch)
    messages = _long_history(1)
    size = _size(messages)
    assert size > OFFLOAD_BYTES
    expected = Accountant(Registry.load()).count(model, messages, SEED_TOOLS)

    first = asyncio.run(acc.acount(model, messages, SEED_TOOLS, size))
    assert threads.calls == 1  # 40 KB the tokenizer has not seen: in a thread
    again = asyncio.run(acc.acount(model, messages, SEED_TOOLS, size))
    assert threads.calls == 1  # the same history again: counted on the loop
    # One more turn (2 KB new): still on the loop, and still exact.
    longer = [
        *messages,
        {"role": "assistant", "content": "x " * 1000},
        {"role": "user", "content": "y " * 20},
    ]
    grown = asyncio.run(acc.acount(model, longer, SEED_TOOLS, size + 2100))
    assert threads.calls == 1
    assert first == again == expected
    assert grown == Accountant(Registry.load()).count(model, longer, SEED_TOOLS)


def test_a_count_stopped_over_budget_starts_again_in_a_thread_and_is_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    acc = Accountant(Registry.load())
    acc.count(V3, [{"role": "user", "content": "warm the tokenizer up"}], None)
    messages = _long_history(2, turns=80)
    size = _size(messages)
    # Half of it seen before: the inline count gets part of the way, then runs out of budget.
    acc.count(V3, messages[: len(messages) // 2], None)
    threads = _Threads(monkeypatch)
    counted = asyncio.run(acc.acount(V3, messages, SEED_TOOLS, size))
    assert threads.calls == 1
    assert counted == Accountant(Registry.load()).count(V3, messages, SEED_TOOLS)


def test_many_messages_or_a_rendered_format_always_go_to_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    acc = Accountant(Registry.load())
    many = _long_history(3, turns=OFFLOAD_BYTES // inline.MESSAGE_COST + 1, chars=40)
    size = _size(many)
    acc.count(V3, many, None)  # every segment cached: still too many messages for the loop
    threads = _Threads(monkeypatch)
    asyncio.run(acc.acount(V3, many, None, size))
    assert threads.calls == 1

    messages = _long_history(4)
    size = _size(messages)
    acc.count(LLAMA, messages, SEED_TOOLS)
    asyncio.run(acc.acount(LLAMA, messages, SEED_TOOLS, size))
    assert threads.calls == 2  # a chat template renders the whole prompt first: no budget bounds it


def test_a_large_tool_list_not_seen_before_is_charged_before_it_is_rendered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway.accounting import mistral

    acc = Accountant(Registry.load())
    acc.count(V3, [{"role": "user", "content": "warm the tokenizer up"}], None)
    tools = [
        {"type": "function", "function": {"name": f"f{i}", "description": "d" * 400, "parameters": {}}}
        for i in range(100)
    ]
    messages = [{"role": "user", "content": "Which one?"}]
    expected = Accountant(Registry.load()).count(V3, messages, tools)
    rendered_on: list[int] = []
    real = mistral.tools_json

    def tools_json(tools: Any) -> str:
        rendered_on.append(threading.get_ident())
        return real(tools)

    monkeypatch.setattr(mistral, "tools_json", tools_json)
    threads = _Threads(monkeypatch)
    counted = asyncio.run(acc.acount(V3, messages, tools, OFFLOAD_BYTES + 1))
    assert threads.calls == 1
    # 40 KB of tools: rendered once, in the thread, never first on the loop.
    assert len(rendered_on) == 1 and rendered_on[0] != threading.get_ident()
    assert counted == expected


def test_count_inline_answers_what_acount_would_on_the_loop_and_nothing_where_it_needs_a_thread() -> None:
    """The proxy counts a request just written on the spot when this answers; else in a task."""
    acc = Accountant(Registry.load())
    short = [{"role": "user", "content": "What is the weather?"}]
    assert acc.count_inline(V3, short, SEED_TOOLS, 300) is None  # its tokenizer to load: a thread
    acc.count(V3, [{"role": "user", "content": "warm the tokenizer up"}], None)
    assert acc.count_inline(V3, short, SEED_TOOLS, 300) == acc.count(V3, short, SEED_TOOLS)
    messages = _long_history(5)
    assert acc.count_inline(V3, messages, SEED_TOOLS, _size(messages)) is None  # 40 KB unseen
    acc.count(V3, messages, SEED_TOOLS)
    assert acc.count_inline(V3, messages, SEED_TOOLS, _size(messages)) == acc.count(V3, messages, SEED_TOOLS)


def test_acount_goes_to_a_thread_at_once_when_the_caller_tried_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    acc = Accountant(Registry.load())
    acc.count(V3, [{"role": "user", "content": "warm the tokenizer up"}], None)
    threads = _Threads(monkeypatch)
    short = [{"role": "user", "content": "What is the weather?"}]
    asyncio.run(acc.acount(V3, short, SEED_TOOLS, 300))
    assert threads.calls == 0
    counted = asyncio.run(acc.acount(V3, short, SEED_TOOLS, 300, tried_inline=True))
    assert threads.calls == 1 and counted == acc.count(V3, short, SEED_TOOLS)
