"""Hostile bodies and headers on the request path: each a 4xx or forwarded as the engine should get it, never a 500."""

from __future__ import annotations

import contextlib
import gzip
import json

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
