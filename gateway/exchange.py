"""The record of one request on its way through the gateway: filled in by each stage, read once at the end."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.heartbeat import Heartbeat


class Exchange:
    """What one request measured on its way through; the metrics and the access log read it when it ends."""

    __slots__ = (
        "bytes_in", "bytes_out", "client", "completion_tokens", "duration", "endpoint", "error_type", "first_byte",
        "first_byte_at", "heartbeat", "key", "method", "model", "path", "phase", "prompt_tokens", "queue_wait",
        "relay", "request_id", "start", "status", "ttft", "upstream", "wall",
    )  # fmt: skip

    def __init__(self, start: float, endpoint: str, request_id: str, method: str, path: str, client: str) -> None:
        self.start = start  # perf_counter() at arrival
        self.wall = time.time()  # the same moment on the wall clock, for the access log
        self.endpoint = endpoint
        self.request_id = request_id
        self.method = method
        self.path = path
        self.client = client  # the peer's address
        self.key = "anonymous"  # the API key's name, once keys are configured
        self.model = ""
        self.upstream = ""  # the engine's name (never its credentials)
        self.status = 0
        self.error_type: str | None = None
        self.queue_wait: float | None = None
        self.first_byte: float | None = None
        self.first_byte_at = 0.0
        self.relay: float | None = None
        self.ttft: float | None = None
        self.duration = 0.0
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.phase = "received"  # then "queued", "prefill" (forwarded, no token yet), "decode"
        self.heartbeat: Heartbeat | None = None  # a stream's wait for its first token
