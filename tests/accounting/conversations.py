"""Generated chat requests over the Seal-Tools corpus: many tools, multi-turn, odd content."""

from __future__ import annotations

import json
import random
import re
import string
from typing import Any

from tests.conftest import CORPUS

_LINES = CORPUS.read_text().splitlines()

SYSTEMS = [
    "Be brief.",
    "Tu es un assistant serviable. Réponds en français. Ünïcödé ✓ 日本語 🚀",
    "  Leading and trailing spaces.  ",
    "Line one\nLine two\n\nLine four\ttab",
]
USERS = [
    "What is the weather in Paris?",
    "Analyze the DNA sample from the crime scene, priority 2.",
    "Résumé 😀 please: \"quoted\" and 'single' and \\backslash",
    "  spaced  out  ",
    "日本の天気はどうですか?",
    'Call the tool with {"json": [1, 2, 3]} inside.',
]
RESULTS = [
    '{"temperature": 60, "unit": "F"}',
    "plain text result",
    "[1, 2.5, null, true]",
    '{"nested": {"a": [{"b": "ü"}]}}',
    "",
]
ANSWERS = ["Done.", "The result is 42.  ", "Voilà — c'est fait ✓"]


def odd_tool(rng: random.Random) -> dict[str, Any]:
    """A tool with an unusual schema: nested objects, enums, arrays, no description, unicode."""
    return {
        "type": "function",
        "function": {
            "name": "odd_" + "".join(rng.choice(string.ascii_lowercase) for _ in range(6)),
            "description": rng.choice(["", "Ünïcödé tool ✓.", 'Line\nbreaks\tand "quotes"']),
            "parameters": {
                "type": "object",
                "properties": {
                    "mode": {"type": "string", "enum": ["fast", "slow", "légère"]},
                    "filters": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"k": {"type": "string"}, "v": {"type": "number"}},
                        },
                    },
                    "deep": {
                        "type": "object",
                        "properties": {
                            "a": {"type": "object", "properties": {"b": {"type": "integer", "minimum": 0}}}
                        },
                    },
                },
                "required": ["mode"],
            },
        },
    }


# Mistral's encoder refuses function names outside this pattern (a few corpus tools have dots).
_MISTRAL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_VALID = [line for line in _LINES if _MISTRAL_NAME.match(json.loads(line)["function"]["name"])]


def tools(rng: random.Random, n: int) -> list[dict[str, Any]]:
    chosen = [json.loads(rng.choice(_VALID)) for _ in range(n)]
    if n and rng.random() < 0.3:
        chosen.append(odd_tool(rng))
    return chosen


def call_id(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(9))


def conversation(
    rng: random.Random,
    tool_list: list[dict[str, Any]] | None,
    *,
    parallel: bool = True,
    end_with_tool: bool | None = None,
) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    turns = rng.randint(1, 3)
    for turn in range(turns):
        messages.append({"role": "user", "content": rng.choice(USERS)})
        last = turn == turns - 1
        wants_tool = end_with_tool if (last and end_with_tool is not None) else rng.random() < 0.6
        if tool_list and wants_tool and not (last and end_with_tool is False):
            n = rng.randint(1, 3) if parallel else 1
            ids = [call_id(rng) for _ in range(n)]
            calls = []
            for cid in ids:
                fn = rng.choice(tool_list)["function"]
                args = {
                    k: rng.choice(["x", 1, 2.5, True, "ü"])
                    for k in list((fn.get("parameters") or {}).get("properties", {}))[:3]
                }
                calls.append(
                    {
                        "id": cid,
                        "type": "function",
                        "function": {"name": fn["name"], "arguments": json.dumps(args)},
                    }
                )
            messages.append({"role": "assistant", "content": None, "tool_calls": calls})
            for cid in ids:
                messages.append({"role": "tool", "tool_call_id": cid, "content": rng.choice(RESULTS)})
            if not last:
                messages.append({"role": "assistant", "content": rng.choice(ANSWERS)})
        elif not last:
            messages.append({"role": "assistant", "content": rng.choice(ANSWERS)})
    return messages
