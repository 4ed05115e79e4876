"""Engine faults and client disconnects: what the client sees, what is counted, what the engine aborts."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import openai
import pytest

from tests.harness import (
    CHAT,
    HELLO,
    MODEL,
    Gw,
    Sim,
    cancel,
    client_in,
    error_body,
    free_port,
    gateway_in,
    post,
    settled,
    sim_in,
    sim_metrics,
    value,
    wait_for,
)

# a hung exchange fails the test instead of hanging the run (pytest-timeout)
pytestmark = pytest.mark.timeout(30)


def chat(max_tokens: int = 2, *, stream: bool = False) -> dict[str, Any]:
    return {"model": MODEL, "messages": HELLO, "max_tokens": max_tokens, "stream": stream}


async def aborts(sim: Sim) -> float:
    return value(await sim_metrics(sim), "vllm:request_success_total", finished_reason="abort")


# -- the engine cannot be reached, is silent, or fails ----------------------------------------------------


async def test_engine_unreachable_is_502(stack: contextlib.AsyncExitStack) -> None:
    gw = await gateway_in(stack, [f"http://127.0.0.1:{free_port()}"], wait_ready=False)
    client = await client_in(stack, gw)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    assert caught.value.status_code == 502
    error_body(caught.value.response.json(), code="upstream_unavailable", type="server_error")
    assert caught.value.response.headers["X-Request-Id"]
    status, _, raw = await post(gw.url + CHAT, json_body=chat(stream=True))
    assert status == 502
    error_body(json.loads(raw), code="upstream_unavailable", type="server_error")
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", error_type="upstream_unavailable") == 2
    assert value(text, "gateway_requests_total", endpoint="chat_completions", status="502") == 2
    assert value(text, "gateway_upstream_up") == 0
    await settled(gw)


async def test_engine_silent_is_504(stack: contextlib.AsyncExitStack, sim: Sim) -> None:
    gw = await gateway_in(stack, [sim.url], upstream_read_timeout=0.3)
    await sim.faults(hang=True)
    status, headers, raw = await post(gw.url + CHAT, json_body=chat(), headers={"X-Request-Id": "silent"})
    assert status == 504
    assert headers["X-Request-Id"] == "silent"
    error_body(json.loads(raw), code="upstream_timeout", type="server_error")
    assert sim.journal[-1]["request_id"] == "silent"
    assert sim.outcomes() == ["hang"]
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="upstream_timeout") == 1
    assert value(text, "gateway_requests_total", model=MODEL, status="504") == 1
    await settled(gw, sim)


async def test_engine_silent_mid_stream(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, itl=30.0)  # the first token, then 30 s of silence
    gw = await gateway_in(stack, [sim.url], upstream_read_timeout=0.3)
    client = await client_in(stack, gw)
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, stream=True)
    got: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "the "
    await wait_for(lambda: sim.outcomes() == ["abort"], "the engine to abort the stream")
    await settled(gw, sim)
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="upstream_timeout") == 1
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 1
    assert await aborts(sim) == 1
    # the error event's code is the error_type counted (README: code == error_type label)
    assert isinstance(caught.value.body, dict)
    error_body({"error": caught.value.body}, code="upstream_timeout", type="server_error")


@pytest.mark.parametrize("status", [500, 503, 400])
@pytest.mark.parametrize("stream", [False, True])
async def test_engine_errors_pass_through(gw: Gw, sim: Sim, status: int, stream: bool) -> None:
    await sim.faults(error_rate=1.0, error_status=status)
    got, headers, raw = await post(gw.url + CHAT, json_body=chat(stream=stream), headers={"X-Request-Id": "err"})
    assert got == status
    assert headers["X-Request-Id"] == "err"
    # untouched: the engine's own body
    assert json.loads(raw) == {
        "error": {
            "message": "simulated engine failure",
            "type": "InternalServerError",
            "param": None,
            "code": status,
        }
    }
    assert sim.outcomes() == [f"error {status}"]
    text = await gw.metrics()
    assert value(text, "gateway_requests_total", model=MODEL, endpoint="chat_completions", status=str(status)) == 1
    # an engine 5xx is a failed request (upstream_error); an engine 4xx is the client's mistake
    errors = 1 if status >= 500 else 0
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="upstream_error") == errors
    assert value(text, "gateway_request_errors_total") == errors
    await settled(gw, sim)


async def test_engine_error_through_openai_client(client: openai.AsyncOpenAI, gw: Gw, sim: Sim) -> None:
    await sim.faults(error_rate=1.0, error_status=503)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert caught.value.status_code == 503
    assert "simulated engine failure" in caught.value.message
    error_body({"error": caught.value.body}, code=503, type="InternalServerError")
    assert sim.outcomes() == ["error 503"]
    text = await gw.metrics()
    assert value(text, "gateway_requests_total", model=MODEL, status="503") == 1
    await settled(gw, sim)


async def test_engine_drops_mid_stream(client: openai.AsyncOpenAI, gw: Gw, sim: Sim) -> None:
    await sim.faults(drop_after_tokens=3)
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, stream=True)
    got: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "the gateway relays "  # the three tokens sent before the drop
    assert isinstance(caught.value.body, dict)
    error_body({"error": caught.value.body}, code="upstream_error", type="server_error")
    await settled(gw, sim)
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="upstream_error") == 1
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 1
    assert sim.outcomes() == ["dropped"]  # the engine's own fault, not a client abort


async def test_engine_drop_ends_with_error_event_and_done(gw: Gw, sim: Sim) -> None:
    await sim.faults(drop_after_tokens=2)
    status, _, raw = await post(gw.url + CHAT, json_body=chat(8, stream=True))
    assert status == 200
    events = raw.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    error_body(json.loads(events[-3].removeprefix(b"data: ")), code="upstream_error", type="server_error")
    assert all(json.loads(e.removeprefix(b"data: "))["choices"] for e in events[:-3])
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="upstream_error") == 1
    await settled(gw, sim)


async def refused_then_back(gw: Gw, sim: Sim, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert caught.value.status_code == 502
    error_body(caught.value.response.json(), code="upstream_unavailable", type="server_error")
    assert not gw.gateway.pool.upstreams[0].up
    text = await gw.metrics()
    assert value(text, "gateway_upstream_up", upstream=sim.url) == 0
    assert len(sim.journal) == 1  # nothing reached the engine
    # it comes back once it listens again and passes its health checks
    await wait_for(lambda: gw.gateway.pool.upstreams[0].up, "the engine to come back")
    reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert reply.choices[0].finish_reason == "length"
    assert sim.outcomes() == ["length", "length"]
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="upstream_unavailable") == 1
    assert value(text, "gateway_requests_total", model=MODEL, status="502") == 1
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 2
    assert value(text, "gateway_upstream_up", upstream=sim.url) == 1
    await settled(gw, sim)


async def test_engine_refusing_connections_then_back(stack: contextlib.AsyncExitStack, sim: Sim) -> None:
    """An engine that stops listening and drops its open connections (a restart, vLLM loading)."""
    gw = await gateway_in(stack, [sim.url])
    client = await client_in(stack, gw)
    await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    await sim.faults(refuse_seconds=1.0)
    await refused_then_back(gw, sim, client)


# -- client disconnects -----------------------------------------------------------------------------------


async def disconnected(gw: Gw, sim: Sim, *, engine_aborts: int, clients_left: int = 1) -> None:
    await settled(gw, sim)
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="client_disconnected") == clients_left
    assert value(text, "gateway_requests_total", model=MODEL, status="499") == clients_left
    assert value(text, "gateway_request_errors_total") == clients_left
    assert await aborts(sim) == engine_aborts
    assert sim.engine.aborted == engine_aborts


async def test_disconnect_while_queued(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, ttft=30.0)
    gw = await gateway_in(stack, [sim.url], max_concurrency=1)
    client = await client_in(stack, gw)
    held = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2))
    await wait_for(lambda: sim.outcomes() == ["running"], "the first request in the engine")
    queued = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2))
    await wait_for(lambda: gw.gateway.admission.queue_depth == 1, "the second request queued")
    await cancel(queued)
    await wait_for(lambda: gw.gateway.admission.queue_depth == 0, "the queue place freed")
    await wait_for(lambda: gw.gateway.proxy.active == 1, "the queued handler returned")
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="client_disconnected") == 1
    assert len(sim.journal) == 1  # it never reached the engine
    assert await aborts(sim) == 0
    await cancel(held)
    await wait_for(lambda: sim.outcomes() == ["abort"], "the held request aborted")
    await disconnected(gw, sim, engine_aborts=1, clients_left=2)
    assert len(sim.journal) == 1


async def test_disconnect_during_silent_prefill_stream(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, ttft=30.0)
    gw = await gateway_in(stack, [sim.url])
    client = await client_in(stack, gw)

    async def read() -> None:
        stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, stream=True)
        async for _ in stream:
            pass

    task = asyncio.create_task(read())
    await wait_for(lambda: sim.outcomes() == ["running"] and sim.engine.running == 1, "the engine in prefill")
    await cancel(task)
    await wait_for(lambda: sim.outcomes() == ["abort"], "the engine to abort the prefill")
    await disconnected(gw, sim, engine_aborts=1)
    text = await gw.metrics()
    assert value(text, "gateway_time_to_first_token_seconds_count") == 0


async def test_disconnect_during_silent_prefill_not_streamed(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, ttft=30.0)
    gw = await gateway_in(stack, [sim.url])
    task = asyncio.create_task(post(gw.url + CHAT, json_body=chat()))
    await wait_for(lambda: sim.engine.running == 1, "the engine in prefill")
    await cancel(task)
    await wait_for(lambda: sim.outcomes() == ["abort"], "the engine to abort the prefill")
    await disconnected(gw, sim, engine_aborts=1)


async def test_disconnect_mid_stream(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, itl=30.0)
    gw = await gateway_in(stack, [sim.url])
    client = await client_in(stack, gw)
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, stream=True)
    first = await stream.__anext__()
    assert first.choices[0].delta.role == "assistant"
    token = await stream.__anext__()
    assert token.choices[0].delta.content == "the "
    assert sim.outcomes() == ["running"]
    await stream.close()
    await wait_for(lambda: sim.outcomes() == ["abort"], "the engine to abort the stream")
    await disconnected(gw, sim, engine_aborts=1)
    text = await gw.metrics()
    assert value(text, "gateway_time_to_first_token_seconds_count", model=MODEL) == 1


async def test_disconnect_waiting_on_answer_not_streamed(stack: contextlib.AsyncExitStack) -> None:
    # past prefill, decoding 100 tokens 1 s apart before the single answer is sent
    sim = await sim_in(stack, itl=1.0)
    gw = await gateway_in(stack, [sim.url])
    client = await client_in(stack, gw)
    task = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100))
    await wait_for(lambda: sim.engine.running == 1, "the engine decoding")
    await cancel(task)
    await wait_for(lambda: sim.outcomes() == ["abort"], "the engine to abort")
    await disconnected(gw, sim, engine_aborts=1)
    text = await gw.metrics()
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 0
