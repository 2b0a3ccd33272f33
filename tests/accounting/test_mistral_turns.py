"""Mistral's merging of messages into turns, against a plain restatement of the rules.

The one-pass ``_aggregate`` runs on every request over the whole resent history; this checks it
turn for turn against the rules written the obvious way (message by message, a run flushed
when the role changes), over random sequences with runs of every role, system messages
anywhere, empty and list contents, and a conversation that does not start with a user."""

from __future__ import annotations

import random
from typing import Any

import pytest

from gateway.accounting.mistral import JOIN, _aggregate
from gateway.accounting.types import FormatError, text_of


def reference(
    messages: list[dict[str, Any]], keep_system: bool
) -> tuple[list[tuple[Any, ...]], str | None, int]:
    turns: list[tuple[Any, ...]] = []
    system: list[str] = []
    run: list[dict[str, Any]] = []

    def flush() -> None:
        if not run:
            return
        role = run[0]["role"]
        if role in ("user", "assistant"):
            texts = [text_of(m.get("content")) for m in run]
            calls = [c for m in run for c in (m.get("tool_calls") or [])]
            turns.append((role, JOIN.join(t for t in texts if t), calls, None))
        elif role == "tool":
            turns.extend(("tool", text_of(m.get("content")), [], m.get("tool_call_id")) for m in run)
        elif keep_system:
            turns.extend(("system", text_of(m.get("content")), [], None) for m in run)
        run.clear()

    for message in messages:
        role = message.get("role")
        if role not in ("user", "assistant", "tool", "system"):
            raise FormatError(f"unsupported message role {role!r}")
        if role == "system" and text_of(message.get("content")):
            system.append(text_of(message.get("content")))
        if run and run[0]["role"] != role:
            flush()
        run.append(message)
    flush()
    if not turns or (not keep_system and turns[0][0] != "user"):
        turns.insert(0, ("user", "", [], None))
    last_user = max((i for i, t in enumerate(turns) if t[0] == "user"), default=-1)
    return turns, (JOIN.join(system) if system else None), last_user


def _message(rng: random.Random) -> dict[str, Any]:
    role = rng.choice(["user", "user", "assistant", "assistant", "tool", "system"])
    content = rng.choice(
        ["hello", "", None, [{"type": "text", "text": "part"}, {"type": "text", "text": "two"}]]
    )
    message: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant" and rng.random() < 0.3:
        message["tool_calls"] = [
            {"id": f"c{rng.randint(0, 99)}", "function": {"name": "f", "arguments": "{}"}}
        ]
    if role == "tool":
        message["tool_call_id"] = f"c{rng.randint(0, 99)}"
    return message


@pytest.mark.parametrize("keep_system", [False, True])
def test_turns_match_the_rules_over_random_sequences(keep_system: bool) -> None:
    rng = random.Random(7)
    for _ in range(3000):
        messages = [_message(rng) for _ in range(rng.randint(0, 9))]
        turns, system, last_user = _aggregate(messages, keep_system)
        got = [(t.role, t.content, list(t.calls), t.tool_call_id) for t in turns]
        assert (got, system, last_user) == reference(messages, keep_system), messages


def test_an_unknown_role_is_refused_wherever_it_stands() -> None:
    for messages in ([{"role": "robot"}], [{"role": "user"}, {"role": "user"}, {"role": "developer"}]):
        with pytest.raises(FormatError, match="unsupported message role"):
            _aggregate(messages, False)


def test_a_role_that_is_not_text_is_refused_by_name() -> None:
    with pytest.raises(FormatError, match=r"unsupported message role \['user'\]"):
        _aggregate([{"role": "user"}, {"role": ["user"]}], True)
