"""``POST /v1/chat/completions/count_tokens``: what a chat request will cost in prompt tokens.

Answers from the model registry alone, without calling the backend::

    {"object": "chat.completion.token_count", "model": "...", "prompt_tokens": 95,
     "tool_tokens": 84, "message_tokens": 11, "tokenizer": "mistral-v3",
     "format": "mistral-v3", "exact": true}
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.accounting.accountant import Accountant, UnknownModel
from gateway.accounting.encoders import TokenizerFileError
from gateway.accounting.types import FormatError
from gateway.asgi import read_body
from gateway.errors import InvalidRequest, NotFound, UpstreamError
from gateway.validation import ChatRules, parse_object, require_model

__all__ = ["CountTokens"]


class CountTokens:
    def __init__(self, accountant: Accountant, max_body_bytes: int, rules: ChatRules | None = None) -> None:
        self.accountant = accountant
        self.max_body_bytes = max_body_bytes
        self.rules = rules or ChatRules()

    async def handle(self, request: Request) -> Response:
        body = await read_body(
            request.receive, self.max_body_bytes, request.headers.get("content-length", "").encode() or None
        )
        payload = parse_object(body)
        model = require_model(payload, required=True)
        assert model is not None
        messages, tools = self.rules.check(payload)
        try:
            counted = await self.accountant.acount(model, messages, tools, len(body))
        except UnknownModel as exc:
            raise NotFound(str(exc), code="model_not_found", param="model") from None
        except FormatError as exc:
            raise InvalidRequest(str(exc), code="invalid_prompt", param="messages") from None
        except TokenizerFileError as exc:
            raise UpstreamError(
                f"The tokenizer for {model!r} is unavailable.", code="tokenizer_unavailable"
            ) from exc
        return JSONResponse(
            {
                "object": "chat.completion.token_count",
                "model": model,
                "prompt_tokens": counted.prompt_tokens,
                "tool_tokens": counted.tool_tokens,
                "message_tokens": counted.message_tokens,
                "tokenizer": counted.tokenizer,
                "format": counted.format,
                "exact": counted.exact,
            }
        )
