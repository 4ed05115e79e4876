"""Errors the gateway makes itself, as OpenAI-style JSON responses with a fixed set of error types."""

from __future__ import annotations

import json
import math

from aiohttp import web

# error_type -> (HTTP status, OpenAI error "type").  The keys are the only values of the
# ``error_type`` label of ``gateway_request_errors_total``; README documents each one.
ERROR_TYPES: dict[str, tuple[int, str]] = {
    "body_too_large": (413, "invalid_request_error"),
    "unsupported_encoding": (415, "invalid_request_error"),
    "invalid_request": (400, "invalid_request_error"),
    "context_exceeded": (400, "BadRequestError"),
    "tokens_budget": (400, "invalid_request_error"),
    "kv_capacity": (400, "invalid_request_error"),  # larger than any engine's KV cache (capacity x headroom)
    "not_found": (404, "invalid_request_error"),
    "model_not_found": (404, "NotFoundError"),  # no engine serves the model named: vLLM's own 404
    "invalid_api_key": (401, "invalid_request_error"),  # missing or unknown key, with WWW-Authenticate: Bearer
    "model_not_allowed": (403, "permission_error"),  # the key's models list does not name it
    "admin_only": (403, "permission_error"),  # /metrics and /status with a key that is not admin
    "max_prompt_tokens": (400, "invalid_request_error"),  # over the key's max_prompt_tokens
    "rate_limited": (429, "rate_limit_error"),  # the key's requests or tokens per minute
    "queue_full": (429, "rate_limit_error"),
    "queue_timeout": (503, "server_error"),
    "draining": (503, "server_error"),
    "upstream_unavailable": (502, "server_error"),
    "upstream_timeout": (504, "server_error"),
    "upstream_error": (502, "server_error"),
    "engine_busy": (503, "ServiceUnavailableError"),  # the engine's own queue is full (vLLM 0.33), passed on
    "client_disconnected": (499, "client_closed_request"),
    "client_timeout": (408, "invalid_request_error"),  # a request head or body that stopped arriving
    "too_many_connections": (503, "server_error"),  # over --max-connections, answered at accept
    "gateway_overloaded": (503, "server_error"),  # the gateway itself ran out of file descriptors or memory
    "internal_error": (500, "server_error"),
}

REQUEST_ID = "X-Request-Id"
SERVER = "glm-gateway"  # the Server header of every answer: no versions (as nginx's server_tokens off)
_STATUS_CODE = frozenset(("context_exceeded", "model_not_found"))  # vLLM's errors carry the status as code


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
        # vLLM's own 400 for an over-long prompt and 404 for an unknown model carry the integer status as code
        code: str | int = self.status if self.error_type in _STATUS_CODE else self.error_type
        error = {"message": self.message, "type": self.openai_type, "param": self.param, "code": code}
        return json.dumps({"error": error}).encode() + b"\n"

    def response(self, request_id: str) -> web.Response:
        headers = {REQUEST_ID: request_id}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        response = web.Response(status=self.status, body=self.body(), content_type="application/json", headers=headers)
        if self.status in (408, 413):
            response.force_close()  # the rest of the body is never read: do not wait for it
        return response
