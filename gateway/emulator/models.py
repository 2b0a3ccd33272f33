"""The emulator's models and how it counts their prompts, like vLLM does: the whole prompt.

Counting here deliberately shares no code with the gateway's own accounting: Mistral prompts
are encoded by ``mistral_common`` (Mistral's official encoder), so a test of the gateway
against the emulator compares two independent implementations.

Mistral v1 (Mistral-7B-Instruct-v0.1, Mixtral-8x7B-Instruct-v0.1) has no tool format, and the
official encoder refuses tools for it. The emulator assumes the v2 layout spelled as plain
text with the v1 vocabulary: ``[AVAILABLE_TOOLS] <tools json> [/AVAILABLE_TOOLS]`` before the
last ``[INST]``, ``[TOOL_CALLS] <calls json>`` for calls and ``[TOOL_RESULTS] <json>
[/TOOL_RESULTS]`` for results.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any

__all__ = ["EMULATED_MODELS", "EmulatedModel", "PromptError"]


class PromptError(Exception):
    """The conversation cannot be rendered for this model (a 400 from the backend)."""


def _data_file(name: str) -> str:
    import mistral_common

    return os.path.join(os.path.dirname(mistral_common.__file__), "data", name)


@dataclass
class EmulatedModel:
    id: str
    tokenizer_file: str
    native_tools: bool = True

    @cached_property
    def _tokenizer(self) -> Any:
        from mistral_common.protocol.instruct.validator import ValidationMode
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        return MistralTokenizer.from_file(_data_file(self.tokenizer_file), mode=ValidationMode.serving)

    @property
    def raw(self) -> Any:
        return self._tokenizer.instruct_tokenizer.tokenizer

    def encode_text(self, text: str) -> list[int]:
        return list(self.raw.encode(text, bos=False, eos=False))

    def decode_piece(self, token: int) -> str:
        return str(self.raw.decode([token]))

    def prompt_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
        """Tokens of the whole rendered prompt, tools included."""
        if not self.native_tools:
            return self._v1_prompt_tokens(messages, tools)
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        try:
            request = ChatCompletionRequest.from_openai(
                _mistral_ids(messages), tools=tools or None, model=self.id
            )
            return len(self._tokenizer.encode_chat_completion(request).tokens)
        except Exception as exc:  # mistral_common raises several unrelated types
            raise PromptError(f"cannot render the conversation for {self.id}: {exc}") from exc

    def _v1_prompt_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
        tok = self.raw
        total = 1  # <s>
        system = "\n\n".join(_text(m.get("content")) for m in messages if m.get("role") == "system")
        turns = [m for m in messages if m.get("role") != "system"]
        last_user = max((i for i, m in enumerate(turns) if m.get("role") == "user"), default=-1)
        first_user = True
        for i, m in enumerate(turns):
            role = m.get("role")
            if role == "user":
                text = _text(m.get("content"))
                if first_user and system:
                    text = system + "\n\n" + text
                first_user = False
                prefix = ""
                if tools and i == last_user:
                    prefix = (
                        "[AVAILABLE_TOOLS] " + json.dumps(tools, ensure_ascii=False) + " [/AVAILABLE_TOOLS]"
                    )
                total += len(tok.encode(prefix + "[INST] " + text + " [/INST]", bos=False, eos=False))
            elif role == "assistant":
                calls = m.get("tool_calls") or []
                if calls:
                    rendered = [
                        {
                            "name": c["function"]["name"],
                            "arguments": _args(c["function"].get("arguments")),
                            "id": str(c.get("id", ""))[-9:],
                        }
                        for c in calls
                    ]
                    text = "[TOOL_CALLS] " + json.dumps(rendered, ensure_ascii=False)
                else:
                    text = _text(m.get("content"))
                total += len(tok.encode(text, bos=False, eos=False)) + 1  # </s>
            elif role == "tool":
                body = {"content": _args(m.get("content")), "call_id": str(m.get("tool_call_id", ""))[-9:]}
                text = "[TOOL_RESULTS] " + json.dumps(body, ensure_ascii=False) + " [/TOOL_RESULTS]"
                total += len(tok.encode(text, bos=False, eos=False))
            else:
                raise PromptError(f"unsupported role {role!r}")
        return total


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _args(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def _mistral_id(call_id: Any) -> str:
    """vLLM keeps the last 9 characters of a tool call id for Mistral; ids must be alphanumeric."""
    text = str(call_id)
    tail = text[-9:]
    if len(tail) == 9 and tail.isalnum() and tail.isascii():
        return tail
    return hashlib.sha256(text.encode()).hexdigest()[:9]


def _mistral_ids(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "id": _mistral_id(c.get("id", ""))} for c in m["tool_calls"]]}
        elif m.get("role") == "tool":
            m = {**m, "tool_call_id": _mistral_id(m.get("tool_call_id", ""))}
        out.append(m)
    return out


def _models() -> dict[str, EmulatedModel]:
    table = [
        EmulatedModel("mistralai/Mistral-7B-Instruct-v0.1", "tokenizer.model.v1", native_tools=False),
        EmulatedModel("mistralai/Mixtral-8x7B-Instruct-v0.1", "tokenizer.model.v1", native_tools=False),
        EmulatedModel("mistralai/Mistral-7B-Instruct-v0.3", "mistral_instruct_tokenizer_240323.model.v3"),
        EmulatedModel("mistralai/Mixtral-8x22B-Instruct-v0.1", "mistral_instruct_tokenizer_240323.model.v3"),
        EmulatedModel("mistralai/Mistral-Nemo-Instruct-2407", "tekken_240718.json"),
        EmulatedModel("mistralai/Mistral-Large-Instruct-2411", "mistral_instruct_tokenizer_241114.model.v7"),
    ]
    return {m.id: m for m in table}


EMULATED_MODELS = _models()
