"""The tool memo: what a format derives from the tools, computed once per distinct tool list."""

from __future__ import annotations

import copy
import random

import pytest

from gateway.accounting.accountant import Accountant
from gateway.accounting.mistral import tools_json
from gateway.accounting.registry import Registry
from gateway.accounting.tool_memo import ToolMemo
from gateway.accounting.types import FormatError, Tools
from gateway.emulator.seed import SEED_MESSAGES, SEED_TOOLS
from tests.accounting import conversations as conv


def counting(derive=len):  # type: ignore[no-untyped-def]
    calls: list[Tools] = []

    def spy(tools: Tools) -> int:
        calls.append(tools)
        return int(derive(tools))

    return spy, calls


def test_equal_tools_are_derived_once_whatever_the_objects() -> None:
    spy, calls = counting(lambda tools: len(tools_json(tools)))
    memo = ToolMemo(spy)
    first = memo(SEED_TOOLS)
    again = memo(copy.deepcopy(SEED_TOOLS))  # a new request's objects, the same tools
    assert first == again == len(tools_json(SEED_TOOLS))
    assert len(calls) == 1


def test_different_tools_get_their_own_value() -> None:
    spy, calls = counting(lambda tools: len(tools_json(tools)))
    memo = ToolMemo(spy)
    rng = random.Random(3)
    lists = [conv.tools(rng, n) for n in (1, 2, 3, 5, 8)]
    for tools in lists:
        assert memo(tools) == len(tools_json(tools))
    changed = copy.deepcopy(lists[0])
    changed[0]["function"]["description"] = str(changed[0]["function"].get("description")) + "!"
    assert memo(changed) == len(tools_json(changed))
    assert len(calls) == len(lists) + 1


def test_errors_are_raised_every_time_and_never_kept() -> None:
    def derive(tools: Tools) -> int:
        raise FormatError("every tool needs a 'function' object")

    memo = ToolMemo(derive)
    for _ in range(2):
        with pytest.raises(FormatError):
            memo([{"type": "function"}])
    assert len(memo) == 0


def test_bounded_and_keep_decides_what_is_worth_keeping() -> None:
    memo = ToolMemo(lambda tools: "x" * len(tools), size=3, keep=lambda text: len(text) <= 2)
    for n in range(1, 6):
        memo([{"n": i} for i in range(n)])
    assert len(memo) == 2  # lists of 1 and 2 tools; the longer values were not kept
    small = ToolMemo(lambda tools: len(tools), size=3)
    for n in range(10):
        small([{"n": n}])
    assert len(small) == 3


def test_tools_orjson_cannot_encode_are_derived_without_a_key() -> None:
    spy, calls = counting()
    memo = ToolMemo(spy)
    huge = [{"type": "function", "function": {"name": "f", "parameters": {"default": 2**70}}}]
    assert memo(huge) == memo(huge) == 1
    assert len(calls) == 2 and len(memo) == 0


@pytest.mark.parametrize(
    "model", ["mistralai/Mistral-7B-Instruct-v0.1", "mistralai/Mistral-7B-Instruct-v0.3", "gpt-4"]
)
def test_counts_through_the_memo_equal_fresh_counts(model: str) -> None:
    """Counted again with the format's memos emptied, every request gets the same figures."""
    accountant, rng = Accountant(Registry.load()), random.Random(11)
    profile = accountant.registry.profile(model)
    assert profile is not None
    memos = [m for m in vars(profile.format).values() if isinstance(m, ToolMemo)]
    assert memos, f"{profile.format_name} has no tool memo"
    followup = [*SEED_MESSAGES, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and?"}]
    for _ in range(20):
        tools = conv.tools(rng, rng.randint(1, 6))
        for messages in (SEED_MESSAGES, followup):
            through_memo = accountant.count(model, copy.deepcopy(messages), copy.deepcopy(tools))
            for memo in memos:
                memo.clear()
            assert accountant.count(model, messages, tools) == through_memo


def test_a_keyed_list_is_serialized_once_for_every_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks' memo and the format's meet the same request: one serialization between them."""
    from gateway.accounting import tool_memo

    serialized: list[Tools] = []
    real = tool_memo._key

    def spying(tools: Tools) -> tuple[int, int] | None:
        serialized.append(tools)
        return real(tools)

    monkeypatch.setattr(tool_memo, "_key", spying)
    spy, calls = counting(lambda tools: len(tools_json(tools)))
    first, second = ToolMemo(spy), ToolMemo(lambda tools: "checked")
    tools = tool_memo.keyed(copy.deepcopy(SEED_TOOLS))
    assert tool_memo.keyed(tools) is tools
    assert second(tools) == "checked" and first(tools) == len(tools_json(SEED_TOOLS))
    assert len(serialized) == 1
    # The same entry as the plain list's (a request that was not keyed, e.g. an older caller).
    assert first(copy.deepcopy(SEED_TOOLS)) == len(tools_json(SEED_TOOLS)) and len(calls) == 1
    assert len(serialized) == 2


def test_chat_checks_hand_the_format_keyed_tools() -> None:
    from gateway.accounting.tool_memo import KeyedTools
    from gateway.validation import ChatRules

    _, tools = ChatRules().check({"messages": SEED_MESSAGES, "tools": copy.deepcopy(SEED_TOOLS)})
    assert type(tools) is KeyedTools and tools == SEED_TOOLS and tools.key is not None
