"""Oracle: Meta's reference encoder (llama-models 0.1.0, the last release that ships it).

Run in a subprocess with that release first on PYTHONPATH (the project itself depends on a
newer llama-models). Reads [[messages, tools], ...] as JSON on stdin, prints the token counts.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from llama_models.llama3.api.datatypes import (  # type: ignore[attr-defined]
    RawMessage,
    StopReason,
    ToolCall,
    ToolDefinition,
    ToolParamDefinition,
    ToolPromptFormat,
)
from llama_models.llama3.api.interface import LLama31Interface  # type: ignore[import-not-found]


def definitions(tools: list[dict[str, Any]]) -> list[Any]:
    out = []
    for tool in tools:
        fn = tool["function"]
        schema = fn.get("parameters") or {}
        required = set(schema.get("required") or [])
        params = {
            name: ToolParamDefinition(
                param_type=str(prop.get("type")),
                description=prop.get("description"),
                required=name in required,
            )
            for name, prop in (schema.get("properties") or {}).items()
        }
        out.append(ToolDefinition(tool_name=fn["name"], description=fn.get("description"), parameters=params))
    return out


def count(interface: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    instruction = None
    if messages and messages[0]["role"] == "system":
        instruction, messages = messages[0]["content"], messages[1:]
    raw = interface.system_messages([], definitions(tools or []), instruction)
    for m in messages:
        content = m.get("content") or ""
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [
                ToolCall(
                    call_id=c["id"],
                    tool_name=c["function"]["name"],
                    arguments=json.loads(c["function"]["arguments"]),
                )
                for c in m["tool_calls"]
            ]
            raw.append(
                RawMessage(
                    role="assistant", content=content, tool_calls=calls, stop_reason=StopReason.end_of_turn
                )
            )
        elif m["role"] == "assistant":
            raw.append(RawMessage(role="assistant", content=content, stop_reason=StopReason.end_of_turn))
        else:
            raw.append(RawMessage(role=m["role"], content=content))
    return len(interface.get_tokens(raw))


def main() -> None:
    interface = LLama31Interface(ToolPromptFormat.json)
    cases = json.load(sys.stdin)
    print(json.dumps([count(interface, messages, tools) for messages, tools in cases]))


if __name__ == "__main__":
    main()
