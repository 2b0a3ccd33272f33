"""The gateway's one error hierarchy, rendered OpenAI-shaped in one place.

    GatewayError                    (500, "api_error")
    ├── InvalidRequest              (400, "invalid_request_error")
    │   ├── NotFound                (404)
    │   ├── MethodNotAllowed        (405)
    │   ├── PayloadTooLarge         (413)
    │   └── UnsupportedMediaType    (415)
    ├── AuthenticationFailed        (401, "authentication_error")
    ├── PermissionDenied            (403, "permission_error")
    ├── QuotaExceeded               (429, "insufficient_quota" | "rate_limit_exceeded")
    └── UpstreamError               (502, "upstream_error")
        └── UpstreamTimeout         (504)

Every response the gateway itself produces for a failure is
`{"error": {"message", "type", "code"}}`; errors the backend returns pass
through untouched instead (they are the backend's words, not ours).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "AuthenticationFailed",
    "GatewayError",
    "InvalidRequest",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "QuotaExceeded",
    "UnsupportedMediaType",
    "UpstreamError",
    "UpstreamTimeout",
    "error_body",
]


class GatewayError(Exception):
    status = 500
    type = "api_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class NotFound(InvalidRequest):
    status = 404
    code = "not_found"


class MethodNotAllowed(InvalidRequest):
    status = 405
    code = "method_not_allowed"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    code = "unsupported_media_type"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class QuotaExceeded(GatewayError):
    """429: ``type`` "insufficient_quota" for budgets, "rate_limit_exceeded" for rates; ``param``
    names the limit; ``Retry-After`` when waiting can help."""

    status = 429
    type = "rate_limit_exceeded"
    rejection: Any = None  # the quota's Rejection (limit, kind, retry_after)

    @classmethod
    def from_rejection(cls, rejection: Any, rate_headers: list[tuple[bytes, bytes]]) -> QuotaExceeded:
        headers = {k.decode(): v.decode() for k, v in rate_headers}
        if rejection.retry_after is not None:
            headers["retry-after"] = str(rejection.retry_after)
        exc = cls(rejection.message, code=rejection.kind, param=rejection.limit, headers=headers)
        exc.type = rejection.kind
        exc.rejection = rejection
        return exc


class ServiceUnavailable(GatewayError):
    """503: a store the gateway needs to meter the request (ledger, quota counters) is down;
    nothing was forwarded, so nothing is billed. Safe to retry."""

    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class LedgerUnavailable(ServiceUnavailable):
    code = "ledger_unavailable"


class QuotaStoreUnavailable(ServiceUnavailable):
    code = "quota_store_unavailable"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    """Serialize an OpenAI-shaped error body."""
    error: dict[str, Any] = {"message": message, "type": type_, "code": code}
    if param is not None:
        error["param"] = param
    return json.dumps({"error": error}).encode()
