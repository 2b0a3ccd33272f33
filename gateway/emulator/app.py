"""An OpenAI-compatible emulator of the seed's function-calling backend.

Behaviour (``../shared/seed/function-calling.txt``): tools with ``tool_choice`` "auto" or "none"
(anything else: 400), single and parallel calls, tool results, no nested calls, streaming
refused with tools (400), text streaming otherwise. ``usage`` is reported as vLLM reports it.

Test hooks, as request headers (the gateway forwards them): ``x-emulator-status: 503`` answers
with that error; ``x-emulator-delay: 0.5`` waits first; ``x-emulator-no-usage: 1`` leaves usage
out; ``x-emulator-malformed: 1`` answers 200 with a body that is not JSON.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.emulator.answers import Answer, answer
from gateway.emulator.models import EMULATED_MODELS, EmulatedModel, PromptError

__all__ = ["create_emulator_app"]

_CACHE_SIZE = 4096


class _Error(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> Response:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class Emulator:
    def __init__(self, *, latency: float = 0.0, token_latency: float = 0.0) -> None:
        self.latency = latency
        self.token_latency = token_latency
        self._counts: OrderedDict[str, int] = OrderedDict()

    def model(self, payload: dict[str, Any]) -> EmulatedModel:
        name = payload.get("model")
        if not isinstance(name, str) or name not in EMULATED_MODELS:
            raise _Error(404, f"The model `{name}` does not exist.", "model_not_found", "model")
        return EMULATED_MODELS[name]

    def prompt_tokens(self, model: EmulatedModel, messages: list[Any], tools: list[Any] | None) -> int:
        # The same prompt is counted once: benchmarks repeat one request many times.
        key = hashlib.sha256(json.dumps([model.id, messages, tools], sort_keys=True).encode()).hexdigest()
        cached = self._counts.get(key)
        if cached is not None:
            self._counts.move_to_end(key)
            return cached
        try:
            count = model.prompt_tokens(messages, tools)
        except PromptError as exc:
            raise _Error(400, str(exc), "invalid_prompt") from None
        self._counts[key] = count
        if len(self._counts) > _CACHE_SIZE:
            self._counts.popitem(last=False)
        return count

    async def chat(self, request: Request) -> Response:
        payload = await _hooks_and_body(request, self.latency)
        model = self.model(payload)
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise _Error(
                400, "'messages' must be a non-empty array of objects.", "invalid_messages", "messages"
            )
        tools = payload.get("tools") or None
        if tools is not None and not isinstance(tools, list):
            raise _Error(400, "'tools' must be an array.", "invalid_tools", "tools")
        tool_choice = payload.get("tool_choice", "auto")
        if tools and tool_choice not in ("auto", "none"):
            raise _Error(
                400, "tool_choice supports only 'auto' or 'none'.", "unsupported_tool_choice", "tool_choice"
            )
        stream = payload.get("stream") is True
        if stream and tools:
            raise _Error(
                400, "Streaming is not supported with function calling.", "stream_with_tools", "stream"
            )
        prompt = self.prompt_tokens(model, messages, tools)
        result = answer(messages, tools, str(tool_choice))
        max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
        pieces, finish = _generate(model, result, max_tokens if isinstance(max_tokens, int) else None)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": len(pieces),
            "total_tokens": prompt + len(pieces),
        }
        if request.headers.get("x-emulator-no-usage"):
            usage = {}
        rid = "chatcmpl-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
        if stream:
            options = payload.get("stream_options") or {}
            return StreamingResponse(
                self._stream(rid, model.id, pieces, finish, usage if options.get("include_usage") else None),
                media_type="text/event-stream",
            )
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(pieces) if result.content else None,
        }
        if result.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in result.tool_calls
            ]
        body: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model.id,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        }
        if usage:
            body["usage"] = usage
        return JSONResponse(body)

    async def _stream(
        self, rid: str, model: str, pieces: list[str], finish: str, usage: dict[str, int] | None
    ) -> AsyncIterator[bytes]:
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            obj = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [choice],
            }
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        yield chunk({"role": "assistant", "content": ""})
        for piece in pieces:
            if self.token_latency:
                await asyncio.sleep(self.token_latency)
            yield chunk({"content": piece})
        yield chunk({}, finish)
        if usage:
            obj = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            yield b"data: " + json.dumps(obj).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def completions(self, request: Request) -> Response:
        payload = await _hooks_and_body(request, self.latency)
        model = self.model(payload)
        prompt = payload.get("prompt")
        if not isinstance(prompt, str):
            raise _Error(400, "'prompt' must be a string.", "invalid_prompt", "prompt")
        prompt_tokens = 1 + len(model.encode_text(prompt))
        text = " and so the story goes on."
        completion = len(model.encode_text(text))
        return JSONResponse(
            {
                "id": "cmpl-" + hashlib.sha256(prompt.encode()).hexdigest()[:24],
                "object": "text_completion",
                "created": int(time.time()),
                "model": model.id,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion,
                },
            }
        )

    async def embeddings(self, request: Request) -> Response:
        payload = await _hooks_and_body(request, self.latency)
        model = self.model(payload)
        raw = payload.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
            raise _Error(400, "'input' must be a string or an array of strings.", "invalid_input", "input")
        data, tokens = [], 0
        for i, text in enumerate(inputs):
            tokens += len(model.encode_text(text))
            digest = hashlib.sha256(text.encode()).digest()
            data.append({"object": "embedding", "index": i, "embedding": [b / 255 for b in digest[:16]]})
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": model.id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def models(self, request: Request) -> Response:
        created = 1700000000
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": m.split("/")[0]}
            for m in EMULATED_MODELS
        ]
        return JSONResponse({"object": "list", "data": data})


async def _hooks_and_body(request: Request, latency: float) -> dict[str, Any]:
    delay = float(request.headers.get("x-emulator-delay", 0)) + latency
    if delay:
        await asyncio.sleep(delay)
    status = request.headers.get("x-emulator-status")
    if status:
        raise _Error(int(status), f"emulated backend failure ({status})", "emulated_failure")
    try:
        payload = json.loads(await request.body())
    except ValueError:
        raise _Error(400, "The body is not valid JSON.", "invalid_json") from None
    if not isinstance(payload, dict):
        raise _Error(400, "The body must be a JSON object.", "invalid_json")
    return payload


def create_emulator_app(*, latency: float = 0.0, token_latency: float = 0.0) -> Starlette:
    """The emulator as an ASGI app; serve it with uvicorn (``gateway emulator`` does)."""
    emu = Emulator(latency=latency, token_latency=token_latency)

    def guarded(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            if request.headers.get("x-emulator-malformed"):
                return Response(b'{"id": "chatcmpl-broken", "choices": [', media_type="application/json")
            try:
                return await handler(request)  # type: ignore[no-any-return]
            except _Error as exc:
                return exc.response()

        return endpoint

    routes = []
    for prefix in ("/v1/openai", "/v1"):
        routes += [
            Route(prefix + "/chat/completions", guarded(emu.chat), methods=["POST"]),
            Route(prefix + "/completions", guarded(emu.completions), methods=["POST"]),
            Route(prefix + "/embeddings", guarded(emu.embeddings), methods=["POST"]),
            Route(prefix + "/models", guarded(emu.models), methods=["GET"]),
        ]
    return Starlette(routes=routes)


def _generate(model: EmulatedModel, result: Answer, max_tokens: int | None) -> tuple[list[str], str]:
    """The answer as the model's token pieces, cut at ``max_tokens``."""
    if result.tool_calls:
        calls = [{"name": c.name, "arguments": json.loads(c.arguments)} for c in result.tool_calls]
        text = "[TOOL_CALLS] " + json.dumps(calls, ensure_ascii=False)
    else:
        text = result.content or ""
    tokens = [*model.encode_text(text), model.raw.eos_id]
    finish = result.finish_reason
    if max_tokens is not None and len(tokens) > max_tokens:
        tokens, finish = tokens[:max_tokens], "length"
    pieces = [model.decode_piece(t) if t != model.raw.eos_id else "" for t in tokens]
    if result.content is not None:
        # Streamed text must concatenate to exactly the answer's text.
        pieces = _exact_pieces(text, tokens, model, pieces)
    return pieces, finish


def _exact_pieces(text: str, tokens: list[int], model: EmulatedModel, pieces: list[str]) -> list[str]:
    out, done = [], ""
    for i in range(1, len(tokens) + 1):
        prefix = str(model.raw.decode([t for t in tokens[:i] if t != model.raw.eos_id]))
        out.append(prefix[len(done) :])
        done = prefix
    if "".join(out) != text[: len(done)]:
        return pieces
    return out
