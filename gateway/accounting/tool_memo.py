"""What a format derives from the tools alone, remembered by the tools' bytes.

Agents resend the same tools with every turn. A format's tool count (Mistral's
``[AVAILABLE_TOOLS]`` block, OpenAI's function formula) or rendered tools text depends on the
tools alone, but reaching the tokenizer's cache first means rendering them in the format's own
JSON, in Python: a tenth of a millisecond for twenty tools. The tools' orjson bytes are a key a C
encoder makes in a microsecond or two, and equal bytes are equal tools. Entries are keyed by the
length and hash of those bytes (the key keeps no request text) and bounded in number.

A request meets several memos (the checks, then its format's count): :func:`keyed` makes its
tool list carry the key, serialized once, for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import orjson

from gateway.accounting.inline import spend
from gateway.accounting.types import Tools

__all__ = ["MEMO_SIZE", "KeyedTools", "ToolMemo", "keyed"]

MEMO_SIZE = 4096
T = TypeVar("T")
Key = tuple[int, int]


class KeyedTools(list):  # type: ignore[type-arg]
    """One request's tool list with its memo key (None: orjson cannot write it). Read-only: the
    key is not recomputed if the list changes."""

    __slots__ = ("key",)
    key: Key | None


def keyed(tools: Tools) -> KeyedTools:
    """``tools`` carrying their key, serialized here once for every memo the request meets."""
    if type(tools) is KeyedTools:
        return tools
    out = KeyedTools(tools)
    out.key = _key(tools)
    return out


def _key(tools: Tools) -> Key | None:
    try:
        raw = orjson.dumps(tools)
    except TypeError:  # integers beyond 64 bits and the like (json read them): no key
        return None
    return (len(raw), hash(raw))


class ToolMemo(Generic[T]):
    """``derive(tools)``, memoised. Errors (malformed tools) are raised every time, never kept."""

    def __init__(
        self, derive: Callable[[Tools], T], size: int = MEMO_SIZE, keep: Callable[[T], bool] | None = None
    ) -> None:
        """``keep`` says which values are worth their memory (a text's length, say)."""
        self._derive = derive
        self._size = size
        self._keep = keep
        # Plain dict operations are atomic under the GIL: counts that run off the event loop
        # (long prompts) share the memo without a lock. Oldest-first eviction.
        self._memo: dict[Key, T] = {}

    def __call__(self, tools: Tools) -> T:
        key = tools.key if type(tools) is KeyedTools else _key(tools)
        if key is None:
            return self._derive(tools)
        if key in self._memo:
            return self._memo[key]
        spend(key[0])  # rendering the tools comes before the tokenizer: charge it (inline.py)
        value = self._derive(tools)
        if self._keep is not None and not self._keep(value):
            return value
        self._memo[key] = value
        if len(self._memo) > self._size:
            self._memo.pop(next(iter(self._memo)), None)
        return value

    def peek(self, tools: Tools) -> T | None:
        """The remembered value, or None: never derives it."""
        key = tools.key if type(tools) is KeyedTools else _key(tools)
        return None if key is None else self._memo.get(key)

    def __len__(self) -> int:
        return len(self._memo)

    def clear(self) -> None:
        self._memo.clear()
