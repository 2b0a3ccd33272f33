"""Deterministic answers: the same request always gets the same answer.

- With tools (``tool_choice`` "auto") and a user message last: call the tool whose name and
  description share the most words with the message, arguments built from its schema (a string
  is the phrase after "in"/"for"/"of"/"about"; "A and B" gives two parallel calls).
- After tool results: an answer that quotes them. Never a second, nested call.
- Otherwise: a short text answer that echoes the question.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Answer", "ToolCall", "answer"]

_WORD = re.compile(r"[A-Za-z0-9]+")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
_PHRASE = re.compile(r"\b(?:in|for|of|about|at|on)\s+([^?.!,;]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass
class Answer:
    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"


def answer(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, tool_choice: str) -> Answer:
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        return Answer(content=_from_tool_results(messages))
    user = _last_user_text(messages)
    if tools and tool_choice != "none":
        tool = _choose(tools, user)
        return Answer(tool_calls=_calls(tool, user, messages))
    return Answer(
        content=f"You asked: {user.strip()} Here is a short, deterministic answer." if user else "Hello."
    )


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


def _words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(_CAMEL.sub(" ", text))}


def _choose(tools: list[dict[str, Any]], text: str) -> dict[str, Any]:
    wanted = _words(text)
    best, best_score = tools[0], -1
    for tool in tools:
        fn = tool.get("function", {})
        score = len(wanted & _words(f"{fn.get('name', '')} {fn.get('description', '')}"))
        if score > best_score:
            best, best_score = tool, score
    return best


def _calls(tool: dict[str, Any], text: str, messages: list[dict[str, Any]]) -> list[ToolCall]:
    fn = tool.get("function", {})
    schema = fn.get("parameters") or {}
    match = _PHRASE.search(text)
    phrase = match.group(1).strip() if match else text.strip() or "unknown"
    props = schema.get("properties") or {}
    string_required = [p for p in schema.get("required", []) if (props.get(p) or {}).get("type") == "string"]
    parts = [p.strip() for p in phrase.split(" and ")] if len(string_required) == 1 else [phrase]
    seed = hashlib.sha256(json.dumps(messages, sort_keys=True, default=str).encode()).hexdigest()
    calls = []
    for i, part in enumerate(p for p in parts if p):
        args = _arguments(schema, part, text)
        # 9 alphanumeric characters: what Mistral's tool format carries (vLLM truncates to it).
        call_id = hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:9]
        calls.append(ToolCall(call_id, str(fn.get("name", "tool")), json.dumps(args, ensure_ascii=False)))
    return calls


def _arguments(schema: dict[str, Any], phrase: str, text: str) -> dict[str, Any]:
    props: dict[str, Any] = schema.get("properties") or {}
    names = list(schema.get("required") or []) or list(props)[:1]
    return {name: _value(props.get(name) or {}, phrase, text) for name in names if isinstance(name, str)}


def _value(prop: dict[str, Any], phrase: str, text: str) -> Any:
    if prop.get("enum"):
        return prop["enum"][0]
    kind = prop.get("type", "string")
    number = _NUMBER.search(text)
    if kind == "integer":
        return int(float(number.group())) if number else 1
    if kind == "number":
        return float(number.group()) if number else 1.0
    if kind == "boolean":
        return True
    if kind == "array":
        return [_value(prop.get("items") or {}, phrase, text)]
    if kind == "object":
        return _arguments(prop, phrase, text)
    return phrase


def _from_tool_results(messages: list[dict[str, Any]]) -> str:
    results = []
    for m in reversed(messages):
        if m.get("role") != "tool":
            break
        results.append(_describe(m.get("content")))
    return "According to the tool results: " + "; ".join(reversed(results)) + "."


def _describe(content: Any) -> str:
    text = content if isinstance(content, str) else json.dumps(content)
    try:
        obj = json.loads(text)
    except ValueError:
        return text
    if isinstance(obj, dict):
        return ", ".join(f"{k} is {v}" for k, v in obj.items())
    return text
