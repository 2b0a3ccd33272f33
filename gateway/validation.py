"""Checks on request bodies, before anything is counted, reserved or forwarded.

Every failure is a 400 (``InvalidRequest``) whose message names the field and what is wrong.
The backend's documented limits are enforced here too, per backend setting: the seed's backend
accepts ``tool_choice`` "auto" or "none" only.
"""

from __future__ import annotations

import json
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway import jsonio
from gateway.accounting.tool_memo import ToolMemo, keyed
from gateway.errors import InvalidRequest

__all__ = [
    "ChatRules",
    "max_tokens",
    "parse_document",
    "parse_object",
    "require_model",
    "stream_flag",
    "with_member",
]


def parse_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    return parse_document(body)[0]


def parse_document(body: bytes) -> tuple[dict[str, Any], bool]:
    """:func:`parse_object`, and whether orjson read it (for :func:`gateway.jsonio.encode`)."""
    if not body:
        raise InvalidRequest("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        payload, fast = jsonio.decode(body)
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not valid UTF-8.", code="invalid_encoding") from None
    except ValueError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise InvalidRequest("The request body nests too deeply to read.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise InvalidRequest(
            f"The request body must be a JSON object, not {type(payload).__name__}.", code="invalid_json"
        )
    return payload, fast


def with_member(body: bytes, name: str, value: int, members: Container[str]) -> bytes | None:
    """``body`` (a JSON object that parsed, with top-level ``members``) with ``"name": value``
    added as its first member, the rest byte for byte: no re-encoding of a long prompt. None
    where that cannot be done safely (not UTF-8, or ``name`` is a member already, perhaps spelt
    with escapes or null) and the caller must re-serialize.

    >>> with_member(b' {"a": 1}', "max_tokens", 8, {"a"})
    b' {"max_tokens":8,"a": 1}'
    """
    # UTF-16 and UTF-32 put a NUL among the first four bytes of any JSON text; a byte-order
    # mark is not whitespace, so the "{" test below refuses it. (json.detect_encoding, on the
    # request path, cost more than the splice.)
    if name in members or b"\x00" in body[:4]:
        return None
    start = _skip_space(body, 0)
    if body[start : start + 1] != b"{":
        return None
    after = _skip_space(body, start + 1)
    comma = b"" if body[after : after + 1] == b"}" else b","
    member = orjson.dumps(name) + b":%d" % value + comma
    return b"".join((body[: start + 1], member, memoryview(body)[start + 1 :]))


_JSON_SPACE = frozenset(b" \t\r\n")


def _skip_space(body: bytes, i: int) -> int:
    """The index of the first byte at or after ``i`` that is not JSON whitespace."""
    while i < len(body) and body[i] in _JSON_SPACE:
        i += 1
    return i


def require_model(payload: dict[str, Any], *, required: bool) -> str | None:
    model = payload.get("model")
    if model is None and not required:
        return None
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a non-empty string.", param="model")
    try:
        model.encode()
    except UnicodeEncodeError:  # a lone surrogate escape: no model is named so, nor storable
        raise InvalidRequest("'model' must be valid Unicode text.", param="model") from None
    return model


def stream_flag(payload: dict[str, Any]) -> bool:
    stream = payload.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream")
    return stream


def max_tokens(payload: dict[str, Any]) -> int | None:
    """The client's output cap (``max_completion_tokens`` wins over ``max_tokens``), checked."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = payload.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidRequest(f"'{name}' must be a non-negative integer.", param=name)
        return value
    return None


@dataclass(frozen=True)
class ChatRules:
    """Limits on chat requests: tool count and schema depth, and the tool_choice values allowed."""

    max_tools: int = 128
    max_schema_depth: int = 32
    tool_choices: tuple[str, ...] | None = ("auto", "none")  # None: anything goes
    # Tool lists that passed, remembered by their bytes (a ToolMemo; errors are never kept):
    # agents resend the same tools every turn, and walking twenty schemas for their depth costs
    # a tenth of a millisecond. What orjson cannot write (integers beyond 64 bits) is walked
    # each time.
    _passed: ToolMemo[None] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_passed", ToolMemo(self._check_tools, size=PASSED_TOOLS))

    def check(self, payload: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """A chat request's messages and tools, checked for the shapes counting relies on."""
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' must be a non-empty array.", param="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidRequest(
                    f"messages[{i}] must be an object with a string 'role'.", param="messages"
                )
        tools = payload.get("tools")
        if tools is None:
            return messages, None
        if not isinstance(tools, list):
            raise InvalidRequest("'tools' must be an array.", param="tools")
        if len(tools) > self.max_tools:
            raise InvalidRequest(
                f"Too many tools: {len(tools)}; this gateway accepts at most {self.max_tools}.", param="tools"
            )
        tools = keyed(tools)  # serialized once, for this memo and the format's
        self._passed(tools)
        if tools and self.tool_choices is not None and "tool_choice" in payload:
            choice = payload["tool_choice"]
            if choice not in self.tool_choices:
                allowed = " or ".join(repr(c) for c in self.tool_choices)
                raise InvalidRequest(
                    f"tool_choice {json.dumps(choice)} is not supported by this backend: use {allowed}.",
                    param="tool_choice",
                    code="unsupported_tool_choice",
                )
        return messages, tools or None

    def _check_tools(self, tools: list[Any]) -> None:
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise InvalidRequest(
                    f"tools[{i}] must be an object with a 'function' object "
                    "that has a non-empty string 'name'.",
                    param="tools",
                )
            parameters = fn.get("parameters")
            if parameters is not None and not isinstance(parameters, dict):
                raise InvalidRequest(f"tools[{i}].function.parameters must be an object.", param="tools")
            if _depth(parameters, self.max_schema_depth + 1) > self.max_schema_depth:
                raise InvalidRequest(
                    f"tools[{i}].function.parameters nests deeper than {self.max_schema_depth} levels.",
                    param="tools",
                )


PASSED_TOOLS = 1024


def _depth(value: Any, cap: int) -> int:
    """Nesting depth of a JSON value, without recursion, stopping once ``cap`` is reached.

    Level by level, keeping only containers: scalars (most of a schema) are never pushed."""
    level = [value] if isinstance(value, _CONTAINERS) else []
    depth = 0
    while level and depth < cap:
        depth += 1
        below: list[Any] = []
        for node in level:
            children = node.values() if isinstance(node, dict) else node
            below += [child for child in children if isinstance(child, _CONTAINERS)]
        level = below
    return depth


_CONTAINERS = (dict, list)
