"""The request path end to end: pass-through, unbuffered SSE, headers, GLM stop ids and several engines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from typing import Any

import aiohttp
import openai
import pytest

from tests.harness import (
    HELLO,
    MODEL,
    Gw,
    Sim,
    client_in,
    error_body,
    fetch,
    gateway_in,
    settled,
    sim_in,
    sim_metrics,
    start_sim,
    start_sim_at,
    value,
    wait_for,
)

# a hung exchange fails the test instead of hanging the run (pytest-timeout)
pytestmark = pytest.mark.timeout(30)

GLM_STOPS = [151329, 151336, 151338]
_CREATED = re.compile(rb'"created":\d+')


# -- pass-through -----------------------------------------------------------------------------------------


async def test_models_pass_through(client: openai.AsyncOpenAI, gw: Gw, sim: Sim) -> None:
    page = await client.models.list()
    assert [m.id for m in page.data] == [MODEL]
    status, _, direct = await fetch("GET", sim.url + "/v1/models")
    assert status == 200
    status, headers, through = await fetch("GET", gw.url + "/v1/models")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    # the same card as the engine's (served from the gateway's health checks), apart from the creation time
    assert [{**c, "created": 0} for c in json.loads(through)["data"]] == [
        {**c, "created": 0} for c in json.loads(direct)["data"]
    ]
    assert json.loads(through)["data"][0]["max_model_len"] == sim.engine.settings.max_model_len
    text = await gw.metrics()
    assert value(text, "gateway_requests_total", endpoint="models", status="200") == 2
    assert value(text, "gateway_request_errors_total") == 0
    assert sim.journal == []  # GETs are not generations: nothing ran in the engine
    await settled(gw, sim)


@pytest.mark.parametrize(
    ("method", "path", "body", "endpoint"),
    [
        ("GET", "/version", None, "version"),
        ("POST", "/tokenize", {"prompt": "Hello there, 世界"}, "tokenize"),
        ("POST", "/tokenize", {"messages": HELLO}, "tokenize"),
        ("POST", "/detokenize", {"tokens": [0, 1, 2, 3]}, "detokenize"),
    ],
)
async def test_vllm_routes_pass_through(gw: Gw, sim: Sim, method: str, path: str, body: Any, endpoint: str) -> None:
    status, _, direct = await fetch(method, sim.url + path, json_body=body)
    assert status == 200
    status, headers, through = await fetch(method, gw.url + path, json_body=body)
    assert status == 200
    assert through == direct
    assert headers["Content-Type"].startswith("application/json")
    assert headers["X-Request-Id"]
    text = await gw.metrics()
    assert value(text, "gateway_requests_total", endpoint=endpoint, status="200") == 1
    assert value(text, "gateway_request_errors_total") == 0
    assert sim.journal == []
    await settled(gw, sim)


@pytest.mark.parametrize("request_id", ["nf-1234", None])
async def test_unknown_path_is_openai_404(gw: Gw, sim: Sim, request_id: str | None) -> None:
    headers = {"X-Request-Id": request_id} if request_id else {}
    status, got, raw = await fetch("GET", gw.url + "/no/such/thing", headers=headers)
    assert status == 404
    assert got["Content-Type"].startswith("application/json")
    error_body(json.loads(raw), code="not_found", type="invalid_request_error")
    # README: every error the gateway makes carries X-Request-Id (passed through or created)
    if request_id:
        assert got["X-Request-Id"] == request_id
    else:
        assert got.get("X-Request-Id"), "a created request id is returned on errors too"
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", error_type="not_found") == 1
    assert value(text, "gateway_requests_total", status="404") == 1
    assert sim.journal == []
    await settled(gw, sim)


# -- SSE relay --------------------------------------------------------------------------------------------


async def test_stream_is_not_buffered(stack: contextlib.AsyncExitStack) -> None:
    # the engine sends the role chunk and the first token, then sleeps 30 s before the second
    sim = await sim_in(stack, itl=30.0)
    gw = await gateway_in(stack, [sim.url])
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 5, "stream": True}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(gw.url + "/v1/chat/completions", json=body)
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events: list[dict[str, Any]] = []
        buf = b""
        while len(events) < 2:
            buf += await resp.content.readany()
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                assert event.startswith(b"data: ")
                events.append(json.loads(event[6:]))
        # the first token reached the client while the engine is still on the request
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert events[1]["choices"][0]["delta"] == {"content": "the "}
        assert sim.outcomes() == ["running"]
        assert sim.engine.running == 1
        assert buf == b""  # nothing else was sent: the second token is not made yet
        resp.close()  # the client leaves mid-stream
    await wait_for(lambda: sim.outcomes() == ["abort"], "the engine to abort the request")
    await settled(gw, sim)
    assert sim.engine.aborted == 1
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="client_disconnected") == 1
    assert value(text, "gateway_requests_total", model=MODEL, status="499") == 1
    assert value(await sim_metrics(sim), "vllm:request_success_total", finished_reason="abort") == 1


async def raw_stream(url: str, path: str, body: dict[str, Any], request_id: str) -> tuple[Any, bytes]:
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body, headers={"X-Request-Id": request_id}) as r:
        assert r.status == 200
        return r.headers, await r.read()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 6}),
        ("/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6}),
    ],
)
@pytest.mark.parametrize("include_usage", [True, False])
async def test_stream_bytes_equal_the_engine_s(
    gw: Gw, sim: Sim, path: str, body: dict[str, Any], include_usage: bool
) -> None:
    body = {**body, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    direct_headers, direct = await raw_stream(sim.url, path, body, "same-id")
    through_headers, through = await raw_stream(gw.url, path, body, "same-id")
    assert through_headers["Content-Type"] == direct_headers["Content-Type"]
    assert through_headers["X-Request-Id"] == "same-id"
    # ids match through X-Request-Id; only `created` (the engine's clock) may differ
    assert _CREATED.sub(b"", through) == _CREATED.sub(b"", direct)
    assert through.endswith(b"data: [DONE]\n\n")
    assert (b'"usage"' in through) is include_usage
    # the gateway asked for usage on the client's behalf when it did not
    forwarded = sim.journal[-1]
    assert forwarded["request_id"] == "same-id"
    assert forwarded["body"]["stream_options"] == {"include_usage": True}
    assert sim.outcomes() == ["length", "length"]
    endpoint = "chat_completions" if "chat" in path else "completions"
    text = await gw.metrics()
    assert value(text, "gateway_requests_total", model=MODEL, endpoint=endpoint, status="200") == 1
    assert value(text, "gateway_completion_tokens_sum", model=MODEL, endpoint=endpoint) == 6
    assert value(text, "gateway_request_errors_total") == 0
    await settled(gw, sim)


@pytest.mark.parametrize(
    "stream_options",
    [
        pytest.param(None, id="absent"),
        pytest.param({"include_usage": False}, id="false"),
        pytest.param({}, id="empty"),
    ],
)
async def test_usage_chunk_only_for_clients_that_ask(
    client: openai.AsyncOpenAI, gw: Gw, sim: Sim, stream_options: dict[str, Any] | None
) -> None:
    extra = {} if stream_options is None else {"stream_options": stream_options}
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, stream=True, **extra)
    chunks = [c async for c in stream]
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    assert sim.journal[-1]["body"]["stream_options"] == {"include_usage": True}

    stream = await client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=3, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].usage.prompt_tokens == sim.journal[-1]["prompt_tokens"]
    assert all(c.usage is None for c in chunks[:-1])

    text = await gw.metrics()
    # both counted from the engine's usage chunk, stripped or not
    assert value(text, "gateway_completion_tokens_count", model=MODEL) == 2
    assert value(text, "gateway_completion_tokens_sum", model=MODEL) == 7
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 2
    assert sim.outcomes() == ["length", "length"]
    await settled(gw, sim)


# -- headers ----------------------------------------------------------------------------------------------


async def test_hop_by_hop_headers_dropped_and_host_rewritten(gw: Gw, sim: Sim) -> None:
    headers = {
        "Connection": "keep-alive, X-Secret-Hop",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "X-Secret-Hop": "per-connection",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "Trailer": "X-Checksum",
        "X-Foo": "bar",
        "Authorization": "Bearer end-to-end",
        "X-Request-Id": "hop-1",
    }
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
    status, got, raw = await fetch("POST", gw.url + "/v1/chat/completions", json_body=body, headers=headers)
    assert status == 200, raw
    assert got["X-Request-Id"] == "hop-1"
    assert json.loads(raw)["id"] == "chatcmpl-hop-1"
    sent = {k.lower(): v for k, v in sim.journal[-1]["headers"].items()}
    for name in ("keep-alive", "te", "x-secret-hop", "proxy-authorization", "trailer"):
        assert name not in sent, f"{name} was forwarded"
    assert "x-secret-hop" not in sent.get("connection", "").lower()
    assert sent["x-foo"] == "bar"
    assert sent["authorization"] == "Bearer end-to-end"
    assert sent["host"] == sim.url.removeprefix("http://")
    assert sent["x-request-id"] == "hop-1"
    assert sim.journal[-1]["request_id"] == "hop-1"
    text = await gw.metrics()
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 1
    assert value(text, "gateway_request_errors_total") == 0
    assert sim.outcomes() == ["length"]
    await settled(gw, sim)


async def test_request_id_created_when_absent(gw: Gw, sim: Sim) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
    status, got, raw = await fetch("POST", gw.url + "/v1/chat/completions", json_body=body)
    assert status == 200
    created = got["X-Request-Id"]
    assert created
    assert sim.journal[-1]["request_id"] == created  # gateway and engine logs join on it
    assert json.loads(raw)["id"] == "chatcmpl-" + created

    # and on the gateway's own error responses, passed through or created
    status, got, raw = await fetch(
        "POST", gw.url + "/v1/chat/completions", data=b"{oops", headers={"X-Request-Id": "bad-1"}
    )
    assert status == 400
    assert got["X-Request-Id"] == "bad-1"
    error_body(json.loads(raw), code="invalid_request", type="invalid_request_error")
    status, got, raw = await fetch("POST", gw.url + "/v1/chat/completions", data=b"{oops")
    assert status == 400
    assert got["X-Request-Id"] and got["X-Request-Id"] != created

    text = await gw.metrics()
    assert value(text, "gateway_requests_total", endpoint="chat_completions", status="200") == 1
    assert value(text, "gateway_request_errors_total", error_type="invalid_request") == 2
    assert len(sim.journal) == 1
    await settled(gw, sim)


# -- GLM-4 stop token ids ---------------------------------------------------------------------------------


async def test_glm_stop_ids_added_when_absent(client: openai.AsyncOpenAI, gw: Gw, sim: Sim) -> None:
    await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    await client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert [e["body"]["stop_token_ids"] for e in sim.journal] == [GLM_STOPS, GLM_STOPS]
    text = await gw.metrics()
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 2
    assert sim.outcomes() == ["length", "length"]
    await settled(gw, sim)


@pytest.mark.parametrize("sent", [[7, 8], []])
async def test_glm_stop_ids_left_alone_when_client_sent_some(
    client: openai.AsyncOpenAI, gw: Gw, sim: Sim, sent: list[int]
) -> None:
    await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, extra_body={"stop_token_ids": sent})
    assert sim.journal[-1]["body"]["stop_token_ids"] == sent
    text = await gw.metrics()
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 1
    await settled(gw, sim)


async def test_glm_stop_ids_switched_off(stack: contextlib.AsyncExitStack, sim: Sim) -> None:
    gw = await gateway_in(stack, [sim.url], glm_stop_tokens=False)
    client = await client_in(stack, gw)
    await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, stream=True)
    [c async for c in stream]
    assert all("stop_token_ids" not in e["body"] for e in sim.journal)
    text = await gw.metrics()
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 2
    await settled(gw, sim)


async def test_glm_stop_ids_not_for_other_models(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, model="llama")
    gw = await gateway_in(stack, [sim.url])
    client = await client_in(stack, gw)
    reply = await client.chat.completions.create(model="llama", messages=HELLO, max_tokens=2)
    assert reply.model == "llama"
    assert "stop_token_ids" not in sim.journal[-1]["body"]
    text = await gw.metrics()
    assert value(text, "gateway_requests_total", model="llama", status="200") == 1
    await settled(gw, sim)


async def test_glm_stop_ids_added_when_model_omitted(gw: Gw, sim: Sim) -> None:
    # vLLM serves its (GLM-4) model to a request that names none: it needs the stop ids as much
    body = {"messages": HELLO, "max_tokens": 2}
    status, _, raw = await fetch("POST", gw.url + "/v1/chat/completions", json_body=body)
    assert status == 200, raw
    assert sim.journal[-1]["body"].get("stop_token_ids") == GLM_STOPS
    text = await gw.metrics()
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 1
    await settled(gw, sim)


# -- several engines --------------------------------------------------------------------------------------


async def test_least_in_flight_routing(stack: contextlib.AsyncExitStack) -> None:
    slow = await sim_in(stack, ttft=30.0)  # first in the list: a tie goes to it
    fast = await sim_in(stack)
    gw = await gateway_in(stack, [slow.url, fast.url])
    await wait_for(lambda: all(u.up for u in gw.gateway.pool.upstreams), "both engines up")
    client = await client_in(stack, gw)
    held = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2))
    try:
        await wait_for(lambda: slow.outcomes() == ["running"], "the first request to be held by the slow engine")
        text = await gw.metrics()
        assert value(text, "gateway_upstream_requests_in_flight", upstream=slow.url) == 1
        for _ in range(3):
            reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
            assert reply.choices[0].finish_reason == "length"
        assert fast.outcomes() == ["length"] * 3
        assert len(slow.journal) == 1
    finally:
        held.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await held
    await wait_for(lambda: slow.outcomes() == ["abort"], "the held request to be aborted")
    await settled(gw, slow, fast)
    text = await gw.metrics()
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 3
    assert value(text, "gateway_request_errors_total", error_type="client_disconnected") == 1
    assert value(await sim_metrics(slow), "vllm:request_success_total", finished_reason="abort") == 1
    assert value(await sim_metrics(fast), "vllm:request_success_total", finished_reason="abort") == 0


async def test_refusing_upstream_skipped_marked_down_and_back(stack: contextlib.AsyncExitStack) -> None:
    gone = await start_sim()
    port = int(gone.url.rsplit(":", 1)[1])
    alive = await sim_in(stack)
    # health checks driven by the test: the background loop checks once at start, then sleeps
    gw = await gateway_in(stack, [gone.url, alive.url], health_interval=3600.0)
    pool = gw.gateway.pool
    await wait_for(lambda: all(u.up for u in pool.upstreams), "both engines up")
    await gone.close()  # nothing listens on its port any more; the gateway still believes it up
    down = pool.upstreams[0]
    assert down.up

    client = await client_in(stack, gw)
    reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert reply.choices[0].finish_reason == "length"
    assert alive.outcomes() == ["length"]
    assert not down.up
    text = await gw.metrics()
    assert value(text, "gateway_upstream_up", upstream=gone.url) == 0
    assert value(text, "gateway_upstream_up", upstream=alive.url) == 1
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 1
    assert value(text, "gateway_request_errors_total") == 0

    # traffic keeps flowing to the live engine while the other stays down
    await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert alive.outcomes() == ["length", "length"]

    back = await start_sim_at(port)
    stack.push_async_callback(back.close)
    await gw.gateway.health.check_all()
    assert not down.up  # one good check is not enough (success threshold 2)
    await gw.gateway.health.check_all()
    assert down.up
    text = await gw.metrics()
    assert value(text, "gateway_upstream_up", upstream=gone.url) == 1
    await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert back.outcomes() == ["length"]  # a tie goes to the first engine again
    await settled(gw, alive, back)
