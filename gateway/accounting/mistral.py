"""Mistral's instruct formats (v2, v3, v7; sentencepiece or tekken), counted without rendering.

Mistral encodes every segment of a prompt on its own and joins the token lists with control
tokens (one token each), so a prompt's count is a sum of segment counts and the tools block
``[AVAILABLE_TOOLS] json.dumps(tools) [/AVAILABLE_TOOLS]`` can be counted alone and cached.

The rules below follow Mistral's reference encoder (mistral-common) for text conversations:
- consecutive messages of one role are merged ("\\n\\n" between texts; tool calls appended);
  system messages break such runs; a conversation not starting with a user turn gets an empty
  one first (v2/v3);
- v2/v3: all system texts, joined by "\\n\\n", prefix the *last* user message; v7: each system
  message is its own ``[SYSTEM_PROMPT]…[/SYSTEM_PROMPT]`` segment where it stands;
- tools go right before the last user message's ``[INST]``;
- v2 drops tool calls and results that come before the last user message; v3+ keeps them;
- tool call ids are the last 9 characters (what vLLM sends to Mistral models).
Mistral v1 has no tool format: see ``MistralV1Format``.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.accounting.encoders import Encoder
from gateway.accounting.tool_memo import ToolMemo
from gateway.accounting.types import Count, FormatError, Messages, Tools, text_bound, text_of

__all__ = ["MistralFormat", "MistralV1Format", "tools_json"]

JOIN = "\n\n"
# Bounds (see ``bound``): each message adds at most its text, two control tokens and a JOIN;
# the prompt adds <s> and perhaps an empty first user turn.
_MESSAGE_EXTRA = 2 + len(JOIN)
_PROMPT_EXTRA = 1 + 2


def tools_json(tools: Tools) -> str:
    """The tools as Mistral's encoder serializes them (name, description, parameters; no strict)."""
    dumped = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict):
            raise FormatError("every tool needs a 'function' object")
        dumped.append(
            {
                "type": tool.get("type", "function"),
                "function": {
                    "name": fn.get("name"),
                    "description": fn.get("description") or "",
                    "parameters": fn.get("parameters") if fn.get("parameters") is not None else {},
                },
            }
        )
    return json.dumps(dumped, ensure_ascii=False)


def _json_or_text(raw: Any) -> Any:
    """Content Mistral parses as JSON when it can (arguments, tool results)."""
    if raw is None or raw == "":
        return {}
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _call_id(raw: Any) -> str:
    return str(raw)[-9:] if raw is not None else ""


class _Turn:
    __slots__ = ("calls", "content", "role", "tool_call_id")

    def __init__(
        self, role: str, content: str = "", calls: list[Any] | None = None, tool_call_id: Any = None
    ):
        self.role = role
        self.content = content
        self.calls = calls or []
        self.tool_call_id = tool_call_id


def _aggregate(messages: Messages, keep_system: bool) -> tuple[list[_Turn], str | None, int]:
    """The messages as turns (runs of one role merged), the system text (v2/v3: it prefixes the
    last user turn), and the index of the last user turn (-1 if none).

    One pass, run by run: a resent history of a hundred messages is walked on every request."""
    turns: list[_Turn] = []
    system: list[str] = []
    last_user = -1
    n = len(messages)
    i = 0
    while i < n:
        message = messages[i]
        role = message.get("role")
        if role not in _ROLES:
            raise FormatError(f"unsupported message role {role!r}")
        j = i + 1
        while j < n and messages[j].get("role") == role:
            j += 1
        if j == i + 1 and (role == "user" or role == "assistant"):
            # Most turns are one message (roles alternate): no lists to join.
            if role == "user":
                last_user = len(turns)
            turns.append(_Turn(role, text_of(message.get("content")), [*(message.get("tool_calls") or ())]))
        elif role == "user" or role == "assistant":
            run = messages[i:j]
            texts = [text_of(m.get("content")) for m in run]
            calls = [c for m in run for c in (m.get("tool_calls") or [])]
            if role == "user":
                last_user = len(turns)
            turns.append(_Turn(role, JOIN.join(t for t in texts if t), calls))
        elif role == "tool":
            turns.extend(
                _Turn("tool", text_of(m.get("content")), tool_call_id=m.get("tool_call_id"))
                for m in messages[i:j]
            )
        else:  # system messages break runs; v7 keeps each where it stands
            for m in messages[i:j]:
                text = text_of(m.get("content"))
                if text:
                    system.append(text)
                if keep_system:
                    turns.append(_Turn("system", text))
        i = j
    if not turns or (not keep_system and turns[0].role != "user"):
        turns.insert(0, _Turn("user"))
        last_user += 1  # the inserted turn is the last user turn if there was none
    return turns, (JOIN.join(system) if system else None), last_user


