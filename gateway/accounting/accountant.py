"""Counting a chat request's prompt and tool tokens per model, and splitting billed input.

>>> acc = Accountant(Registry.load())
>>> acc.count("mistralai/Mistral-7B-Instruct-v0.3", [{"role": "user", "content": "Hi"}], None).prompt_tokens
6
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from gateway.accounting import inline
from gateway.accounting.registry import ModelProfile, Registry
from gateway.accounting.types import FormatError, Messages, Tools

__all__ = ["Accountant", "Accounting", "Bill", "UnknownModel", "bill"]

# Requests larger than this are counted in a worker thread (long prompts never stall the loop),
# unless their format counts piece by piece and the count fits this budget (inline.py).
OFFLOAD_BYTES = 32 * 1024
BOUNDS_KEPT = 1024  # models whose bound function is remembered


class UnknownModel(Exception):
    """No registry entry matches the model and no fallback is configured."""


@dataclass(frozen=True, slots=True)
class Accounting:
    model: str
    prompt_tokens: int  # the whole prompt as the backend counts it, tools included
    tool_tokens: int  # the part the tools add
    exact: bool
    tokenizer: str
    format: str

    @property
    def message_tokens(self) -> int:
        return self.prompt_tokens - self.tool_tokens


class Accountant:
    def __init__(self, registry: Registry, *, fallback_model: str | None = None) -> None:
        self.registry = registry
        self.fallback_model = fallback_model
        # Each model's format's bound (None: it has none), once its tokenizer is loaded: every
        # budgeted request asks for it before it is forwarded. Bounded: names come from clients.
        self._bounds: dict[str, Callable[[Messages, Tools | None], int | None] | None] = {}

    def profile(self, model: str) -> tuple[ModelProfile, bool]:
        """The model's profile, and whether it is the fallback's (then counts are estimates)."""
        profile = self.registry.profile(model)
        if profile is not None:
            return profile, False
        if self.fallback_model is not None:
            fallback = self.registry.profile(self.fallback_model)
            if fallback is not None:
                return fallback, True
        raise UnknownModel(
            f"The gateway has no tokenizer for model {model!r}; an operator can add it to the model registry."
        )

    def count(self, model: str, messages: Messages, tools: Tools | None) -> Accounting:
        profile, fallback = self.profile(model)
        try:
            c = profile.format.count(messages, tools or None)
        except FormatError:
            raise
        except (TypeError, AttributeError, KeyError, ValueError, RecursionError) as exc:
            # Shapes a format cannot read (a list where an object belongs, ...): the request's fault.
            raise FormatError(f"cannot count this request: {type(exc).__name__}: {exc}") from None
        return Accounting(
            model=model,
            prompt_tokens=c.prompt_tokens,
            tool_tokens=c.tool_tokens,
            exact=c.exact and profile.exact and not fallback,
            tokenizer=profile.tokenizer,
            format=profile.format_name,
        )

    def bound(self, model: str, messages: Messages, tools: Tools | None) -> int | None:
        """A number ``count`` cannot exceed for this request, found without the tokenizer; None
        where the model's format cannot say (or its tokenizer is not loaded yet)."""
        if model in self._bounds:
            bound = self._bounds[model]
        else:
            if not self.registry.ready(model):
                return None
            try:
                profile, _ = self.profile(model)
            except UnknownModel:
                return None
            bound = getattr(profile.format, "bound", None)
            if len(self._bounds) < BOUNDS_KEPT:
                self._bounds[model] = bound
        if bound is None:
            return None
        try:
            result: int | None = bound(messages, tools or None)
        except (TypeError, AttributeError, KeyError, ValueError, RecursionError):
            return None  # shapes the format cannot read: count() decides, as before
        return result

    def count_text(self, model: str, text: str) -> int | None:
        """Tokens of plain text (e.g. a streamed answer) with the model's tokenizer; None if unknown."""
        try:
            profile, _ = self.profile(model)
        except UnknownModel:
            return None
        encoder = getattr(profile.format, "encoder", None)
        return None if encoder is None else int(encoder.count(text))

    async def acount(
        self, model: str, messages: Messages, tools: Tools | None, size: int, *, tried_inline: bool = False
    ) -> Accounting:
        """:meth:`count` on the loop where that is cheap (:meth:`count_inline`), else in a thread;
        ``tried_inline``: the caller's :meth:`count_inline` found nothing, do not try again."""
        counted = None if tried_inline else self.count_inline(model, messages, tools, size)
        return counted if counted is not None else await asyncio.to_thread(self.count, model, messages, tools)

    def count_inline(
        self, model: str, messages: Messages, tools: Tools | None, size: int
    ) -> Accounting | None:
        """:meth:`acount`'s answer where it is found on the event loop; None where it would hand
        the count to a thread (raises what :meth:`count` raises)."""
        # A first use loads a tokenizer file (up to a second for tekken): never on the loop.
        if not self.registry.ready(model):
            return None
        if size <= OFFLOAD_BYTES:
            return self.count(model, messages, tools)
        left = OFFLOAD_BYTES - inline.MESSAGE_COST * len(messages)
        if left > 0 and getattr(self.profile(model)[0].format, "piecewise", False):
            # Mostly segments seen before (a resent history): cheaper here than the hand-off.
            try:
                with inline.budget(left):
                    return self.count(model, messages, tools)
            except inline.OverBudget:
                pass
        return None


@dataclass(frozen=True, slots=True)
class Bill:
    prompt_tokens: int | None  # billed input tokens, tools included
    tool_tokens: int | None
    estimated: bool
    difference: int | None  # backend's prompt_tokens minus the gateway's full count


def bill(
    counted: Accounting | None, backend_prompt: int | None, *, has_tools: bool, backend_counts_tools: bool
) -> Bill:
    """Split the input tokens of a served request into message and tool tokens.

    The backend's figure is the truth for what it served. When it includes the injected tools,
    the tool part is measured against it: ``backend_prompt - counted.message_tokens``; otherwise
    the gateway's tool count is added to it. Tools are never counted twice.
    """
    if counted is None:
        return Bill(backend_prompt, 0 if not has_tools else None, has_tools, None)
    if backend_prompt is None:
        return Bill(counted.prompt_tokens, counted.tool_tokens, True, None)
    if not has_tools:
        # Nothing to split: the backend's figure is all there is, whatever the format's exactness.
        return Bill(backend_prompt, 0, False, backend_prompt - counted.prompt_tokens)
    if backend_counts_tools:
        tool_tokens = max(0, backend_prompt - counted.message_tokens)
        return Bill(backend_prompt, tool_tokens, not counted.exact, backend_prompt - counted.prompt_tokens)
    return Bill(
        backend_prompt + counted.tool_tokens,
        counted.tool_tokens,
        not counted.exact,
        backend_prompt - counted.message_tokens,
    )
