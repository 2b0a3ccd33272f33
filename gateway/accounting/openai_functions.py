"""OpenAI's published token-counting formula for chat messages and function definitions (cl100k).

From OpenAI's cookbook ("How to count tokens with tiktoken"): every message costs 3 tokens plus
its values (a ``name`` one more), every reply is primed with 3; each function costs a fixed
start plus ``name:description``, each property ``name:type:description`` plus its enum items,
and the function list a fixed end. It reproduces the API's own counts (105 tokens for
gpt-3.5-turbo and gpt-4 on the cookbook's weather example).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.accounting.encoders import Encoder
from gateway.accounting.tool_memo import ToolMemo
from gateway.accounting.types import Count, FormatError, Messages, Tools

__all__ = ["OpenAIFunctionsFormat"]


@dataclass(frozen=True)
class _Costs:
    func_init: int = 10
    prop_init: int = 3
    prop_key: int = 3
    enum_init: int = -3
    enum_item: int = 3
    func_end: int = 12
    per_message: int = 3
    per_name: int = 1
    reply_priming: int = 3


GPT4_COSTS = _Costs()


class OpenAIFunctionsFormat:
    exact = True
    piecewise = True  # counted segment by segment, tools memoised: see gateway/accounting/inline.py

    def __init__(self, encoder: Encoder, costs: _Costs = GPT4_COSTS) -> None:
        self.encoder = encoder
        self.costs = costs
        self.name = "openai-functions"
        self._tools = ToolMemo(self._count_tools)

    def count(self, messages: Messages, tools: Tools | None) -> Count:
        c = self.costs
        enc = self.encoder.count
        total = c.reply_priming
        for message in messages:
            total += c.per_message
            for key, value in message.items():
                total += enc(_as_text(value))
                if key == "name":
                    total += c.per_name
        tool_tokens = self._tools(tools) if tools else 0
        return Count(total + tool_tokens, tool_tokens)

    def _count_tools(self, tools: Tools) -> int:
        c = self.costs
        enc = self.encoder.count
        total = 0
        for tool in tools:
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(fn, dict):
                raise FormatError("every tool needs a 'function' object")
            total += c.func_init + enc(f"{fn.get('name', '')}:{_strip_period(fn.get('description') or '')}")
            props = (fn.get("parameters") or {}).get("properties") or {}
            if props:
                total += c.prop_init
                for key, prop in props.items():
                    prop = prop if isinstance(prop, dict) else {}
                    total += c.prop_key
                    if "enum" in prop:
                        total += c.enum_init
                        for item in prop["enum"] or ():
                            total += c.enum_item + enc(_as_text(item))
                    desc = _strip_period(prop.get("description") or "")
                    total += enc(f"{key}:{prop.get('type', '')}:{desc}")
        return total + c.func_end


def _strip_period(text: str) -> str:
    return text[:-1] if text.endswith(".") else text


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False)
