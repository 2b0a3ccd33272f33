"""The seed's example request (the backend's own function-calling documentation).

Shared by the demo, the tests and the benchmarks, so that all of them measure the same request.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SEED_MESSAGES", "SEED_MODEL", "SEED_TOOLS"]

SEED_MODEL = "mistralai/Mistral-7B-Instruct-v0.1"
SEED_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    }
                },
                "required": ["location"],
            },
        },
    }
]
SEED_MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in San Francisco?"}]
