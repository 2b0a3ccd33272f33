"""Mistral formats are exact against Mistral's official encoder (mistral-common), token for token."""

from __future__ import annotations

import random
from typing import Any

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from gateway.accounting.accountant import Accountant
from gateway.accounting.encoders import resolve_file
from gateway.accounting.registry import Registry
from tests.accounting import conversations as conv
from tests.conftest import SEED_MESSAGES, SEED_TOOLS

CASES = {
    "mistralai/Mistral-7B-Instruct-v0.3": "mistral_instruct_tokenizer_240323.model.v3",
    "mistralai/Mixtral-8x22B-Instruct-v0.1": "mistral_instruct_tokenizer_240323.model.v3",
    "mistralai/Mistral-Nemo-Instruct-2407": "tekken_240718.json",
    "mistralai/Mistral-Large-Instruct-2411": "mistral_instruct_tokenizer_241114.model.v7",
}
V2_FILE = "mistral_instruct_tokenizer_240216.model.v2"


@pytest.fixture(scope="module")
def accountant() -> Accountant:
    v2 = {"match": "test/mistral-v2", "tokenizer": "v2", "format": "mistral-v2"}
    operator: dict[str, Any] = {
        "tokenizers": {"v2": {"kind": "sentencepiece", "file": f"mistral_common:data/{V2_FILE}"}},
        "models": [v2],
    }
    return Accountant(Registry.load(operator=operator))


_ORACLES: dict[str, Any] = {}


def oracle(model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    file = V2_FILE if model == "test/mistral-v2" else CASES[model]
    if file not in _ORACLES:
        path = resolve_file(f"mistral_common:data/{file}")
        _ORACLES[file] = MistralTokenizer.from_file(str(path), mode=ValidationMode.test)
    request = ChatCompletionRequest.from_openai(messages, tools=tools)
    return len(_ORACLES[file].encode_chat_completion(request).tokens)


@pytest.mark.parametrize("model", [*CASES, "test/mistral-v2"])
def test_zero_difference_over_generated_conversations(accountant: Accountant, model: str) -> None:
    rng = random.Random(model)
    checked = 0
    for _ in range(120):
        tools = conv.tools(rng, rng.choice([0, 1, 4, 12, 32])) or None
        # v2 allows one tool result per assistant turn
        messages = conv.conversation(rng, tools, parallel=model != "test/mistral-v2")
        want = oracle(model, messages, tools)
        got = accountant.count(model, messages, tools)
        assert got.prompt_tokens == want, (model, messages, tools)
        if tools:
            assert got.tool_tokens == want - oracle(model, messages, None)
        else:
            assert got.tool_tokens == 0
        assert got.exact
        checked += 1
    assert checked == 120


@pytest.mark.parametrize(
    ("model", "without", "with_tools"),
    [
        ("mistralai/Mistral-7B-Instruct-v0.3", 11, 95),
        ("mistralai/Mistral-Nemo-Instruct-2407", 11, 92),
    ],
)
def test_measured_facts_from_the_design_notes(
    accountant: Accountant, model: str, without: int, with_tools: int
) -> None:
    assert accountant.count(model, SEED_MESSAGES, None).prompt_tokens == without
    counted = accountant.count(model, SEED_MESSAGES, SEED_TOOLS)
    assert (counted.prompt_tokens, counted.tool_tokens) == (with_tools, with_tools - without)


def test_tools_block_is_counted_once_then_cached(accountant: Accountant) -> None:
    model = "mistralai/Mistral-7B-Instruct-v0.3"
    encoder: Any = accountant.registry.profile(model).format.encoder  # type: ignore[union-attr]
    calls: list[str] = []
    inner_count = encoder.inner.count

    def spy(text: str) -> int:
        calls.append(text)
        return int(inner_count(text))

    encoder.inner.count = spy
    try:
        tools = conv.tools(random.Random(7), 8)
        first = accountant.count(model, SEED_MESSAGES, tools)
        followup = [
            *SEED_MESSAGES,
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": "again"},
        ]
        second = accountant.count(model, followup, tools)
    finally:
        del encoder.inner.count
    assert len([t for t in calls if t.startswith('[{"type": "function"')]) == 1
    assert first.tool_tokens == second.tool_tokens


def test_v1_is_an_estimate_with_text_tools(accountant: Accountant) -> None:
    counted = accountant.count("mistralai/Mistral-7B-Instruct-v0.1", SEED_MESSAGES, SEED_TOOLS)
    assert not counted.exact and counted.tool_tokens > 0
    assert accountant.count("mistralai/Mistral-7B-Instruct-v0.1", SEED_MESSAGES, None).prompt_tokens == 16
