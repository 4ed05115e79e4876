"""OpenAI request bodies: validate the fields the gateway relies on, estimate tokens, add what GLM-4 needs."""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway import tokens
from gateway.errors import GatewayError

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
GENERATION_PATHS = frozenset((CHAT, COMPLETIONS))

# GLM-4's end-of-turn tokens <|endoftext|>, <|user|>, <|observation|> (THUDM/GLM-4 basic_demo)
GLM4_STOP_TOKEN_IDS = (151329, 151336, 151338)

_OPTIONAL_INT = (int, type(None))


@dataclass(slots=True)
class Generation:
    """What the gateway needs to know of one chat or completions request."""

    body: bytes | bytearray  # what is sent to the engine
    model: str
    stream: bool
    prompt_tokens: int  # estimated
    max_tokens: int | None
    strip_usage: bool  # the gateway asked for the usage chunk; the client did not


_SLICE = 1 << 18
# Fields spliced into a body, by their names: the client sent none of them, so their values are the
# gateway's constants (GLM-4's stop ids, include_usage alone) and each combination is serialised once.
_SPLICED: dict[tuple[str, ...], bytes] = {}


def _decode(raw: bytes | bytearray) -> str:
    """UTF-8 to str in slices: decoding 6 MB of CJK at once sizes a buffer for the bytes and widens it
    (3 x the body at peak); slices joined once cost the final string and one slice."""
    if len(raw) <= _SLICE:
        return raw.decode()
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(raw)
    parts = [decoder.decode(view[i : i + _SLICE]) for i in range(0, len(raw), _SLICE)]
    parts.append(decoder.decode(b"", final=True))
    return "".join(parts)


def _invalid(message: str, param: str | None) -> GatewayError:
    return GatewayError("invalid_request", message, param=param)


def _check(obj: dict[str, Any], name: str, kinds: type | tuple[type, ...], what: str) -> Any:
    value = obj.get(name)
    if name in obj and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _tuple(kinds))):
        raise _invalid(f"'{name}' must be {what}", name)
    return value


def _tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def is_glm4(model: str) -> bool:
    name = model.lower().replace("-", "").replace("_", "")
    return "glm4" in name


def parse_generation(path: str, raw: bytes | bytearray, *, glm_stops: Callable[[str], bool] | None) -> Generation:
    """Validate a chat/completions body and return what admission and metrics need.

    The body is forwarded as received unless the gateway must add fields; then the fields are
    spliced in front rather than re-serialising a body that may be 6 MB.  ``glm_stops(model)``, when given,
    says whether GLM-4's stop token ids are to be added for the named model (when the client sent none).
    """
    try:
        obj = json.loads(_decode(raw))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _invalid(f"request body is not valid JSON: {exc}", None) from None
    if not isinstance(obj, dict):
        raise _invalid("request body must be a JSON object", None)

    model = _check(obj, "model", str, "a string") or ""
    stream = _check(obj, "stream", (bool, type(None)), "a boolean") or False
    max_tokens = _check(obj, "max_tokens", _OPTIONAL_INT, "an integer")
    if max_tokens is None:
        max_tokens = _check(obj, "max_completion_tokens", _OPTIONAL_INT, "an integer")
    if max_tokens is not None and max_tokens < 1:
        raise _invalid(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    stop_ids = _check(obj, "stop_token_ids", (list, type(None)), "a list of integers")
    if stop_ids and not all(isinstance(i, int) and not isinstance(i, bool) for i in stop_ids):
        raise _invalid("'stop_token_ids' must be a list of integers", "stop_token_ids")
    stream_options = _check(obj, "stream_options", (dict, type(None)), "an object")

    estimate = _estimate_prompt(path, obj)

    added: dict[str, Any] = {}
    if stop_ids is None and glm_stops is not None and glm_stops(model):
        added["stop_token_ids"] = list(GLM4_STOP_TOKEN_IDS)
    strip_usage = bool(stream) and not (stream_options and stream_options.get("include_usage"))
    if strip_usage:
        added["stream_options"] = {**(stream_options or {}), "include_usage": True}
    body = raw
    if any(key in obj for key in added):
        # the client sent the key (as null, or stream_options with other options): a field spliced in
        # front would lose to the client's later one, so re-serialise, the rare case
        obj.update(added)
        body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    else:
        del obj  # the parsed prompt is as large as the body: let it go before copying the body
        if added:
            start = raw.index(b"{") + 1
            fields = _SPLICED.get(tuple(added))
            if fields is None:
                fields = _SPLICED[tuple(added)] = json.dumps(added, separators=(",", ":"))[1:-1].encode()
            body = b"".join((b"{", fields, b",", memoryview(raw)[start:]))
    return Generation(body, model, bool(stream), estimate, max_tokens, strip_usage)


def _estimate_prompt(path: str, obj: dict[str, Any]) -> int:
    """Check the prompt's shape and estimate its tokens."""
    if path == CHAT:
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _invalid("'messages' must be a non-empty list", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _invalid(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}].role")
            content = m.get("content")
            if content is not None and not isinstance(content, str | list):
                raise _invalid(f"messages[{i}].content must be a string or a list", f"messages[{i}].content")
        return tokens.messages_tokens(messages)
    else:
        prompt = obj.get("prompt")
        if not isinstance(prompt, str | list):
            raise _invalid("'prompt' must be a string, a list of strings or a list of token ids", "prompt")
        return tokens.prompt_tokens(prompt)


def context_error(context_window: int, prompt: int, max_tokens: int | None) -> GatewayError | None:
    """vLLM's own wording when a request cannot fit the context window (clients parse it)."""
    if prompt >= context_window:
        return GatewayError(
            "context_exceeded",
            f"This model's maximum context length is {context_window} tokens. However, your request has "
            f"{prompt} input tokens. Please reduce the length of the input messages.",
            param="messages",
        )
    if max_tokens is not None and prompt + max_tokens > context_window:
        return GatewayError(
            "context_exceeded",
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
            f"context length is {context_window} tokens and your request has {prompt} input tokens "
            f"({max_tokens} > {context_window} - {prompt}).",
            param="max_tokens",
        )
    return None
