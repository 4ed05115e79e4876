"""Hostile bodies and headers on the request path: each a 4xx or forwarded as the engine should get it, never a 500."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.harness import (
    CHAT,
    HELLO,
    MODEL,
    Gw,
    Sim,
    error_body,
    gateway_in,
    post,
    settled,
    sim_in,
    value,
)
from tests.test_client import answering, read_request, scripted

pytestmark = pytest.mark.timeout(60)
COMPLETIONS = "/v1/completions"


async def assert_invalid(
    gw: Gw, path: str, raw: bytes, headers: dict[str, str] | None = None, param: str | None = None
) -> dict[str, object]:
    status, _, body = await post(
        gw.url + path, data=raw, headers={"Content-Type": "application/json", **(headers or {})}
    )
    assert status == 400, body
    return error_body(json.loads(body), code="invalid_request", type="invalid_request_error", param=param)


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        (CHAT, b"[" * 100_000 + b"]" * 100_000, None),
        (CHAT, b'{"model":"m","messages":' + b"[" * 5000 + b"]" * 5000 + b"}", None),
        (CHAT, b'{"model":"m","messages":[' + b"[" * 900 + b"]" * 900 + b"]}", "messages[0].role"),
        (COMPLETIONS, b'{"model":"m","prompt":' + b"[" * 500 + b"1" + b"]" * 500 + b"}", "prompt"),
        (COMPLETIONS, b'{"model":"m","prompt":[[1,2],[[3]]]}', "prompt"),
        (COMPLETIONS, b'{"model":"m","prompt":["a",1]}', "prompt"),
    ],
    ids=["100k-arrays", "messages-5000-deep", "messages-900-deep", "prompt-500-deep", "prompt-ids-nested", "mixed"],
)
async def test_deep_or_strange_nesting_is_400(gw: Gw, sim: Sim, path: str, raw: bytes, param: str | None) -> None:
    await assert_invalid(gw, path, raw, param=param)
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", error_type="internal_error") == 0
    assert value(text, "gateway_request_errors_total", error_type="invalid_request") == 1
    assert sim.journal == []
    await settled(gw, sim)


async def test_a_lone_surrogate_is_forwarded_as_the_client_wrote_it(gw: Gw, sim: Sim) -> None:
    """A body the gateway re-serialises (stream_options sent, include_usage added) with a lone surrogate
    in it: forwarded with the escape, as the engine would have received it."""
    raw = (
        b'{"model":"glm-4-9b-chat-1m","user":"u\\ud800","messages":[{"role":"user","content":"a\\udfffb"}],'
        b'"stream":true,"stream_options":{},"max_tokens":2}'
    )
    status, _, body = await post(gw.url + CHAT, data=raw, headers={"Content-Type": "application/json"})
    assert status == 200, body
    forwarded = sim.journal[-1]["body"]
    assert forwarded["user"] == "u\ud800"
    assert forwarded["messages"][0]["content"] == "a\udfffb"
    assert forwarded["stream_options"] == {"include_usage": True}
    odd_model = raw.replace(b'"glm-4-9b-chat-1m"', b'"glm-4-9b-chat-1m\\ud800"')  # a model no engine serves
    status, _, body = await post(gw.url + CHAT, data=odd_model, headers={"Content-Type": "application/json"})
    assert status == 404 and json.loads(body)["error"]["param"] == "model", body
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", error_type="internal_error") == 0
    await settled(gw, sim)


async def test_gzip_bodies_are_inflated_and_forwarded_as_identity(gw: Gw, sim: Sim) -> None:
    body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 2}).encode()
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    status, _, raw = await post(gw.url + CHAT, data=gzip.compress(body), headers=headers)
    assert status == 200, raw
    sent = {k.lower() for k in sim.journal[-1]["headers"]}
    assert "content-encoding" not in sent
    assert sim.journal[-1]["body"]["max_tokens"] == 2

    error = await assert_invalid(gw, CHAT, b"\x1f\x8bnot gzip at all", {"Content-Encoding": "gzip"})
    assert "gzip" in str(error["message"])
    status, _, raw = await post(gw.url + CHAT, data=body, headers={**headers, "Content-Encoding": "compress"})
    assert status == 415
    error_body(json.loads(raw), code="unsupported_encoding", type="invalid_request_error")
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", error_type="internal_error") == 0
    assert len(sim.journal) == 1
    await settled(gw, sim)


async def test_a_gzip_bomb_is_stopped_at_the_body_limit(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack)
    gw = await gateway_in(stack, [sim.url], max_body_bytes=100_000)
    bomb = gzip.compress(b'{"model":"' + b"a" * 50_000_000 + b'"}')
    assert len(bomb) < 100_000
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    status, _, raw = await post(gw.url + CHAT, data=bomb, headers=headers)
    assert status == 413
    error_body(json.loads(raw), code="body_too_large", type="invalid_request_error")
    assert sim.journal == []
    await settled(gw, sim)


async def test_forwarded_headers(stack: contextlib.AsyncExitStack) -> None:
    """Every Connection header's names are dropped; X-Forwarded-For names the client; cookies stay here;
    an unsafe or overlong request id is replaced; the engine's key replaces the client's Authorization."""
    sim = await sim_in(stack)
    gw = await gateway_in(stack, [sim.url], upstream_api_key="engine-secret")
    raw_headers = [
        ("Connection", "keep-alive"),
        ("Connection", "X-Second-Hop"),
        ("X-Second-Hop", "per-connection"),
        ("X-Forwarded-For", "203.0.113.7"),
        ("Cookie", "session=abc"),
        ("Authorization", "Bearer client-key"),
        ("X-Request-Id", "x" * 8000),
        ("Content-Type", "application/json"),
    ]
    body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 2})
    async with aiohttp.ClientSession() as s, s.post(gw.url + CHAT, data=body, headers=CIMultiDict(raw_headers)) as r:
        assert r.status == 200
        returned_id = r.headers["X-Request-Id"]
    assert len(returned_id) < 200
    sent = {k.lower(): v for k, v in sim.journal[-1]["headers"].items()}
    assert "x-second-hop" not in sent
    assert "cookie" not in sent
    assert sent["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert sent["authorization"] == "Bearer engine-secret"
    assert sent["x-request-id"] == returned_id
    await settled(gw, sim)


# -- routes the gateway does not parse, and what engines say inside a stream ------------------------------


async def test_other_v1_posts_are_checked_and_charged(stack: contextlib.AsyncExitStack, tmp_path: Path) -> None:
    """/v1/responses, Anthropic's /v1/messages, batches: the model a key may use and the token budget hold
    there too (a token per 4 body bytes); a generation path with a trailing slash is a 404, not a bypass."""
    sim = await sim_in(stack)
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[[key]]\nname = "narrow"\nkey = "{"n" * 20}"\nmodels = ["another-model"]\n', encoding="utf-8")
    gw = await gateway_in(stack, [sim.url], keys_file=str(keys), max_tokens_in_flight=1000)
    auth = {"Authorization": f"Bearer {'n' * 20}"}
    for path in ("/v1/responses", "/v1/messages", "/v1/chat/completions/batch"):
        status, _, raw = await post(gw.url + path, json_body={"model": MODEL, "input": "hi"}, headers=auth)
        assert status == 403, (path, raw)
        error_body(json.loads(raw), code="model_not_allowed", type="permission_error", param="model")
    status, _, raw = await post(gw.url + CHAT + "/", json_body={"model": MODEL, "messages": HELLO}, headers=auth)
    assert status == 404, raw
    open_gw = await gateway_in(stack, [sim.url], max_tokens_in_flight=1000)
    status, _, raw = await post(open_gw.url + "/v1/responses", json_body={"model": MODEL, "input": "x" * 8000})
    assert status == 400, raw  # 2,000 tokens charged: more than the whole budget
    error_body(json.loads(raw), code="tokens_budget", type="invalid_request_error")
    assert sim.journal == []
    await settled(gw, sim)
    await settled(open_gw, sim)


def _sse(*events: bytes) -> bytes:
    body = b"".join(b"data: " + e + b"\n\n" for e in events)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(body)
    return head + body


async def test_an_engine_error_event_is_an_error_not_a_token(stack: contextlib.AsyncExitStack) -> None:
    role = (
        b'{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}'
    )
    error = b'{"error":{"message":"boom","type":"InternalServerError","param":null,"code":500}}'
    async with scripted(answering(_sse(role, error, b"[DONE]"))) as (url, _):
        gw = await gateway_in(stack, [url], wait_ready=False)
        body = {"model": MODEL, "messages": HELLO, "stream": True}
        async with aiohttp.ClientSession() as s, s.post(gw.url + CHAT, json=body) as r:
            assert r.status == 200
            assert b'"message":"boom"' in await r.read()
        text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", error_type="upstream_error") == 1
    assert value(text, "gateway_completion_tokens_sum") == 0
    assert value(text, "gateway_time_to_first_token_seconds_count") == 0


async def test_continuous_usage_stats_stay_off_when_the_gateway_asks_for_usage(gw: Gw, sim: Sim) -> None:
    body = {"model": MODEL, "messages": HELLO, "stream": True, "stream_options": {"continuous_usage_stats": True}}
    async with aiohttp.ClientSession() as s, s.post(gw.url + CHAT, json=body) as r:
        raw = await r.read()
    assert b'"usage"' not in raw  # without include_usage vLLM sends no usage at all
    assert sim.journal[-1]["body"]["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    await settled(gw, sim)


async def test_two_choices_role_chunks_in_one_read_are_not_the_first_token(stack: contextlib.AsyncExitStack) -> None:
    """n=2: both role-only chunks arrive together, the tokens 0.3 s later: TTFT is the tokens' arrival."""

    def chunk(index: int, delta: bytes) -> bytes:
        return b'data: {"object":"chat.completion.chunk","choices":[{"index":%d,"delta":%s}]}\n\n' % (index, delta)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        writer.write(chunk(0, b'{"role":"assistant"}') + chunk(1, b'{"role":"assistant"}'))
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(chunk(0, b'{"content":"a"}') + chunk(1, b'{"content":"b"}') + b"data: [DONE]\n\n")
        await writer.drain()

    async with scripted(script) as (url, _):
        gw = await gateway_in(stack, [url], wait_ready=False)
        body = {"model": MODEL, "messages": HELLO, "stream": True, "n": 2}
        async with aiohttp.ClientSession() as s, s.post(gw.url + CHAT, json=body) as r:
            assert r.status == 200
            await r.read()
        text = await gw.metrics()
    assert value(text, "gateway_time_to_first_token_seconds_count") == 1
    assert value(text, "gateway_time_to_first_token_seconds_sum") >= 0.3  # not the role chunks' arrival
    assert value(text, "gateway_completion_tokens_sum") == 2