_ROLES = ("user", "assistant", "tool", "system")


def _texts_bound(messages: Messages, extra: int, *, empty_assistant: bool) -> int | None:
    """The bound of a text conversation's messages, ``extra`` tokens each besides the text; None
    for tool calls and results, content parts, other roles, and (unless ``empty_assistant``) an
    assistant message without content, which the format's count refuses."""
    total = 0
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if (role != "user" and role != "assistant" and role != "system") or message.get("tool_calls"):
            return None
        if isinstance(content, str):
            total += extra + text_bound(content)
        elif content is None and (empty_assistant or role != "assistant"):
            total += extra
        else:
            return None
    return total  # compared by equality: a role may be any JSON value


class MistralFormat:
    """``version`` 2, 3 or 7 (the instruct format), with the model's sentencepiece or tekken encoder."""

    piecewise = True  # counted segment by segment, tools memoised: see gateway/accounting/inline.py

    def __init__(self, version: int, encoder: Encoder) -> None:
        if version not in (2, 3, 7):
            raise ValueError(f"unsupported Mistral format version {version}")
        self.version = version
        self.encoder = encoder
        self.name = f"mistral-v{version}"
        self._tools_block = ToolMemo(self._count_tools_block)

    def tools_block(self, tools: Tools) -> int:
        # Delimited by control tokens, the block's count depends on the tools alone: it is
        # remembered by the tools' bytes, since agents resend the same tools every turn.
        return self._tools_block(tools)

    def _count_tools_block(self, tools: Tools) -> int:
        return 2 + self.encoder.count(tools_json(tools))

    def bound(self, messages: Messages, tools: Tools | None) -> int | None:
        """At most what ``count`` gives, without the tokenizer: text messages only (tool calls
        and results are re-serialized, so their length is not the request's); None otherwise.

        Each user, system or assistant text is one segment or part of one (runs merged with
        JOIN, v2/v3 system texts moved before the last user text), between at most two
        control tokens; the tools block is its JSON between two."""
        texts = _texts_bound(messages, _MESSAGE_EXTRA, empty_assistant=False)
        if texts is None:
            return None
        total = _PROMPT_EXTRA + texts
        if tools:
            block = self._tools_block.peek(tools)
            total += block if block is not None else 2 + text_bound(tools_json(tools))
        return total

    def count(self, messages: Messages, tools: Tools | None) -> Count:
        v7 = self.version >= 7
        turns, system, last_user = _aggregate(messages, keep_system=v7)
        enc = self.encoder.count
        total = 1  # <s>
        for i, turn in enumerate(turns):
            if turn.role == "user":
                text = turn.content
                if not v7 and i == last_user and system:
                    text = system + JOIN + text
                total += 2 + enc(text)  # [INST] … [/INST]
            elif turn.role == "assistant":
                total += self._assistant(turn, before_last_user=i < last_user)
            elif turn.role == "tool":
                total += self._tool_result(turn, before_last_user=i < last_user)
            else:
                total += 2 + enc(turn.content)  # [SYSTEM_PROMPT] … [/SYSTEM_PROMPT]
        tool_tokens = self.tools_block(tools) if tools and last_user >= 0 else 0
        return Count(prompt_tokens=total + tool_tokens, tool_tokens=tool_tokens)

    def _assistant(self, turn: _Turn, before_last_user: bool) -> int:
        if turn.calls and turn.content and self.version < 7:
            raise FormatError("an assistant message cannot carry both content and tool calls for this model")
        if not turn.calls and not turn.content:
            raise FormatError("an assistant message needs content or tool calls")
        tokens = 0
        if turn.content:
            tokens += self.encoder.count(turn.content.rstrip(" "))
        if turn.calls:
            if self.version == 2 and before_last_user:
                return 0  # v2 drops earlier tool calls entirely, end-of-sequence included
            tokens += 1 + self.encoder.count(
                json.dumps([self._call(c) for c in turn.calls], ensure_ascii=False)
            )
        return tokens + 1  # </s>

    def _call(self, call: Any) -> dict[str, Any]:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise FormatError("every tool call needs a 'function' object")
        arguments = fn.get("arguments")
        if isinstance(arguments, str):
            # Mistral's normalizer re-serializes JSON arguments before parsing them again.
            arguments = _json_or_text(arguments)
        out: dict[str, Any] = {"name": fn.get("name"), "arguments": arguments}
        call_id = call.get("id")
        if self.version >= 3 and call_id and call_id != "null":
            out["id"] = _call_id(call_id)
        return out

    def _tool_result(self, turn: _Turn, before_last_user: bool) -> int:
        enc = self.encoder.count
        if self.version == 2:
            if before_last_user:
                return 0
            body = json.dumps([{"name": None, "content": _json_or_text(turn.content)}], ensure_ascii=False)
            return 2 + enc(body)
        if self.version == 3:
            body = json.dumps(
                {"content": _json_or_text(turn.content), "call_id": _call_id(turn.tool_call_id)},
                ensure_ascii=False,
            )
            return 2 + enc(body)
        # v7: [TOOL_RESULTS] id [TOOL_CONTENT] content [/TOOL_RESULTS], content as sent
        return 3 + enc(_call_id(turn.tool_call_id)) + enc(turn.content)


