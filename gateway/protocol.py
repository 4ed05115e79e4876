"""OpenAI request bodies: validate the fields the gateway relies on, estimate tokens, add what GLM-4 needs."""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway import tokens
from gateway.errors import GatewayError
from gateway.routing.keys import prefix_key, user_key

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
    max_tokens: int | None  # as requested, in the engine's precedence (chat: max_completion_tokens first)
    strip_usage: bool  # the gateway asked for the usage chunk; the client did not
    session: bytes | None = None  # the OpenAI ``user`` field: session routing's key without a session header
    prefix: bytes | None = None  # a digest of the leading content: prefix routing's key
    limit_field: str = "max_tokens"  # the field max_tokens came from (max_completion_tokens on chat)

    def output_budget(self, context_window: int) -> int:
        """The output tokens to charge: max_tokens clamped to what fits, as vLLM 0.33 clamps it; without
        max_tokens the engine may fill the window, but only the prompt is charged (see the README)."""
        if self.max_tokens is None:
            return 0
        return max(0, min(self.max_tokens, context_window - self.prompt_tokens))


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


BYTES_PER_TOKEN = 4  # what a body the gateway does not parse is charged: a token per 4 bytes


def named_model(raw: bytes | bytearray) -> str:
    """The ``model`` a JSON body of another /v1 route names ("" when none or not JSON: the engine answers)."""
    try:
        obj = json.loads(_decode(raw))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return ""
    model = obj.get("model") if isinstance(obj, dict) else None
    return model if isinstance(model, str) else ""


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
        raise _invalid(f"The request body is not valid JSON: {exc}.", None) from None
    except RecursionError:  # the C decoder's depth guard: nesting deeper than any OpenAI body has
        raise _invalid("The request body is nested too deeply.", None) from None
    if not isinstance(obj, dict):
        raise _invalid("request body must be a JSON object", None)

    model = _check(obj, "model", str, "a string") or ""
    stream = _check(obj, "stream", (bool, type(None)), "a boolean") or False
    limit_field, max_tokens = _max_tokens(path, obj)
    if max_tokens is not None and max_tokens < 1:
        raise _invalid(f"{limit_field} must be at least 1, got {max_tokens}.", limit_field)
    stop_ids = _check(obj, "stop_token_ids", (list, type(None)), "a list of integers")
    if stop_ids and not all(isinstance(i, int) and not isinstance(i, bool) for i in stop_ids):
        raise _invalid("'stop_token_ids' must be a list of integers", "stop_token_ids")
    stream_options = _check(obj, "stream_options", (dict, type(None)), "an object")

    estimate = _estimate_prompt(path, obj)
    session, prefix = user_key(obj.get("user")), prefix_key(obj)

    added: dict[str, Any] = {}
    if stop_ids is None and glm_stops is not None and glm_stops(model):
        added["stop_token_ids"] = list(GLM4_STOP_TOKEN_IDS)
    strip_usage = bool(stream) and not (stream_options and stream_options.get("include_usage"))
    if strip_usage:
        options = {**(stream_options or {}), "include_usage": True}
        if options.get("continuous_usage_stats"):  # vLLM sends usage per chunk only with include_usage
            options["continuous_usage_stats"] = False
        added["stream_options"] = options
    body = raw
    if any(key in obj for key in added):
        # the client sent the key (as null, or stream_options with other options): a field spliced in
        # front would lose to the client's later one, so re-serialise, the rare case
        obj.update(added)
        body = _serialise(obj)
    else:
        del obj  # the parsed prompt is as large as the body: let it go before copying the body
        if added:
            start = raw.index(b"{") + 1
            fields = _SPLICED.get(tuple(added))
            if fields is None:
                fields = _SPLICED[tuple(added)] = json.dumps(added, separators=(",", ":"))[1:-1].encode()
            body = b"".join((b"{", fields, b",", memoryview(raw)[start:]))
    return Generation(body, model, bool(stream), estimate, max_tokens, strip_usage, session, prefix, limit_field)


def _max_tokens(path: str, obj: dict[str, Any]) -> tuple[str, int | None]:
    """The output limit and the field it came from, in vLLM's precedence: its chat path reads
    max_completion_tokens before the deprecated max_tokens; completions know only max_tokens."""
    names = ("max_completion_tokens", "max_tokens") if path == CHAT else ("max_tokens",)
    for name in names:
        value = _check(obj, name, _OPTIONAL_INT, "an integer")
        if value is not None:
            return name, value
    return "max_tokens", None


def _serialise(obj: dict[str, Any]) -> bytes:
    """The body as JSON again.  A lone surrogate ("\\ud800" in the client's JSON) has no UTF-8 form: such a
    body is written with ASCII escapes, which the engine decodes to what the client sent."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode()
    except RecursionError:
        raise _invalid("The request body is nested too deeply.", None) from None


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
        count = tokens.prompt_tokens(obj.get("prompt"))
        if count is None:
            raise _invalid(
                "'prompt' must be a string, a list of strings, a list of token ids or a list of lists of token ids",
                "prompt",
            )
        return count


def context_error(context_window: int, gen: Generation) -> GatewayError | None:
    """What every vLLM generation refuses, in vLLM 0.33's wording (clients match "maximum context length
    is N tokens"): a prompt that alone fills the window, or max_tokens over the window.  A prompt that
    fits with max_tokens that do not is clamped by 0.33 and refused by 0.11: left to the engine."""
    prompt = gen.prompt_tokens
    if prompt >= context_window:
        return GatewayError(
            "context_exceeded",
            f"This model's maximum context length is {context_window} tokens. However, your prompt contains "
            f"at least {prompt} input tokens, which exceeds this limit even without any output tokens. Please "
            f"reduce the length of the input prompt. (parameter=input_tokens, value={prompt})",
            param="input_tokens",
        )
    if gen.max_tokens is not None and gen.max_tokens > context_window:
        return GatewayError(
            "context_exceeded",
            f"{gen.limit_field}={gen.max_tokens} cannot be greater than max_model_len={context_window}. Please "
            "request fewer output tokens.",
            param=gen.limit_field,
        )
    return None
