"""Llama 3.1/3.3 JSON tool calling: exact against the published chat template as transformers
renders it, tokenized by Meta's own tokenizer code (llama-models)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from llama_models.llama3.tokenizer import Tokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from gateway.accounting.accountant import Accountant
from gateway.accounting.registry import Registry
from tests.accounting import conversations as conv
from tests.conftest import SEED_MESSAGES, SEED_TOOLS

TEMPLATE = (
    Path(__file__).resolve().parents[2] / "tokenizers" / "templates" / "llama3.1-json-tools.jinja"
).read_text()
MODELS = [
    "meta-llama/Meta-Llama-3.1-8B-Instruct",
    "meta-llama/Meta-Llama-3.1-70B-Instruct",
    "meta-llama/Llama-3.3-70B-Instruct",
]


@pytest.fixture(scope="module")
def accountant() -> Accountant:
    return Accountant(Registry.load())


def oracle(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    # vLLM hands the template tool-call arguments as objects, not JSON strings.
    prepared = json.loads(json.dumps(messages))
    for m in prepared:
        for call in m.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    rendered, _ = render_jinja_template(
        [prepared],
        tools=tools,
        chat_template=TEMPLATE,
        add_generation_prompt=True,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
    )
    text = rendered[0]
    return len(Tokenizer.get_instance().encode(text, bos=False, eos=False, allowed_special="all"))


def test_measured_facts_from_the_design_notes(accountant: Accountant) -> None:
    counted = accountant.count(MODELS[0], SEED_MESSAGES, SEED_TOOLS)
    assert (counted.prompt_tokens, counted.tool_tokens) == (202, 159)
    assert accountant.count(MODELS[0], SEED_MESSAGES, None).prompt_tokens == 43
    assert oracle(SEED_MESSAGES, SEED_TOOLS) == 202


@pytest.mark.parametrize("model", MODELS)
def test_zero_difference_over_generated_conversations(accountant: Accountant, model: str) -> None:
    rng = random.Random(model)
    for _ in range(60):
        tools = conv.tools(rng, rng.choice([0, 1, 4, 12, 32])) or None
        messages = conv.conversation(rng, tools, parallel=False)
        want = oracle(messages, tools)
        got = accountant.count(model, messages, tools)
        assert got.prompt_tokens == want, (messages, tools)
        assert got.tool_tokens == (want - oracle(messages, None) if tools else 0)
        assert got.exact
