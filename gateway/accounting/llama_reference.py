"""Meta's reference prompt for Llama 3.1 JSON tool calling (llama-models' ``ChatFormat``).

The second Llama format, for backends that run Meta's reference code rather than the Hugging
Face template: the system message says "Environment: ipython" when tools are present and
carries the dates (today as ``%d %B %Y``) and the caller's system text; the tools follow as a
user message of their own, in Meta's JSON layout (each parameter an "object" in a list);
tool calls are ``<|python_tag|>`` plus ``{"type": "function", "name", "parameters"}``; tool
results come under an ``ipython`` header. Every piece is tokenized on its own, as the
reference encoder does.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Callable
from typing import Any

from gateway.accounting.encoders import Encoder
from gateway.accounting.types import Count, FormatError, Messages, Tools, text_of

__all__ = ["LlamaReferenceFormat"]

_PREAMBLE = (
    "Answer the user's question by making use of the following functions if needed.\n"
    "If none of the function can be used, please say so.\n"
    "Here is a list of functions in JSON format:\n"
)
_CLOSING = "\nReturn function calls in JSON format."


def _jinja_tojson(value: Any) -> str:
    """Jinja's own ``tojson`` (the reference renders with plain Jinja): sorted, ASCII, HTML-safe."""
    text = json.dumps(value, sort_keys=True)
    return (
        text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("'", "\\u0027")
    )


def tools_prompt(tools: Tools) -> str:
    parts = [_PREAMBLE]
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict):
            raise FormatError("every tool needs a 'function' object")
        schema = fn.get("parameters") or {}
        props: dict[str, Any] = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        params = []
        for name, prop in props.items():
            desc = prop.get("description") if isinstance(prop, dict) else None
            params.append(
                "\n                {\n"
                f'                    "{name}": {{\n'
                '                        "type": "object",\n'
                f'                        "description": "{desc}"\n'
                "                    }\n"
                "                }"
            )
        parts.append(
            "{\n"
            '    "type": "function",\n'
            '    "function": {\n'
            f'        "name": "{fn.get("name")}",\n'
            f'        "description": "{fn.get("description")}",\n'
            '        "parameters": {\n'
            '            "type": "object",\n'
            '            "properties": [' + ",".join(params) + "\n"
            "            ],\n"
            f'            "required": {_jinja_tojson([n for n in props if n in required])}\n'
            "        }\n"
            "    }\n"
            "}\n"
        )
    parts.append(_CLOSING)
    return "".join(parts)


class LlamaReferenceFormat:
    exact = True

    def __init__(self, encoder: Encoder, today: Callable[[], str] | None = None) -> None:
        self.encoder = encoder
        self.name = "llama3-reference"
        self._today = today or (lambda: dt.datetime.now().strftime("%d %B %Y"))

    def count(self, messages: Messages, tools: Tools | None) -> Count:
        without = self._count(messages, None)
        if not tools:
            return Count(without, 0)
        with_tools = self._count(messages, tools)
        return Count(with_tools, with_tools - without)

    def _message(self, role: str, content: str, calls: list[str] | None = None) -> int:
        enc = self.encoder.count
        # <|start_header_id|> role <|end_header_id|> "\n\n" [<|python_tag|>] content calls <|eot_id|>
        tokens = 2 + enc(role) + enc("\n\n") + enc(content) + 1
        if calls:
            tokens += 1 + sum(enc(c) for c in calls)
        return tokens

    def _count(self, messages: Messages, tools: Tools | None) -> int:
        instruction = None
        rest = messages
        if messages and messages[0].get("role") == "system":
            instruction, rest = text_of(messages[0].get("content")), messages[1:]
        system = ("Environment: ipython\n\n" if tools else "") + "Cutting Knowledge Date: December 2023\n"
        system += "Today Date: " + self._today()
        if instruction:
            system += "\n\n" + instruction
        total = 1 + self._message("system", system + "\n")  # <|begin_of_text|>
        if tools:
            total += self._message("user", tools_prompt(tools))
        for m in rest:
            role = m.get("role")
            if role == "tool":
                total += self._message("ipython", text_of(m.get("content")))
            elif role == "assistant" and m.get("tool_calls"):
                total += self._message(
                    "assistant", text_of(m.get("content")), [_call(c) for c in m["tool_calls"]]
                )
            elif role in ("user", "assistant", "system"):
                total += self._message(str(role), text_of(m.get("content")))
            else:
                raise FormatError(f"unsupported message role {role!r}")
        return total + 2 + self.encoder.count("assistant") + self.encoder.count("\n\n")


def _call(call: Any) -> str:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        raise FormatError("every tool call needs a 'function' object")
    arguments = fn.get("arguments")
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):
            arguments = json.loads(arguments)
    return json.dumps({"type": "function", "name": fn.get("name"), "parameters": arguments})
