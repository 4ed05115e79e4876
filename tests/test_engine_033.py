"""The gateway in front of vLLM 0.33 and 0.11 engines: clamping, SSE comments, a busy engine, every series."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import tokens
from tests.harness import (
    CHAT,
    HELLO,
    MODEL,
    Sim,
    client_in,
    error_body,
    fetch,
    gateway_in,
    post,
    settled,
    sim_in,
    sim_metrics,
    value,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)


def chat(**fields: object) -> dict[str, object]:
    return {"model": MODEL, "messages": HELLO, **fields}


# -- 1. max_tokens clamped, not refused -------------------------------------------------------------------


async def test_the_token_budget_is_charged_the_clamped_max_tokens(stack: contextlib.AsyncExitStack) -> None:
    """With a budget as large as the window, a request whose max_tokens 0.33 would clamp fits the budget:
    it is charged prompt + what fits, not prompt + max_tokens."""
    sim = await sim_in(stack, max_model_len=1000)
    gw = await gateway_in(stack, [sim.url], max_tokens_in_flight=1000)
    await sim.faults(hang=True)
    task = asyncio.create_task(post(gw.url + CHAT, json_body=chat(max_tokens=999)))
    await wait_for(lambda: sim.outcomes() == ["hang"], "the request in the engine")
    assert gw.gateway.admission.tokens_in_flight == 1000  # prompt estimate + (1000 - estimate)
    await sim.faults(hang=False)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    status, _, raw = await post(gw.url + CHAT, json_body=chat(max_tokens=999))
    assert status == 200, raw
    assert json.loads(raw)["choices"][0]["finish_reason"] == "length"
    await settled(gw, sim)


async def test_chat_reads_max_completion_tokens_before_max_tokens(stack: contextlib.AsyncExitStack) -> None:
    """vLLM's chat path uses max_completion_tokens first: so do the budget and the context check
    (max_tokens=1 does not hide max_completion_tokens=100000 from a budget of 1000)."""
    sim = await sim_in(stack, max_model_len=200000)
    gw = await gateway_in(stack, [sim.url], max_tokens_in_flight=1000)
    status, _, raw = await post(gw.url + CHAT, json_body=chat(max_tokens=1, max_completion_tokens=100000))
    assert status == 400
    error_body(json.loads(raw), code="tokens_budget", type="invalid_request_error")
    status, _, raw = await post(gw.url + CHAT, json_body=chat(max_tokens=100000, max_completion_tokens=3))
    assert status == 200, raw
    assert json.loads(raw)["usage"]["completion_tokens"] == 3
    small = await gateway_in(stack, [sim.url], context_window=100)
    status, _, raw = await post(small.url + CHAT, json_body=chat(max_tokens=1, max_completion_tokens=101))
    assert status == 400
    error = error_body(json.loads(raw), code=400, type="BadRequestError", param="max_completion_tokens")
    assert error["message"].startswith("max_completion_tokens=101 cannot be greater than max_model_len=100.")
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", error_type="tokens_budget") == 1
    await settled(gw, sim)
    await settled(small, sim)


# -- 2. SSE comment lines ---------------------------------------------------------------------------------


async def test_keep_alive_comments_reach_the_client_and_are_never_tokens(stack: contextlib.AsyncExitStack) -> None:
    """An engine started with --sse-keep-alive-interval writes `: keep-alive` while idle: the client gets
    every comment, and TTFT, ITL and the completion count see only the content events."""
    sim = await sim_in(stack, sse_keep_alive_interval=0.005, ttft=0.1, itl=0.03)
    gw = await gateway_in(stack, [sim.url])
    async with aiohttp.ClientSession() as s:
        direct = await (await s.post(sim.url + CHAT, json=chat(max_tokens=5, stream=True))).read()
        async with s.post(gw.url + CHAT, json=chat(max_tokens=5, stream=True)) as r:
            assert r.status == 200
            relayed = await r.read()
    for raw in (direct, relayed):
        assert b": keep-alive\n\n" in raw
    assert relayed.count(b": keep-alive\n\n") > 1
    data = [e for e in relayed.split(b"\n\n") if e.startswith(b"data: {")]
    assert len(data) == 1 + 5  # the role chunk, then five tokens (the usage chunk was the gateway's own)
    assert relayed.endswith(b"data: [DONE]\n\n")
    text = await gw.metrics()
    labels = {"model": MODEL, "endpoint": "chat_completions"}
    assert value(text, "gateway_completion_tokens_sum", **labels) == 5
    assert value(text, "gateway_time_to_first_token_seconds_count", **labels) == 1
    assert value(text, "gateway_inter_token_latency_seconds_count", **labels) == 4
    # the first token came after the prefill, not with the first comment
    assert value(text, "gateway_time_to_first_token_seconds_sum", **labels) >= 0.1

    client = await client_in(stack, gw)
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, stream=True)  # type: ignore[arg-type]
    content = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
    assert len(content) == 3
    await settled(gw, sim)


# -- 3. the engine's own queue is full --------------------------------------------------------------------


async def fill_engine(sim: Sim, stack: contextlib.AsyncExitStack) -> None:
    """Slow requests straight to the engine until it answers 503 (its own queue is full); they are
    cancelled when the test ends."""
    session = aiohttp.ClientSession()
    stack.push_async_callback(session.close)

    async def slow() -> None:
        async with session.post(sim.url + CHAT, json=chat(max_tokens=10000)) as r:
            await r.read()

    for n in range(1, 6):
        stack.callback(asyncio.create_task(slow()).cancel)
        await wait_for(lambda n=n: sim.engine.unfinished >= n, "the slow request in the engine")
        status, _, _ = await post(sim.url + CHAT, json_body=chat(max_tokens=1))
        if status == 503:
            return
    raise AssertionError("the engine never got busy")


async def test_a_busy_engine_s_503_moves_to_another_engine(stack: contextlib.AsyncExitStack) -> None:
    busy = await sim_in(stack, max_num_seqs=1, max_num_queued_reqs=1, itl=0.5)
    free = await sim_in(stack)
    gw = await gateway_in(stack, [busy.url, free.url])
    await wait_for(lambda: all(u.up for u in gw.gateway.pool.upstreams), "both engines up")
    await fill_engine(busy, stack)

    status, _, raw = await post(gw.url + CHAT, json_body=chat(max_tokens=2))
    assert status == 200, raw
    assert free.outcomes() == ["length"]
    text = await gw.metrics()
    assert value(text, "gateway_retries_total", upstream=busy.url, reason="unavailable") == 1
    assert value(text, "gateway_request_errors_total") == 0
    engine = await sim_metrics(busy)
    assert value(engine, "vllm:admission_rejections_total") == 2  # the probe, then the gateway's try
    # the engine's counter, re-exported (the gateway's copy of an engine's series is at most a second old)
    relayed = [0.0]

    async def rejections() -> None:
        relayed[0] = value(await gw.metrics(), "vllm:admission_rejections_total", upstream=busy.url)

    while relayed[0] < 2:
        await rejections()
        await asyncio.sleep(0.2)


async def test_a_busy_engine_s_503_passes_through_with_retry_after(stack: contextlib.AsyncExitStack) -> None:
    busy = await sim_in(stack, max_num_seqs=1, max_num_queued_reqs=1, itl=0.5)
    gw = await gateway_in(stack, [busy.url])
    await fill_engine(busy, stack)
    client = await client_in(stack, gw)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    response = caught.value.response
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert "busy" in response.json()["error"]["message"]
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="engine_busy") == 1
    assert value(text, "gateway_request_errors_total", error_type="upstream_error") == 0
    assert value(text, "gateway_requests_total", model=MODEL, status="503") == 1
    assert gw.gateway.admission.in_flight == 0


# -- 4. every series of either generation comes through ---------------------------------------------------


@pytest.mark.parametrize("generation", ["0.33", "0.11"])
async def test_every_engine_series_of_either_generation_comes_through(
    stack: contextlib.AsyncExitStack, generation: str
) -> None:
    sim = await sim_in(stack, vllm_compat=generation)
    gw = await gateway_in(stack, [sim.url])
    client = await client_in(stack, gw)
    await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    await settled(gw, sim)
    engine = {f.name: f for f in text_string_to_metric_families(await sim_metrics(sim)) if f.name.startswith("vllm:")}
    relayed = {f.name: f for f in text_string_to_metric_families(await gw.metrics())}
    assert engine
    for name, family in engine.items():
        assert name in relayed, name
        assert relayed[name].type == family.type, name
        assert len(relayed[name].samples) == len(family.samples), name
    if generation == "0.33":
        for name in ("vllm:cache_config_info", "vllm:admission_rejections", "vllm:num_requests_waiting_by_reason"):
            assert name in relayed, name
        assert "vllm:gpu_cache_usage_perc" not in relayed
    status, _, raw = await fetch("GET", gw.url + "/v1/models")
    assert status == 200 and json.loads(raw)["data"][0]["id"] == MODEL


async def test_the_estimate_names_itself_a_lower_bound(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, max_model_len=50)
    gw = await gateway_in(stack, [sim.url])
    messages = [{"role": "user", "content": "abcd" * 60}]
    status, _, raw = await post(gw.url + CHAT, json_body={"model": MODEL, "messages": messages})
    assert status == 400
    error = error_body(json.loads(raw), code=400, type="BadRequestError", param="input_tokens")
    estimate = tokens.messages_tokens(messages)
    assert f"your prompt contains at least {estimate} input tokens" in error["message"]
    assert error["message"].endswith(f"(parameter=input_tokens, value={estimate})")
    await settled(gw, sim)
