"""Bounds: what a format's ``count`` can never exceed, found without the tokenizer.

A budgeted request holds its bound while the exact count runs beside the backend's work; a
bound below the count would admit what the budget refuses. So each bound is checked against
the real count over every tokenizer the registry ships and over generated conversations.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
from typing import Any

import pytest

from gateway.accounting.accountant import Accountant
from gateway.accounting.registry import Registry
from gateway.accounting.tool_memo import keyed
from gateway.accounting.types import text_bound
from tests.accounting import conversations as conv
from tests.conftest import CORPUS

# Models of every format that has a bound (v1 text tools, v3 on sentencepiece and on tekken,
# v7) and one of each format that has none.
BOUNDED = [
    "mistralai/Mistral-7B-Instruct-v0.1",
    "mistralai/Mistral-7B-Instruct-v0.3",
    "mistralai/Mistral-Nemo-Instruct-2407",
    "mistralai/Mistral-Large-Instruct-2411",
    "test/mistral-v2",
]
UNBOUNDED = ["meta-llama/Llama-3.3-70B-Instruct", "gpt-4"]

# Characters whose compatibility forms expand (a normalizing tokenizer would beat the bound
# with them), combining marks, emoji, control characters, whitespace runs.
AWKWARD = ["\ufdfa", "\u333b", "\ufb01", "\ufb03" * 10, "\u2163", "a\u0301", "\x00\x01\x7f", "ǅ" * 8]
AWKWARD += ["\U0001f600" * 5, "  lots   of   space ", "\n\n\n", "\t \t", "<s>[INST]</s>", "[/INST]", " "]


@pytest.fixture(scope="module")
def accountant() -> Accountant:
    v2 = {"match": "test/mistral-v2", "tokenizer": "v2", "format": "mistral-v2"}
    v2_file = "mistral_common:data/mistral_instruct_tokenizer_240216.model.v2"
    operator: dict[str, Any] = {
        "tokenizers": {"v2": {"kind": "sentencepiece", "file": v2_file}},
        "models": [v2],
    }
    registry = Registry.load(operator=operator)
    registry.warm()
    return Accountant(registry)


@functools.cache
def _texts() -> list[str]:
    rng = random.Random(3)
    lines = CORPUS.read_text().splitlines()[:400]
    texts = [json.loads(line)["function"]["description"] for line in lines]
    texts += lines[:50]  # JSON itself: punctuation-dense
    texts += AWKWARD + conv.SYSTEMS + conv.USERS + conv.ANSWERS
    planes = [(0x20, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    for _ in range(600):
        picks = [rng.choice(planes) for _ in range(rng.randint(1, 40))]
        texts.append("".join(chr(rng.randint(lo, hi)) for lo, hi in picks))
    return texts


def test_no_tokenizer_makes_more_tokens_than_the_text_bound(accountant: Accountant) -> None:
    profiles = [accountant.profile(model)[0] for model in BOUNDED + UNBOUNDED]
    encoders = {p.tokenizer: getattr(p.format, "encoder") for p in profiles}  # noqa: B009
    assert len(encoders) == 7  # sentencepiece v1, v2, v3, v7; tekken; tiktoken llama3, cl100k
    for name, encoder in encoders.items():
        for text in _texts():
            assert encoder.count(text) <= text_bound(text), (name, text)


def _text_conversation(rng: random.Random) -> list[dict[str, Any]]:
    """Text turns only, in any order: runs of one role, system messages anywhere, none first."""
    texts = _texts()
    messages: list[dict[str, Any]] = []
    for _ in range(rng.randint(1, 12)):
        role = rng.choice(["user", "user", "assistant", "system"])
        content: str | None = rng.choice(texts)
        if role == "user" and rng.random() < 0.1:
            content = rng.choice([None, ""])
        messages.append({"role": role, "content": content})
    return messages


@pytest.mark.parametrize("model", BOUNDED)
def test_a_bound_is_never_below_the_count(accountant: Accountant, model: str) -> None:
    rng = random.Random(model)
    checked = 0
    for i in range(300):
        messages = _text_conversation(rng)
        tools = keyed(conv.tools(rng, rng.randint(0, 6))) if i % 3 else None
        if i % 2:
            with contextlib.suppress(ValueError):  # half the tool lists are remembered already
                accountant.count(model, messages, tools)
        bound = accountant.bound(model, messages, tools)
        assert bound is not None, messages
        try:
            counted = accountant.count(model, messages, tools).prompt_tokens
        except ValueError:
            continue  # a conversation the format refuses: the proxy's demand covers it otherwise
        assert counted <= bound, (model, messages, tools)
        checked += 1
    assert checked > 200


def test_the_bound_is_a_few_times_the_count_for_prose(accountant: Accountant) -> None:
    """Loose (bytes for tokens) but not useless: a prose request holds about four times its count."""
    model = "mistralai/Mistral-7B-Instruct-v0.3"
    lines = CORPUS.read_text().splitlines()
    text = " ".join(json.loads(line)["function"]["description"] for line in lines[:200])
    messages = [{"role": "user", "content": text}]
    counted = accountant.count(model, messages, None).prompt_tokens
    bound = accountant.bound(model, messages, None)
    assert bound is not None and counted < bound < 8 * counted


@pytest.mark.parametrize(
    "message",
    [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "a", "function": {"name": "f"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "{}"},
        {"role": "user", "content": [{"type": "text", "text": "parts"}]},
        {"role": "developer", "content": "an unknown role"},
    ],
)
def test_no_bound_where_the_count_re_serializes_or_refuses(accountant: Accountant, message: Any) -> None:
    """Tool calls and results are counted as re-serialized JSON (numbers can grow: 1e15 is
    1000000000000000.0): those requests are counted before they are forwarded, as before."""
    messages = [{"role": "user", "content": "hi"}, message]
    for model in BOUNDED:
        assert accountant.bound(model, messages, None) is None


def test_no_bound_for_formats_without_one(accountant: Accountant) -> None:
    messages = [{"role": "user", "content": "hi"}]
    for model in UNBOUNDED:
        assert accountant.bound(model, messages, None) is None
    assert accountant.bound("no/such-model", messages, None) is None


def test_a_bound_waits_for_the_tokenizer_and_is_then_looked_up_once_per_model() -> None:
    """Every budgeted request asks for its model's bound before it is forwarded: the lookup
    (registry entry, profile, format) is made once per model, and only once the tokenizer is
    loaded. Before, there is no bound (the request is counted first, off the loop), and that
    answer is not kept."""
    registry = Registry.load()
    accountant = Accountant(registry)
    model, messages = BOUNDED[0], [{"role": "user", "content": "hi"}]
    assert accountant.bound(model, messages, None) is None  # its tokenizer is not loaded yet
    registry.warm([model])
    looked: list[str] = []
    profile = accountant.profile
    accountant.profile = lambda name: looked.append(name) or profile(name)  # type: ignore[method-assign]
    bounds = [accountant.bound(model, [{"role": "user", "content": "hi" * n}], None) for n in (1, 50)]
    assert looked == [model]
    expected = Accountant(registry).bound  # a fresh one, whose lookups are all its own
    assert bounds == [expected(model, [{"role": "user", "content": "hi" * n}], None) for n in (1, 50)]
    assert bounds[0] is not None and bounds[1] is not None and bounds[1] > bounds[0]
    registry.warm([UNBOUNDED[1]])
    assert accountant.bound(UNBOUNDED[1], messages, None) is None  # a format without one
    assert accountant.bound(UNBOUNDED[1], messages, None) is None
    assert looked == [model, UNBOUNDED[1]]
