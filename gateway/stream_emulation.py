"""Turning a whole chat completion into OpenAI's streaming chunks.

For backends that refuse ``stream: true`` with tools: the gateway asks without streaming and
replays the answer as the chunks OpenAI sends. Per choice: a role delta; content deltas; for
each tool call a delta with its index, id, type and function name (arguments ""), then its
arguments in pieces; a closing delta with the ``finish_reason``. With
``stream_options.include_usage`` every chunk carries ``"usage": null`` and a last chunk with no
choices carries the usage. Then ``data: [DONE]``.

>>> events = sse_events({"id": "x", "created": 1, "model": "m", "choices": [{"index": 0,
...     "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}]}, False)
>>> len(events)
4
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["sse_events"]

PIECE = 32  # characters of content or arguments per chunk


def _pieces(text: str) -> list[str]:
    return [text[i : i + PIECE] for i in range(0, len(text), PIECE)] or [""]


def sse_events(completion: dict[str, Any], include_usage: bool) -> list[bytes]:
    """The stream a client would have received for ``completion``, as SSE events."""
    base = {
        "id": completion.get("id", ""),
        "object": "chat.completion.chunk",
        "created": completion.get("created", 0),
        "model": completion.get("model", ""),
    }
    if completion.get("system_fingerprint") is not None:
        base["system_fingerprint"] = completion["system_fingerprint"]

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {**base, "choices": choices, **extra}
        if include_usage and "usage" not in extra:
            chunk["usage"] = None
        return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"

    def delta(index: int, body: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": index, "delta": body, "logprobs": None, "finish_reason": finish}]

    events: list[bytes] = []
    for choice in completion.get("choices") or []:
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        content = message.get("content")
        calls = message.get("tool_calls") or []
        events.append(
            event(
                delta(
                    index,
                    {
                        "role": message.get("role", "assistant"),
                        "content": "" if content is not None or not calls else None,
                    },
                )
            )
        )
        if content:
            events.extend(event(delta(index, {"content": piece})) for piece in _pieces(content))
        for i, call in enumerate(calls):
            fn = call.get("function") or {}
            head = {
                "index": i,
                "id": call.get("id"),
                "type": call.get("type", "function"),
                "function": {"name": fn.get("name"), "arguments": ""},
            }
            events.append(event(delta(index, {"tool_calls": [head]})))
            arguments = fn.get("arguments") or ""
            if arguments:
                events.extend(
                    event(delta(index, {"tool_calls": [{"index": i, "function": {"arguments": piece}}]}))
                    for piece in _pieces(arguments)
                )
        events.append(event(delta(index, {}, choice.get("finish_reason") or "stop")))
    if include_usage and isinstance(completion.get("usage"), dict):
        events.append(event([], usage=completion["usage"]))
    events.append(b"data: [DONE]\n\n")
    return events
