"""The OpenAPI document of the gateway's own endpoints (usage, limits, count_tokens, admin).

The proxied OpenAI routes are OpenAI's API and are not repeated here. Served at ``/openapi.json``.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

__all__ = ["document", "endpoint"]

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"type": ["string", "null"]},
                "param": {"type": ["string", "null"]},
            },
        }
    },
}
_LIMITS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        name: {"type": ["integer", "null"], "minimum": 0}
        for name in ("tokens_per_day", "tokens_per_month", "spend_per_month", "rpm", "tpm", "max_concurrent")
    },
}
_OBJECT = {"type": "object"}


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(s): {
            "description": "error",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for s in statuses
    }


def _ok(description: str = "ok", status: int = 200, media: str = "application/json") -> dict[str, Any]:
    return {str(status): {"description": description, "content": {media: {"schema": _OBJECT}}}}


def _query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_USAGE_PARAMS = [
    _query(
        "start_time",
        {"type": "integer"},
        "unix seconds; default: the start of the 7 UTC days up to end_time, its own day included",
    ),
    _query("end_time", {"type": "integer"}, "unix seconds; default: now"),
    _query("bucket_width", {"type": "string", "enum": ["1m", "1h", "1d"]}),
    _query("group_by", {"type": "string"}, "model (admin: model,key)"),
    _query("limit", {"type": "integer"}, "buckets per page"),
    _query("page", {"type": "string"}, "next_page of the previous answer"),
    _query("format", {"type": "string", "enum": ["json", "csv"]}),
]
_KEY_PATH = {
    "name": "key",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "id or name",
}
_PLAN_PATH = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def document() -> dict[str, Any]:
    customer: list[dict[str, list[str]]] = [{"customerKey": []}]
    admin: list[dict[str, list[str]]] = [{"adminToken": []}]
    usage_ok = {
        "200": {
            "description": "a page of buckets",
            "content": {"application/json": {"schema": _OBJECT}, "text/csv": {"schema": {"type": "string"}}},
        }
    }
    paths: dict[str, Any] = {
        "/v1/usage": {
            "get": {
                "summary": "The caller's usage in buckets",
                "security": customer,
                "parameters": _USAGE_PARAMS,
                "responses": {**usage_ok, **_errors(400, 401)},
            }
        },
        "/v1/usage/requests": {
            "get": {
                "summary": "The caller's requests, newest first",
                "security": customer,
                "parameters": [_query("limit", {"type": "integer"}), _query("after", {"type": "string"})],
                "responses": {**_ok(), **_errors(400, 401)},
            }
        },
        "/v1/limits": {
            "get": {
                "summary": "The caller's limits, use and prices",
                "security": customer,
                "responses": {**_ok(), **_errors(401)},
            }
        },
        "/v1/chat/completions/count_tokens": {
            "post": {
                "summary": "Prompt and tool tokens of a chat request, without calling the backend",
                "security": customer,
                "requestBody": _body(
                    {
                        "type": "object",
                        "required": ["model", "messages"],
                        "properties": {
                            "model": {"type": "string"},
                            "messages": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["role"],
                                    "properties": {"role": {"type": "string"}},
                                },
                            },
                            "tools": {"type": "array", "items": _OBJECT},
                        },
                    }
                ),
                "responses": {**_ok(), **_errors(400, 401, 404, 413)},
            }
        },
        "/admin/keys": {
            "get": {"summary": "List keys", "security": admin, "responses": {**_ok(), **_errors(401, 403)}},
            "post": {
                "summary": "Create a key",
                "security": admin,
                "requestBody": _body(
                    {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string"},
                            "plan": {"type": ["string", "null"]},
                            "limits": _LIMITS,
                        },
                    }
                ),
                "responses": {**_ok("created", 201), **_errors(400, 401, 403, 404)},
            },
        },
        "/admin/keys/{key}": {
            "get": {
                "summary": "Show a key",
                "security": admin,
                "parameters": [_KEY_PATH],
                "responses": {**_ok(), **_errors(401, 403, 404)},
            },
            "patch": {
                "summary": "Change a key's plan or limits",
                "security": admin,
                "parameters": [_KEY_PATH],
                "requestBody": _body(
                    {
                        "type": "object",
                        "properties": {"plan": {"type": ["string", "null"]}, "limits": _LIMITS},
                    }
                ),
                "responses": {**_ok(), **_errors(400, 401, 403, 404)},
            },
        },
        "/admin/keys/{key}/revoke": {
            "post": {
                "summary": "Revoke a key",
                "security": admin,
                "parameters": [_KEY_PATH],
                "responses": {**_ok(), **_errors(401, 403, 404)},
            }
        },
        "/admin/keys/{key}/rotate": {
            "post": {
                "summary": "Give a key a new secret",
                "security": admin,
                "parameters": [_KEY_PATH],
                "responses": {**_ok(), **_errors(401, 403, 404)},
            }
        },
        "/admin/plans": {
            "get": {"summary": "List plans", "security": admin, "responses": {**_ok(), **_errors(401, 403)}},
            "post": {
                "summary": "Create a plan",
                "security": admin,
                "requestBody": _body(
                    {
                        "type": "object",
                        "required": ["name"],
                        "properties": {"name": {"type": "string"}, "limits": _LIMITS},
                    }
                ),
                "responses": {**_ok("created", 201), **_errors(400, 401, 403)},
            },
        },
        "/admin/plans/{name}": {
            "patch": {
                "summary": "Change a plan's limits",
                "security": admin,
                "parameters": [_PLAN_PATH],
                "requestBody": _body({"type": "object", "properties": {"limits": _LIMITS}}),
                "responses": {**_ok(), **_errors(400, 401, 403, 404)},
            },
            "delete": {
                "summary": "Delete a plan no key uses",
                "security": admin,
                "parameters": [_PLAN_PATH],
                "responses": {**_ok(), **_errors(400, 401, 403, 404)},
            },
        },
        "/admin/prices": {
            "get": {
                "summary": "Prices in force",
                "security": admin,
                "parameters": [_query("history", {"type": "string", "enum": ["true", "false"]})],
                "responses": {**_ok(), **_errors(401, 403)},
            },
            "post": {
                "summary": "Set a model's price",
                "security": admin,
                "requestBody": _body(
                    {
                        "type": "object",
                        "required": ["model", "input_per_million", "output_per_million"],
                        "properties": {
                            "model": {"type": "string"},
                            "input_per_million": {"type": "integer", "minimum": 0},
                            "tool_per_million": {"type": "integer", "minimum": 0},
                            "output_per_million": {"type": "integer", "minimum": 0},
                            "effective_from": {"type": "number"},
                        },
                    }
                ),
                "responses": {**_ok("created", 201), **_errors(400, 401, 403)},
            },
        },
        "/admin/usage": {
            "get": {
                "summary": "Usage of one key or all keys",
                "security": admin,
                "parameters": [*_USAGE_PARAMS, _query("key", {"type": "string"})],
                "responses": {**usage_ok, **_errors(400, 401, 403, 404)},
            }
        },
        "/admin/usage/requests": {
            "get": {
                "summary": "One key's requests",
                "security": admin,
                "parameters": [
                    _query("key", {"type": "string"}),
                    _query("limit", {"type": "integer"}),
                    _query("after", {"type": "string"}),
                ],
                "responses": {**_ok(), **_errors(400, 401, 403, 404)},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "LLM metering gateway",
            "version": "0.1.0",
            "description": "The gateway's own endpoints. The OpenAI routes it proxies are OpenAI's API.",
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": _ERROR},
            "securitySchemes": {
                "customerKey": {"type": "http", "scheme": "bearer", "description": "a customer key (gw-...)"},
                "adminToken": {"type": "http", "scheme": "bearer", "description": "GATEWAY_ADMIN_TOKEN"},
            },
        },
    }


async def endpoint(request: Request) -> Response:
    return JSONResponse(document())
