"""Request bodies: the fields the gateway adds reach the engine whatever form the client's body took."""

from __future__ import annotations

import json

import pytest

from gateway.protocol import CHAT, GLM4_STOP_TOKEN_IDS, parse_generation

MESSAGES = [{"role": "user", "content": "你好, hello"}]


def glm(model: str) -> bool:
    return True


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"stop_token_ids": None},
        {"stream_options": None},
        {"stream_options": {"continuous_usage_stats": False}},
        {"stop_token_ids": None, "stream_options": {"include_usage": False}},
    ],
)
def test_added_fields_win_over_the_clients_nulls(extra: dict[str, object]) -> None:
    sent = {"model": "glm-4-9b-chat-1m", "messages": MESSAGES, "stream": True, **extra}
    gen = parse_generation(CHAT, bytearray(json.dumps(sent, ensure_ascii=False).encode()), glm_stops=glm)
    forwarded = json.loads(gen.body)
    assert forwarded["stop_token_ids"] == list(GLM4_STOP_TOKEN_IDS)
    assert forwarded["stream_options"]["include_usage"] is True
    assert forwarded["messages"] == MESSAGES
    assert gen.strip_usage


def test_body_untouched_when_nothing_is_added() -> None:
    raw = json.dumps({"messages": MESSAGES, "stop_token_ids": [1], "stream": False}).encode()
    assert parse_generation(CHAT, raw, glm_stops=glm).body is raw
    assert parse_generation(CHAT, raw, glm_stops=None).body is raw


def test_large_body_spliced_without_reserialising() -> None:
    content = "中文" * 400_000  # 2.4 MB of UTF-8: decoded in slices
    raw = bytearray(json.dumps({"messages": [{"role": "user", "content": content}]}, ensure_ascii=False).encode())
    gen = parse_generation(CHAT, raw, glm_stops=glm)
    forwarded = json.loads(bytes(gen.body))
    assert forwarded["messages"][0]["content"] == content
    assert forwarded["stop_token_ids"] == list(GLM4_STOP_TOKEN_IDS)
    assert gen.prompt_tokens == 400_000 + 2
