"""Request checks: the backend's documented limits up front, absurd tools refused clearly."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.errors import InvalidRequest
from gateway.validation import ChatRules, max_tokens, with_member
from tests.conftest import SEED_MESSAGES, SEED_TOOLS


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": SEED_MESSAGES, "tools": SEED_TOOLS, **extra}


@pytest.mark.parametrize("choice", ["auto", "none"])
def test_documented_tool_choices_pass(choice: str) -> None:
    assert ChatRules().check(_body(tool_choice=choice))[1] == SEED_TOOLS


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "x"}}, None, 3])
def test_other_tool_choices_are_refused_saying_what_is_allowed(choice: Any) -> None:
    with pytest.raises(InvalidRequest, match="use 'auto' or 'none'") as info:
        ChatRules().check(_body(tool_choice=choice))
    assert info.value.code == "unsupported_tool_choice" and info.value.param == "tool_choice"
    assert ChatRules(tool_choices=None).check(_body(tool_choice=choice))  # a backend without the limit


def test_too_many_tools_and_absurd_nesting() -> None:
    with pytest.raises(InvalidRequest, match="Too many tools: 3; this gateway accepts at most 2"):
        ChatRules(max_tools=2).check(_body(tools=SEED_TOOLS * 3))
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(100):
        deep = {"type": "object", "properties": {"x": deep}}
    tool = {"type": "function", "function": {"name": "f", "parameters": deep}}
    with pytest.raises(InvalidRequest, match="nests deeper than 32 levels"):
        ChatRules().check(_body(tools=[tool]))


@pytest.mark.parametrize(
    ("tool", "message"),
    [
        ({"type": "function"}, "'function' object"),
        ({"function": {"name": ""}}, "non-empty string 'name'"),
        ({"function": {"name": 5}}, "non-empty string 'name'"),
        ({"function": {"name": "f", "parameters": [1]}}, "parameters must be an object"),
        ("not a tool", "'function' object"),
    ],
)
def test_malformed_tools(tool: Any, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        ChatRules().check(_body(tools=[tool]))


@pytest.mark.parametrize("value", [-1, 1.5, "10", True])
def test_max_tokens_must_be_a_non_negative_integer(value: Any) -> None:
    with pytest.raises(InvalidRequest, match="non-negative integer"):
        max_tokens({"max_tokens": value})
    assert max_tokens({"max_completion_tokens": 7, "max_tokens": 9}) == 7


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "messages": [{"role": "user", "content": "caf\\u00e9 \xc3\xa9"}]}',
        b"  \n{ }",
        b"{}",
        b'{"nested": {"max_tokens": 1}, "text": "\\"max_tokens\\": 2"}',  # inside: not a member
        b'{"max_tokens": null, "model": "m"}',
        b'{"max\\u005ftokens": null, "model": "m"}',  # the same member, spelt with an escape
        b'{"max_tokens": 5, "max_tokens": null}',  # a duplicate: the last one counts
    ],
)
def test_with_member_adds_one_member_and_keeps_the_rest_byte_for_byte(body: bytes) -> None:
    members = json.loads(body)
    out = with_member(body, "max_tokens", 64, members)
    if "max_tokens" in members:
        assert out is None  # a second max_tokens would be the one the backend reads (null)
        return
    assert out is not None
    assert json.loads(out) == {"max_tokens": 64, **json.loads(body)}
    assert out.replace(b'"max_tokens":64', b"").replace(b"{,", b"{") == body


def test_with_member_declines_what_it_cannot_splice_safely() -> None:
    assert with_member('{"a": 1}'.encode("utf-16"), "max_tokens", 1, {"a"}) is None
    assert with_member(b'\xef\xbb\xbf{"a": 1}', "max_tokens", 1, {"a"}) is None  # BOM
    for encoding in ("utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"):  # no BOM: NUL bytes
        assert with_member(' {"a": 1}'.encode(encoding), "max_tokens", 1, {"a"}) is None


def test_schema_depth_is_measured_exactly_up_to_the_cap() -> None:
    """The depth check (level by level, containers only) against a plain recursive reference."""
    import random

    from gateway.validation import _depth

    def reference(value: Any) -> int:
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            return 1 + max(map(reference, value), default=0)
        return 0

    rng = random.Random(5)

    def nest(budget: int) -> Any:
        if budget == 0 or rng.random() < 0.25:
            return rng.choice([1, "s", None, True, [], {}])
        kids = [nest(budget - 1) for _ in range(rng.randint(0, 3))]
        return kids if rng.random() < 0.5 else {str(i): kid for i, kid in enumerate(kids)}

    for _ in range(2000):
        value = nest(rng.randint(0, 40))
        for cap in (1, 2, 5, 33):
            assert _depth(value, cap) == min(reference(value), cap)


def test_a_tool_list_that_passed_is_not_walked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    import copy

    from gateway import validation

    walks: list[Any] = []
    real = validation._depth

    def depth(value: Any, cap: int) -> int:
        walks.append(value)
        return real(value, cap)

    monkeypatch.setattr(validation, "_depth", depth)
    rules = ChatRules()
    rules.check(_body())
    rules.check(_body(tools=copy.deepcopy(SEED_TOOLS)))  # a new request's objects, the same tools
    assert len(walks) == len(SEED_TOOLS)
    # Anything else is walked and judged afresh: one nesting level more is refused.
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(15):
        deep = {"type": "object", "properties": {"x": deep}}  # 31 levels

    def tool(parameters: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]

    rules.check(_body(tools=tool({"p": deep})))  # 32: the most allowed
    with pytest.raises(InvalidRequest, match="nests deeper than 32 levels"):
        rules.check(_body(tools=tool({"p": {"q": deep}})))
    with pytest.raises(InvalidRequest, match="non-empty string 'name'"):
        rules.check(_body(tools=[{"type": "function", "function": {"name": ""}}]))
    # What orjson cannot write (an integer json read beyond 64 bits) is walked every time.
    big = [{"type": "function", "function": {"name": "f", "parameters": {"default": 2**70}}}]
    before = len(walks)
    rules.check(_body(tools=big))
    rules.check(_body(tools=big))
    assert len(walks) == before + 2


@pytest.mark.parametrize(
    ("messages", "index"),
    [
        ([{"role": "user"}, {"role": "assistant"}, "text"], 2),
        ([{"role": "user"}, {"role": 3}], 1),
        ([{"content": "no role"}], 0),
        ([{"role": "user"}, {"role": ["user"]}, None], 1),
    ],
)
def test_each_message_needs_an_object_with_a_string_role(messages: list[Any], index: int) -> None:
    with pytest.raises(InvalidRequest, match=rf"messages\[{index}\] must be an object with a string 'role'"):
        ChatRules().check({"messages": messages})


def test_messages_of_a_dict_subclass_pass() -> None:
    from collections import OrderedDict

    messages = [OrderedDict(role="user", content="hi")]
    assert ChatRules().check({"messages": messages}) == (messages, None)
