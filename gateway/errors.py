"""Errors the gateway makes itself, as OpenAI-style JSON responses with a fixed set of error types."""

from __future__ import annotations

import json
import math

from aiohttp import web

# error_type -> (HTTP status, OpenAI error "type").  The keys are the only values of the
# ``error_type`` label of ``gateway_request_errors_total``; README documents each one.
ERROR_TYPES: dict[str, tuple[int, str]] = {
    "body_too_large": (413, "invalid_request_error"),
    "invalid_request": (400, "invalid_request_error"),
    "context_exceeded": (400, "BadRequestError"),
    "tokens_budget": (400, "invalid_request_error"),
    "not_found": (404, "invalid_request_error"),
    "queue_full": (429, "rate_limit_error"),
    "queue_timeout": (503, "server_error"),
    "draining": (503, "server_error"),
    "upstream_unavailable": (502, "server_error"),
    "upstream_timeout": (504, "server_error"),
    "upstream_error": (502, "server_error"),
    "client_disconnected": (499, "client_closed_request"),
    "internal_error": (500, "server_error"),
}

REQUEST_ID = "X-Request-Id"


class GatewayError(Exception):
    """A request the gateway answers itself; ``error_type`` is one of ``ERROR_TYPES``."""

    def __init__(
        self, error_type: str, message: str, *, param: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.status, self.openai_type = ERROR_TYPES[error_type]
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def body(self) -> bytes:
        # vLLM's own 400 for an over-long prompt carries the integer status as code; clients parse it so.
        code: str | int = self.status if self.error_type == "context_exceeded" else self.error_type
        error = {"message": self.message, "type": self.openai_type, "param": self.param, "code": code}
        return json.dumps({"error": error}).encode()

    def response(self, request_id: str) -> web.Response:
        headers = {REQUEST_ID: request_id}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        response = web.Response(status=self.status, body=self.body(), content_type="application/json", headers=headers)
        if self.status == 413:
            response.force_close()  # the rest of the body is never read: do not wait for it
        return response
