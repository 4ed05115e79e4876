"""What differs between the vLLM generations the simulated engine imitates (0.11 and 0.33), in one place."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

BLOCK_SIZE = 16  # vLLM's default KV block size on CUDA, in tokens


@dataclass(frozen=True)
class EngineError(Exception):
    """One of vLLM's error answers: status, message, OpenAI ``type`` and ``param``."""

    status: int
    message: str
    kind: str = "BadRequestError"
    param: str | None = None


class Generation:
    """vLLM 0.11: the old context checks and wording, ``param`` always null, errors JSON as aiohttp spaces it."""

    version = "0.11.0"
    finished_reasons: tuple[str, ...] = ("stop", "length", "abort")
    new_series = False  # the series 0.33 added (cache_config_info, waiting_by_reason, ...)
    queue_options = False  # --max-num-queued-reqs and --sse-keep-alive-interval exist

    def output_limit(self, chat: bool, body: dict[str, Any]) -> tuple[str, Any]:
        """The requested output limit and the field it came from: chat takes a truthy
        ``max_completion_tokens`` before ``max_tokens`` (``or``, as 0.11 reads it)."""
        if chat and body.get("max_completion_tokens"):
            return "max_completion_tokens", body["max_completion_tokens"]
        return "max_tokens", body.get("max_tokens")

    def fit(self, window: int, prompt: int, limit: int | None, param: str, text: bool) -> int | None:
        """The output limit the engine runs with (None: none asked), or raise the engine's 400."""
        if prompt >= window:
            raise self.error(
                400,
                f"This model's maximum context length is {window} tokens. However, your request has {prompt} "
                "input tokens. Please reduce the length of the input messages.",
            )
        if limit is not None and prompt + limit > window:
            raise self.error(
                400,
                f"'max_tokens' or 'max_completion_tokens' is too large: {limit}. This model's maximum context "
                f"length is {window} tokens and your request has {prompt} input tokens ({limit} > {window} - "
                f"{prompt}).",
            )
        return limit

    def not_found(self, model: str, served: str) -> EngineError:
        return self.error(404, f"The model `{model}` does not exist.", "NotFoundError")

    def error(self, status: int, message: str, kind: str = "BadRequestError", param: str | None = None) -> EngineError:
        return EngineError(status, message, kind, None)

    def dumps(self, body: Any) -> str:
        return json.dumps(body)

    def respond(self, error: EngineError) -> web.Response:
        body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.status}}
        return web.json_response(body, status=error.status, dumps=self.dumps)

    def fingerprint(self, model: str, window: int) -> str | None:
        """``system_fingerprint`` of responses and the usage chunk; 0.11 sends none."""
        return None


class Generation033(Generation):
    """vLLM 0.33: output limits clamped to what fits, new wording with ``(parameter=..., value=...)``, compact
    JSON, ``param`` filled, a bounded engine queue, SSE keep-alive comments and the new series."""

    version = "0.33.0"
    finished_reasons = ("stop", "length", "abort", "error", "repetition")
    new_series = True
    queue_options = True

    def output_limit(self, chat: bool, body: dict[str, Any]) -> tuple[str, Any]:
        """Chat: ``max_completion_tokens`` when present (not None), else ``max_tokens``; completions: max_tokens."""
        if chat and body.get("max_completion_tokens") is not None:
            return "max_completion_tokens", body["max_completion_tokens"]
        return "max_tokens", body.get("max_tokens")

    def fit(self, window: int, prompt: int, limit: int | None, param: str, text: bool) -> int | None:
        if limit is not None and limit > window:
            raise self.validation(
                f"{param}={limit} cannot be greater than max_model_len={window}. Please request fewer output tokens.",
                param,
                limit,
            )
        if prompt > window:
            # a text prompt is tokenized with truncation at window + 1, so vLLM only knows "at least" that many
            count = min(prompt, window + 1) if text else prompt
            qualifier = "at least " if count == window + 1 else ""
            raise self.validation(
                f"This model's maximum context length is {window} tokens. However, your prompt contains "
                f"{qualifier}{count} input tokens, which exceeds this limit even without any output tokens. "
                "Please reduce the length of the input prompt.",
                "input_tokens",
                count,
            )
        fitted = window - prompt if limit is None else min(limit, window - prompt)
        if fitted < 1:  # SamplingParams refuses what get_max_tokens clamped to nothing
            raise self.validation(f"max_tokens must be at least 1, got {fitted}.", "max_tokens", fitted)
        return fitted if limit is not None else None

    def validation(self, message: str, param: str, value: Any) -> EngineError:
        """A VLLMValidationError: the message names the parameter and value, ``param`` is filled."""
        return self.error(400, f"{message} (parameter={param}, value={value})", param=param)

    def not_found(self, model: str, served: str) -> EngineError:
        return self.error(
            404, f"The model `{model}` does not exist. Valid aliases: {served}.", "NotFoundError", param="model"
        )

    def error(self, status: int, message: str, kind: str = "BadRequestError", param: str | None = None) -> EngineError:
        return EngineError(status, message, kind, param)

    def dumps(self, body: Any) -> str:
        return json.dumps(body, separators=(",", ":"))

    def fingerprint(self, model: str, window: int) -> str | None:
        """``vllm-<version>-<hash8>``, the hash standing for vLLM's config hash."""
        return f"vllm-{self.version}-" + hashlib.sha256(f"{model}:{window}".encode()).hexdigest()[:8]


GENERATIONS: dict[str, Generation] = {"0.11": Generation(), "0.33": Generation033()}

BUSY = EngineError(
    503,
    "The engine is currently busy and cannot accept new requests. Please try again later or on a different instance.",
    "Service Unavailable",
)


def cache_config_info(kv_cache_tokens: int) -> dict[str, str]:
    """The labels of 0.33's ``vllm:cache_config_info``: CacheConfig's fields as strings; KV capacity in tokens is
    num_gpu_blocks * block_size."""
    return {
        "block_size": str(BLOCK_SIZE),
        "cache_dtype": "auto",
        "calculate_kv_scales": "False",
        "cpu_offload_gb": "0",
        "enable_prefix_caching": "True",
        "gpu_memory_utilization": "0.92",
        "is_attention_free": "False",
        "kv_cache_memory_bytes": "None",
        "num_cpu_blocks": "None",
        "num_gpu_blocks": str(kv_cache_tokens // BLOCK_SIZE),
        "num_gpu_blocks_override": "None",
        "prefix_caching_hash_algo": "sha256",
        "sliding_window": "None",
        "swap_space": "4",
    }
