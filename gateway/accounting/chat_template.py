"""Hugging Face-style Jinja chat templates, rendered the way transformers renders them.

Sandboxed Jinja with ``trim_blocks``/``lstrip_blocks`` and loop controls; ``tojson`` is
``json.dumps`` with ``ensure_ascii=False`` and no key sorting; ``raise_exception`` and
``strftime_now`` are globals; ``messages``, ``tools``, ``add_generation_prompt``,
``bos_token`` and ``eos_token`` are the variables. Messages are prepared as vLLM prepares them
for a template: tool-call ``arguments`` strings are parsed into objects, content lists become
their text parts joined by a newline.

The tools are not delimited in such a prompt, so their share is measured by rendering twice:
``tool_tokens = count(render(messages, tools)) - count(render(messages, no tools))``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import functools
import json
from functools import cached_property
from typing import Any

from gateway.accounting.encoders import Encoder
from gateway.accounting.types import Count, FormatError, Messages, Tools

__all__ = ["ChatTemplateFormat"]


class ChatTemplateFormat:
    def __init__(
        self,
        name: str,
        template: str,
        encoder: Encoder,
        *,
        bos_token: str = "",
        eos_token: str = "",
        exact: bool = True,
    ) -> None:
        self.name = name
        self.source = template
        self.encoder = encoder
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.exact = exact

    @cached_property
    def _template(self) -> Any:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: dt.datetime.now().strftime(fmt)
        return env.from_string(self.source)

    def render(self, messages: Messages, tools: Tools | None) -> str:
        from jinja2 import TemplateError

        context: dict[str, Any] = {
            "messages": _prepare(messages),
            "add_generation_prompt": True,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        if tools:
            context["tools"] = tools
        try:
            return str(self._template.render(**context))
        except FormatError:
            raise
        except (TemplateError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise FormatError(f"the chat template cannot render this conversation: {exc}") from None

    def count(self, messages: Messages, tools: Tools | None) -> Count:
        without = self.encoder.count_rendered(self.render(messages, None))
        if not tools:
            return Count(without, 0, self.exact)
        with_tools = self.encoder.count_rendered(self.render(messages, tools))
        return Count(with_tools, with_tools - without, self.exact)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    if indent is None:
        return json.dumps(x, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    # Indented JSON goes through Python's slow encoder, and the same tools come back every
    # turn: the indented text is memoized by the value's compact, C-encoded form.
    compact = json.dumps(x, ensure_ascii=False, sort_keys=sort_keys)
    return _indented(compact, ensure_ascii, indent, tuple(separators) if separators else None)


@functools.lru_cache(maxsize=4096)
def _indented(compact: str, ensure_ascii: bool, indent: int, separators: tuple[str, str] | None) -> str:
    return json.dumps(json.loads(compact), ensure_ascii=ensure_ascii, indent=indent, separators=separators)


def _raise(message: str) -> None:
    raise FormatError(f"the chat template refused the conversation: {message}")


def _prepare(messages: Messages) -> Messages:
    prepared = []
    for message in messages:
        m = dict(message)
        content = m.get("content")
        if isinstance(content, list):
            m["content"] = "\n".join(
                p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
        if m.get("tool_calls"):
            calls = copy.deepcopy(m["tool_calls"])
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    with contextlib.suppress(ValueError):
                        fn["arguments"] = json.loads(fn["arguments"])
            m["tool_calls"] = calls
        prepared.append(m)
    return prepared
