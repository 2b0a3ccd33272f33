"""Usage-metering gateway for LLM function calling.

>>> from gateway import Settings, create_app
>>> app = create_app(Settings(upstream_url="http://127.0.0.1:9000/v1/openai"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.settings import Settings

if TYPE_CHECKING:
    from starlette.types import ASGIApp

__all__ = ["Settings", "create_app"]
__version__ = "0.1.0"


def create_app(settings: Settings, **kwargs: Any) -> ASGIApp:
    """Build the gateway's ASGI app (see :func:`gateway.app.create_app`)."""
    from gateway.app import create_app as _create_app

    return _create_app(settings, **kwargs)
