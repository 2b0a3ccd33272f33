"""Value types shared by the accounting formats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Count", "Format", "FormatError", "Messages", "Tools", "text_bound", "text_of"]

Messages = list[dict[str, Any]]
Tools = list[dict[str, Any]]


class FormatError(ValueError):
    """The conversation cannot be rendered in this model's format (the backend would refuse it too)."""


@dataclass(frozen=True, slots=True)
class Count:
    prompt_tokens: int  # the whole prompt as the backend counts it, tools included
    tool_tokens: int  # the part of prompt_tokens that the tools add
    exact: bool = True


class Format(Protocol):
    """A model's prompt format. A format may also set ``piecewise = True``: it counts segment by
    segment from the messages (tools through a ToolMemo), never rendering the whole prompt, so
    a budget bounds its work and a long request can be counted on the event loop (inline.py).

    A format may also have ``bound(messages, tools) -> int | None``: a number its ``count`` can
    never exceed for that request, found without the tokenizer (None where it cannot say). A
    quota can then hold the bound while the exact count runs beside the backend's work."""

    name: str

    def count(self, messages: Messages, tools: Tools | None) -> Count: ...


def text_of(content: Any) -> str:
    """A message's text: a string, or the text parts of a content list joined by a blank line."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type", "text") == "text"]
        return "\n\n".join(p for p in parts if isinstance(p, str) and p)
    return ""


def text_bound(text: str) -> int:
    """At most this many tokens in ``text``, for every tokenizer the registry knows.

    Every token of a byte-level BPE (tiktoken, tekken) covers at least one UTF-8 byte; every
    SentencePiece token (identity normalization, byte fallback) covers at least one character, or
    one byte of a character it falls back on, and the encoder adds one dummy-prefix space. So
    tokens <= UTF-8 bytes + 1, and UTF-8 bytes <= 4 per character (checked over every tokenizer
    by tests/accounting/test_bounds.py). ``isascii`` is a flag lookup: no pass over the text.
    """
    return (len(text) if text.isascii() else 4 * len(text)) + 1