_V1_MESSAGE_EXTRA = len("[INST] " + " [/INST]") + len(JOIN) + 1  # and the dummy prefix of a split
_V1_TOOLS_EXTRA = len("[AVAILABLE_TOOLS] " + " [/AVAILABLE_TOOLS]")


class MistralV1Format:
    """Mistral v1 (Mistral-7B-Instruct-v0.1, Mixtral-8x7B-Instruct-v0.1): no native tool format.

    Assumed (an estimate, marked so): the v2 layout spelled as plain text with the v1 vocabulary,
    ``[AVAILABLE_TOOLS] <tools json> [/AVAILABLE_TOOLS]`` right before the last ``[INST]``, calls
    as ``[TOOL_CALLS] <json>``, results as ``[TOOL_RESULTS] <json> [/TOOL_RESULTS]``.
    """

    exact = False
    piecewise = True  # see gateway/accounting/inline.py

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.name = "mistral-v1-text-tools"
        # The rendered text itself is kept here (it is encoded next to the user's turn): only
        # that of tool lists of a usual size.
        self._tools_json = ToolMemo(tools_json, size=256, keep=lambda text: len(text) <= 16_384)

    def bound(self, messages: Messages, tools: Tools | None) -> int | None:
        """At most what ``count`` gives, without the tokenizer; text messages only (as
        ``MistralFormat.bound``). Each text is encoded inside ``[INST] `` and `` [/INST]`` (15
        characters), perhaps after the system texts and JOIN; the tools block is its JSON
        between ``[AVAILABLE_TOOLS] `` and `` [/AVAILABLE_TOOLS]`` (37 characters)."""
        texts = _texts_bound(messages, _V1_MESSAGE_EXTRA, empty_assistant=True)
        if texts is None:
            return None
        total = 1 + texts
        if tools:
            total += _V1_TOOLS_EXTRA + text_bound(self._tools_json(tools))
        return total

    def count(self, messages: Messages, tools: Tools | None) -> Count:
        enc = self.encoder.count
        system = JOIN.join(text_of(m.get("content")) for m in messages if m.get("role") == "system")
        turns = [m for m in messages if m.get("role") != "system"]
        last_user = max((i for i, m in enumerate(turns) if m.get("role") == "user"), default=-1)
        total, tool_tokens, first_user = 1, 0, True
        for i, m in enumerate(turns):
            role = m.get("role")
            if role == "user":
                text = text_of(m.get("content"))
                if first_user and system:
                    text = system + JOIN + text
                first_user = False
                body = "[INST] " + text + " [/INST]"
                if tools and i == last_user:
                    block = "[AVAILABLE_TOOLS] " + self._tools_json(tools) + " [/AVAILABLE_TOOLS]"
                    with_tools = enc(block + body)
                    tool_tokens = with_tools - enc(body)
                    total += with_tools
                else:
                    total += enc(body)
            elif role == "assistant":
                calls = m.get("tool_calls") or []
                if calls:
                    rendered = [
                        {
                            "name": (c.get("function") or {}).get("name"),
                            "arguments": _json_or_text((c.get("function") or {}).get("arguments")),
                            "id": _call_id(c.get("id", "")),
                        }
                        for c in calls
                    ]
                    text = "[TOOL_CALLS] " + json.dumps(rendered, ensure_ascii=False)
                else:
                    text = text_of(m.get("content"))
                total += enc(text) + 1
            elif role == "tool":
                result = {
                    "content": _json_or_text(m.get("content")),
                    "call_id": _call_id(m.get("tool_call_id", "")),
                }
                total += enc("[TOOL_RESULTS] " + json.dumps(result, ensure_ascii=False) + " [/TOOL_RESULTS]")
            else:
                raise FormatError(f"unsupported message role {role!r}")
        return Count(prompt_tokens=total, tool_tokens=tool_tokens, exact=False)
