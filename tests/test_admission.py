"""Admission: body limit, field checks, context window, token estimate, concurrency cap, queue, budget."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from gateway import tokens
from gateway.admission import Admission
from gateway.errors import GatewayError
from tests.harness import (
    CHAT,
    HELLO,
    MODEL,
    Gw,
    Sim,
    cancel,
    client_in,
    error_body,
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


def chat(max_tokens: int = 2) -> dict[str, Any]:
    return {"model": MODEL, "messages": HELLO, "max_tokens": max_tokens}


# -- body size --------------------------------------------------------------------------------------------


async def test_body_over_limit_with_content_length(stack: contextlib.AsyncExitStack, sim: Sim) -> None:
    gw = await gateway_in(stack, [sim.url], max_body_bytes=1000)
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 2000}]}).encode()
    status, headers, raw = await post(gw.url + CHAT, data=big, headers={"Content-Type": "application/json"})
    assert status == 413
    error_body(json.loads(raw), code="body_too_large", type="invalid_request_error")
    assert headers["X-Request-Id"]
    # a body exactly at the limit is accepted
    small = {"model": MODEL, "messages": [{"role": "user", "content": ""}], "max_tokens": 1}
    raw_small = json.dumps(small).encode()
    small["messages"][0]["content"] = "y" * (1000 - len(raw_small))
    exact = json.dumps(small).encode()
    assert len(exact) == 1000
    status, _, raw = await post(gw.url + CHAT, data=exact, headers={"Content-Type": "application/json"})
    assert status == 200, raw
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", error_type="body_too_large") == 1
    assert value(text, "gateway_requests_total", endpoint="chat_completions", status="413") == 1
    assert value(text, "gateway_requests_total", endpoint="chat_completions", status="200") == 1
    assert len(sim.journal) == 1  # only the one at the limit reached the engine
    await settled(gw, sim)


async def test_chunked_body_over_limit(stack: contextlib.AsyncExitStack, sim: Sim) -> None:
    gw = await gateway_in(stack, [sim.url], max_body_bytes=1000)

    async def body() -> AsyncIterator[bytes]:
        yield b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
        for _ in range(6):
            yield b"z" * 400
        yield b'"}]}'

    async with aiohttp.ClientSession() as s, s.post(gw.url + CHAT, data=body()) as r:
        assert r.request_info.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in r.request_info.headers
        assert r.status == 413
        error_body(await r.json(), code="body_too_large", type="invalid_request_error")
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", error_type="body_too_large") == 1
    assert value(text, "gateway_requests_total", status="413") == 1
    assert sim.journal == []
    await settled(gw, sim)


# -- JSON and field types ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        pytest.param(CHAT, b'{"model": "m", "messages": [', None, id="malformed"),
        pytest.param(CHAT, b"\xff\xfe not utf-8", None, id="not-utf8"),
        pytest.param(CHAT, b'[{"role": "user"}]', None, id="array"),
        pytest.param(CHAT, b'"hello"', None, id="string"),
        pytest.param(CHAT, b'{"messages": "hello"}', "messages", id="messages-not-list"),
        pytest.param(CHAT, b'{"messages": []}', "messages", id="messages-empty"),
        pytest.param(CHAT, b'{"messages": ["hi"]}', "messages[0].role", id="message-not-object"),
        pytest.param(CHAT, b'{"messages": [{"role": "user", "content": 5}]}', "messages[0].content", id="content"),
        pytest.param(
            CHAT, b'{"messages": [{"role": "user"}], "max_tokens": "5"}', "max_tokens", id="max_tokens-string"
        ),
        pytest.param(CHAT, b'{"messages": [{"role": "user"}], "max_tokens": 0}', "max_tokens", id="max_tokens-0"),
        pytest.param(
            CHAT,
            b'{"messages": [{"role": "user"}], "max_completion_tokens": 1.5}',
            "max_completion_tokens",
            id="max_completion_tokens-float",
        ),
        pytest.param(CHAT, b'{"messages": [{"role": "user"}], "stream": "yes"}', "stream", id="stream-string"),
        pytest.param(
            CHAT,
            b'{"messages": [{"role": "user"}], "stop_token_ids": ["151329"]}',
            "stop_token_ids",
            id="stop_token_ids-strings",
        ),
        pytest.param(
            CHAT, b'{"messages": [{"role": "user"}], "stop_token_ids": 7}', "stop_token_ids", id="stop_ids-int"
        ),
        pytest.param(CHAT, b'{"messages": [{"role": "user"}], "model": 5}', "model", id="model-int"),
        pytest.param(
            CHAT,
            b'{"messages": [{"role": "user"}], "stream_options": true}',
            "stream_options",
            id="stream_options-bool",
        ),
        pytest.param("/v1/completions", b'{"prompt": 5}', "prompt", id="prompt-int"),
        pytest.param("/v1/completions", b'{"model": "m"}', "prompt", id="prompt-missing"),
    ],
)
async def test_invalid_body_is_400_naming_the_field(gw: Gw, sim: Sim, path: str, raw: bytes, param: str | None) -> None:
    status, headers, body = await post(
        gw.url + path, data=raw, headers={"Content-Type": "application/json", "X-Request-Id": "bad"}
    )
    assert status == 400
    assert headers["X-Request-Id"] == "bad"
    error_body(json.loads(body), code="invalid_request", type="invalid_request_error", param=param)
    text = await gw.metrics()
    endpoint = "chat_completions" if path == CHAT else "completions"
    assert value(text, "gateway_request_errors_total", endpoint=endpoint, error_type="invalid_request") == 1
    assert value(text, "gateway_requests_total", endpoint=endpoint, status="400") == 1
    assert sim.journal == []
    await settled(gw, sim)


async def test_invalid_body_through_openai_client(client: openai.AsyncOpenAI, gw: Gw, sim: Sim) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=MODEL, messages="hello", max_tokens=2)  # type: ignore[arg-type]
    assert caught.value.status_code == 400
    assert caught.value.code == "invalid_request"
    assert caught.value.param == "messages"
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", error_type="invalid_request") == 1
    assert sim.journal == []
    await settled(gw, sim)


# -- context window ---------------------------------------------------------------------------------------


def context_message(window: int, prompt: int) -> str:
    return (
        f"This model's maximum context length is {window} tokens. However, your prompt contains at least "
        f"{prompt} input tokens, which exceeds this limit even without any output tokens."
    )


async def test_prompt_longer_than_context_window(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, max_model_len=100)
    gw = await gateway_in(stack, [sim.url])
    client = await client_in(stack, gw)
    messages = [{"role": "user", "content": "abcd" * 120}]
    estimate = tokens.messages_tokens(messages)
    assert estimate == 122
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    error = error_body(caught.value.response.json(), code=400, type="BadRequestError", param="input_tokens")
    assert error["message"].startswith(context_message(100, estimate))
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="context_exceeded") == 1
    assert value(text, "gateway_requests_total", model=MODEL, status="400") == 1
    assert sim.journal == []
    await settled(gw, sim)


async def test_max_tokens_over_the_whole_window_is_refused(stack: contextlib.AsyncExitStack) -> None:
    """max_tokens larger than max_model_len: every vLLM generation refuses it, so the gateway does (0.33's words)."""
    sim = await sim_in(stack, max_model_len=100)
    gw = await gateway_in(stack, [sim.url])
    client = await client_in(stack, gw)
    for limit in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=MODEL, messages=HELLO, **{limit: 101})  # type: ignore[call-overload]
        error = error_body(caught.value.response.json(), code=400, type="BadRequestError", param=limit)
        assert error["message"] == (
            f"{limit}=101 cannot be greater than max_model_len=100. Please request fewer output tokens."
        )
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="context_exceeded") == 2
    assert sim.journal == []
    await settled(gw, sim)


async def test_prompt_plus_max_tokens_over_the_window_is_clamped_by_a_033_engine(
    stack: contextlib.AsyncExitStack,
) -> None:
    """vLLM 0.33 lowers max_tokens to what fits instead of refusing: the gateway lets it through."""
    sim = await sim_in(stack, max_model_len=100)
    gw = await gateway_in(stack, [sim.url])
    client = await client_in(stack, gw)
    count = await tokenize(sim.url, HELLO)
    reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 100 - count
    assert sim.outcomes() == ["length"]
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total") == 0
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 1
    await settled(gw, sim)


async def test_prompt_plus_max_tokens_over_the_window_is_the_011_engine_s_400(
    stack: contextlib.AsyncExitStack,
) -> None:
    """An engine of the older generation refuses what 0.33 clamps: its own 400 passes through untouched."""
    sim = await sim_in(stack, max_model_len=100, vllm_compat="0.11")
    gw = await gateway_in(stack, [sim.url])
    client = await client_in(stack, gw)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100)  # type: ignore[arg-type]
    message = caught.value.response.json()["error"]["message"]
    assert message.startswith("'max_tokens' or 'max_completion_tokens' is too large: 100.")
    assert sim.outcomes() == ["rejected"]
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total") == 0  # the engine's answer, not the gateway's error
    assert value(text, "gateway_requests_total", model=MODEL, status="400") == 1
    await settled(gw, sim)


async def test_context_window_override(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, max_model_len=100)
    smaller = await gateway_in(stack, [sim.url], context_window=50)
    larger = await gateway_in(stack, [sim.url], context_window=1000)
    messages = [{"role": "user", "content": "abcd" * 60}]  # estimate 62: over 50, under 100
    estimate = tokens.messages_tokens(messages)
    status, _, raw = await post(smaller.url + CHAT, json_body={"model": MODEL, "messages": messages})
    assert status == 400
    error = error_body(json.loads(raw), code=400, type="BadRequestError", param="input_tokens")
    assert error["message"].startswith(context_message(50, estimate))
    assert sim.journal == []

    # a window larger than the engine's: the engine has the last word, its own 400 passes through
    long = [{"role": "user", "content": "abcd" * 120}]
    status, _, raw = await post(larger.url + CHAT, json_body={"model": MODEL, "messages": long})
    assert status == 400
    error = error_body(json.loads(raw), code=400, type="BadRequestError", param="input_tokens")
    assert error["message"].startswith("This model's maximum context length is 100 tokens.")
    assert sim.outcomes() == ["rejected"]

    text = await smaller.metrics()
    assert value(text, "gateway_request_errors_total", error_type="context_exceeded") == 1
    text = await larger.metrics()
    assert value(text, "gateway_request_errors_total") == 0  # the engine's answer, not the gateway's error
    assert value(text, "gateway_requests_total", model=MODEL, status="400") == 1
    await settled(smaller, sim)
    await settled(larger, sim)


# -- the token estimate -----------------------------------------------------------------------------------

SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog. It was a bright cold day in April.",
    "chinese": "长上下文模型可以一次读完整本书，然后回答关于其中任何一章的问题。",
    "mixed": "GLM-4 支持 1M tokens 的上下文，prefill 阶段需要 98 秒。Retry later, 谢谢!",
    "code": (
        "def fib(n: int) -> int:\n"
        "    if n < 2:\n"
        "        return n\n"
        "    a, b = 0, 1\n"
        "    for _ in range(n - 1):\n"
        "        a, b = b, a + b\n"
        "    return b\n"
    ),
    "nested_code": (
        "class Tree:\n"
        "    def walk(self, node):\n"
        "        for child in node.children:\n"
        "            if child.visible:\n"
        "                for leaf in child.leaves:\n"
        "                    if leaf.ok:\n"
        "                        yield leaf\n"
    ),
    "indented_json": json.dumps({"a": {"b": {"c": {"d": [1, 2, 3]}}}}, indent=8),
    "tab_indented_code": (
        "func walk(t *Tree) {\n\tfor _, c := range t.Kids {\n\t\tif c.Ok {\n\t\t\tuse(c)\n\t\t}\n\t}\n}\n"
    ),
}


async def tokenize(url: str, messages: list[dict[str, Any]]) -> int:
    status, _, raw = await post(url + "/tokenize", json_body={"model": MODEL, "messages": messages})
    assert status == 200
    return int(json.loads(raw)["count"])


@pytest.mark.parametrize("kind", list(SAMPLES))
async def test_estimate_never_rejects_what_the_engine_accepts(
    stack: contextlib.AsyncExitStack, sim: Sim, kind: str
) -> None:
    messages = [{"role": "user", "content": SAMPLES[kind]}]
    count = await tokenize(sim.url, messages)
    # an engine whose window this prompt exactly fits (prompt + max_tokens == max_model_len)
    tight = await sim_in(stack, max_model_len=count + 1)
    gw = await gateway_in(stack, [tight.url])
    assert await tokenize(gw.url, messages) == count  # /tokenize through the gateway too
    status, _, raw = await post(gw.url + CHAT, json_body={"model": MODEL, "messages": messages, "max_tokens": 1})
    assert status == 200, raw
    assert tight.journal[-1]["prompt_tokens"] == count
    assert tight.outcomes() == ["length"]
    text = await gw.metrics()
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 1
    assert value(text, "gateway_request_errors_total") == 0
    await settled(gw, tight)
    assert tokens.messages_tokens(messages) <= count


# -- concurrency cap and queue ----------------------------------------------------------------------------


async def test_queue_full_is_429_with_retry_after(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, ttft=30.0)  # holds the first request in prefill
    gw = await gateway_in(stack, [sim.url], max_concurrency=1, max_queue=1)
    client = await client_in(stack, gw)
    first = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2))
    await wait_for(lambda: sim.outcomes() == ["running"], "the first request in the engine")
    second = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2))
    await wait_for(lambda: gw.gateway.admission.queue_depth == 1, "the second request queued")
    text = await gw.metrics()
    assert value(text, "gateway_queue_depth") == 1
    assert value(text, "gateway_requests_in_flight") == 1

    status, headers, raw = await post(gw.url + CHAT, json_body=chat())
    assert status == 429
    error_body(json.loads(raw), code="queue_full", type="rate_limit_error")
    retry_after = headers["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    # nothing released yet: no rate measured, so the estimate is the queue timeout (60 s by default)
    assert int(retry_after) == math.ceil(gw.gateway.settings.queue_timeout)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert caught.value.code == "queue_full"
    assert len(sim.journal) == 1  # neither the queued nor the refused ones reached the engine

    await cancel(second)  # leaves the queue
    await wait_for(lambda: gw.gateway.admission.queue_depth == 0, "the queue to empty")
    await cancel(first)
    await wait_for(lambda: sim.outcomes() == ["abort"], "the first request aborted in the engine")
    await settled(gw, sim)
    assert len(sim.journal) == 1
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="queue_full") == 2
    assert value(text, "gateway_requests_total", model=MODEL, status="429") == 2
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="client_disconnected") == 2
    assert value(text, "gateway_queue_depth") == 0
    assert value(await sim_metrics(sim), "vllm:request_success_total", finished_reason="abort") == 1


async def test_queue_timeout_is_503_with_retry_after(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, ttft=30.0)
    gw = await gateway_in(stack, [sim.url], max_concurrency=1, max_queue=4, queue_timeout=0.2)
    first = asyncio.create_task(post(gw.url + CHAT, json_body=chat()))
    await wait_for(lambda: sim.outcomes() == ["running"], "the first request in the engine")
    status, headers, raw = await post(gw.url + CHAT, json_body=chat())
    assert status == 503
    error_body(json.loads(raw), code="queue_timeout", type="server_error")
    assert headers["Retry-After"].isdigit() and int(headers["Retry-After"]) >= 1
    assert len(sim.journal) == 1
    assert gw.gateway.admission.queue_depth == 0
    await cancel(first)
    await wait_for(lambda: sim.outcomes() == ["abort"], "the first request aborted in the engine")
    await settled(gw, sim)
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="queue_timeout") == 1
    assert value(text, "gateway_requests_total", model=MODEL, status="503") == 1
    assert value(text, "gateway_queue_wait_seconds_count", model=MODEL) == 1  # only the admitted one


async def test_queue_is_fifo(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack)
    gw = await gateway_in(stack, [sim.url], max_concurrency=1, max_queue=8)
    await sim.faults(hang=True)  # the first request never answers: the slot stays taken
    first = asyncio.create_task(post(gw.url + CHAT, json_body=chat(), headers={"X-Request-Id": "held"}))
    await wait_for(lambda: sim.outcomes() == ["hang"], "the first request in the engine")
    await sim.faults(hang=False)
    order = [f"q{i}" for i in range(5)]
    queued = []
    for i, rid in enumerate(order):
        queued.append(asyncio.create_task(post(gw.url + CHAT, json_body=chat(), headers={"X-Request-Id": rid})))
        await wait_for(lambda n=i + 1: gw.gateway.admission.queue_depth == n, f"{rid} queued")
    assert len(sim.journal) == 1
    await cancel(first)  # frees the slot: the queue drains one at a time, in arrival order
    results = await asyncio.gather(*queued)
    assert [status for status, _, _ in results] == [200] * 5
    assert [e["request_id"] for e in sim.journal] == ["held", *order]
    assert sim.outcomes() == ["hang"] + ["length"] * 5
    await settled(gw, sim)
    text = await gw.metrics()
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 5
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="client_disconnected") == 1
    assert value(text, "gateway_queue_wait_seconds_count", model=MODEL) == 6


async def test_client_leaving_the_queue_frees_its_place(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, ttft=30.0)
    gw = await gateway_in(stack, [sim.url], max_concurrency=1, max_queue=1)
    first = asyncio.create_task(post(gw.url + CHAT, json_body=chat()))
    await wait_for(lambda: sim.outcomes() == ["running"], "the first request in the engine")
    leaver = asyncio.create_task(post(gw.url + CHAT, json_body=chat()))
    await wait_for(lambda: gw.gateway.admission.queue_depth == 1, "the second request queued")
    await cancel(leaver)
    await wait_for(lambda: gw.gateway.admission.queue_depth == 0, "the queue place freed")
    await wait_for(lambda: gw.gateway.proxy.active == 1, "the queued handler to return")
    # the freed place is usable at once: a new request queues instead of getting 429
    third = asyncio.create_task(post(gw.url + CHAT, json_body=chat()))
    await wait_for(lambda: gw.gateway.admission.queue_depth == 1, "the third request queued")
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="client_disconnected") == 1
    assert value(text, "gateway_requests_total", model=MODEL, status="499") == 1
    assert value(text, "gateway_request_errors_total", error_type="queue_full") == 0
    assert len(sim.journal) == 1  # the leaver never reached the engine
    await cancel(third)
    await cancel(first)
    await wait_for(lambda: sim.outcomes() == ["abort"], "the first request aborted in the engine")
    await settled(gw, sim)
    assert len(sim.journal) == 1
    assert value(await sim_metrics(sim), "vllm:request_success_total", finished_reason="abort") == 1


async def test_retry_after_follows_backlog_and_release_rate(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack)
    gw = await gateway_in(stack, [sim.url], max_concurrency=1, max_queue=1, queue_timeout=600.0)
    admission = gw.gateway.admission
    for _ in range(4):  # measured releases
        status, _, _ = await post(gw.url + CHAT, json_body=chat())
        assert status == 200
    await sim.faults(hang=True)
    held = asyncio.create_task(post(gw.url + CHAT, json_body=chat()))
    await wait_for(lambda: sim.outcomes()[-1:] == ["hang"], "a request held in the engine")
    await sim.faults(hang=False)
    queued = asyncio.create_task(post(gw.url + CHAT, json_body=chat()))
    await wait_for(lambda: admission.queue_depth == 1, "one request queued")

    # backlog (queue depth + 1 = 2) over the measured rate; it grows with time as no slot frees
    low = math.ceil(admission.retry_after())
    status, headers, raw = await post(gw.url + CHAT, json_body=chat())
    high = math.ceil(admission.retry_after())
    assert status == 429
    error_body(json.loads(raw), code="queue_full", type="rate_limit_error")
    assert low <= int(headers["Retry-After"]) <= max(1, high)
    assert int(headers["Retry-After"]) < 600  # measured, not the no-data fallback (queue timeout)
    await cancel(queued)
    await cancel(held)
    await settled(gw, sim)
    text = await gw.metrics()
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 4
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="queue_full") == 1


# -- Admission as a unit ----------------------------------------------------------------------------------


async def released(a: Admission, times: list[tuple[float, float]]) -> None:
    """Take a slot and give it back, noting the interval in which the release happened."""
    await a.acquire(0)
    before = time.monotonic()
    a.release(0)
    times.append((before, time.monotonic()))


def expect(a: Admission, backlog: int, window: list[tuple[float, float]]) -> None:
    """retry_after = backlog / (releases / (now - first release in the window)), within clock bounds."""
    before = time.monotonic()
    got = a.retry_after()
    after = time.monotonic()
    first_low, first_high = window[0]
    assert backlog * (before - first_high) / len(window) <= got <= backlog * (after - first_low) / len(window)


async def test_admission_retry_after_formula() -> None:
    a = Admission(max_concurrency=1, max_queue=10, queue_timeout=42.0, max_tokens=0)
    assert a.retry_after() == 42.0  # nothing measured: the queue timeout
    times: list[tuple[float, float]] = []
    await released(a, times)
    assert a.retry_after() == 42.0  # one release is no rate
    for _ in range(3):
        await released(a, times)
    expect(a, 1, times)

    # more waiting requests: proportionally longer
    await a.acquire(0)
    waiters = [asyncio.create_task(a.acquire(0)) for _ in range(3)]
    await wait_for(lambda: a.queue_depth == 3, "three waiters")
    expect(a, 4, times)
    assert a.stats()["retry_after_s"] == math.ceil(a.retry_after())

    # more releases measured: a higher rate
    for task in waiters:
        before = time.monotonic()
        a.release(0)
        times.append((before, time.monotonic()))
        await task
    before = time.monotonic()
    a.release(0)
    times.append((before, time.monotonic()))
    assert a.in_flight == 0 and a.queue_depth == 0
    assert len(times) == 8
    expect(a, 1, times)


async def test_admission_rate_window_is_the_last_64_releases() -> None:
    a = Admission(max_concurrency=1, max_queue=10, queue_timeout=42.0, max_tokens=0)
    times: list[tuple[float, float]] = []
    for _ in range(74):
        await released(a, times)
    expect(a, 1, times[-64:])


async def test_admission_fifo_and_large_request_not_overtaken() -> None:
    a = Admission(max_concurrency=4, max_queue=10, queue_timeout=30.0, max_tokens=100)
    await a.acquire(60)
    granted: list[str] = []

    async def take(name: str, cost: int) -> None:
        await a.acquire(cost)
        granted.append(name)

    big = asyncio.create_task(take("big", 80))
    await wait_for(lambda: a.queue_depth == 1, "big queued")
    small = asyncio.create_task(take("small", 10))  # would fit now, but big is ahead
    await wait_for(lambda: a.queue_depth == 2, "small queued")
    assert granted == []
    assert a.tokens_in_flight == 60
    a.release(60)
    await asyncio.gather(big, small)
    assert granted == ["big", "small"]
    assert a.tokens_in_flight == 90 and a.in_flight == 2
    a.release(80)
    a.release(10)
    assert a.tokens_in_flight == 0 and a.in_flight == 0


async def test_admission_try_acquire_grants_only_what_acquire_would_grant_at_once() -> None:
    """The parent of --workers answers an acquire without a task when it can: the same accounting as acquire's
    immediate grant, and never past a waiter, the cap, the budget or a key's own cap."""
    a = Admission(max_concurrency=2, max_queue=10, queue_timeout=30.0, max_tokens=100, fair=True)
    assert a.fair is not None
    a.fair.configure("capped", 1.0, 1)
    assert not a.try_acquire(101)  # over the whole budget: acquire refuses it
    assert a.try_acquire(60, "capped")
    assert (a.in_flight, a.tokens_in_flight, a.granted) == (1, 60, 1)
    assert a.tenant_stats()["capped"] == {"in_flight": 1, "queue_depth": 0, "tokens_in_flight": 60}
    assert not a.try_acquire(10, "capped")  # the key is at its own cap
    assert not a.try_acquire(50, "other")  # over the budget beside the 60
    big = asyncio.create_task(a.acquire(50, "other"))
    await wait_for(lambda: a.queue_depth == 1, "big queued")
    assert not a.try_acquire(10, "third")  # it fits, but someone waits
    assert (a.in_flight, a.tokens_in_flight, a.granted) == (1, 60, 1)
    a.release(60, "capped")
    await big  # granted in its turn, as the 60 left
    assert a.try_acquire(10, "third")
    assert not a.try_acquire(0, "fourth")  # both slots taken
    a.release(50, "other")
    a.release(10, "third")
    assert (a.in_flight, a.tokens_in_flight, a.queue_depth, a.granted) == (0, 0, 0, 3)


async def test_admission_refusals() -> None:
    a = Admission(max_concurrency=1, max_queue=1, queue_timeout=0.05, max_tokens=100)
    with pytest.raises(GatewayError) as caught:
        await a.acquire(101)
    assert caught.value.error_type == "tokens_budget" and caught.value.status == 400
    await a.acquire(1)
    waiter = asyncio.create_task(a.acquire(1))
    await wait_for(lambda: a.queue_depth == 1, "one waiter")
    with pytest.raises(GatewayError) as caught:
        await a.acquire(1)
    assert caught.value.error_type == "queue_full" and caught.value.status == 429
    assert caught.value.retry_after == 0.05
    with pytest.raises(GatewayError) as caught:
        await waiter
    assert caught.value.error_type == "queue_timeout" and caught.value.status == 503
    assert caught.value.retry_after is not None
    assert a.queue_depth == 0 and a.in_flight == 1
    a.release(1)
    assert a.in_flight == 0 and a.tokens_in_flight == 0


async def test_admission_counts_a_wait_before_it_in_its_timeout() -> None:
    """A request that already waited elsewhere (a worker's acquire while spare slots were called back): the wait
    is part of what acquire returns, and of the queue timeout, which a wait longer than it has used up."""
    a = Admission(max_concurrency=1, max_queue=10, queue_timeout=30.0, max_tokens=0)
    assert await a.acquire(0, waited=0.2) == 0.2  # admitted at once: the wait before is the whole wait
    with pytest.raises(GatewayError) as caught:
        await a.acquire(0, waited=30.0)  # the slot is taken, and no time is left to wait for it
    assert caught.value.error_type == "queue_timeout" and caught.value.status == 503
    assert a.queue_depth == 0 and a.in_flight == 1
    later = asyncio.create_task(a.acquire(0, waited=0.2))
    await wait_for(lambda: a.queue_depth == 1, "one waiter")
    a.release(0)
    assert await later >= 0.2
    a.release(0)
    assert a.in_flight == 0


async def test_admission_cancelled_waiter_wakes_the_next() -> None:
    a = Admission(max_concurrency=2, max_queue=10, queue_timeout=30.0, max_tokens=100)
    await a.acquire(50)
    big = asyncio.create_task(a.acquire(60))  # does not fit beside 50
    await wait_for(lambda: a.queue_depth == 1, "big queued")
    small = asyncio.create_task(a.acquire(40))  # fits, but waits behind big
    await wait_for(lambda: a.queue_depth == 2, "small queued")
    big.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await big
    await small  # the head leaving lets the next one in at once
    assert a.queue_depth == 0 and a.in_flight == 2 and a.tokens_in_flight == 90
    a.release(40)
    a.release(50)
    assert a.in_flight == 0 and a.tokens_in_flight == 0


async def test_admission_grant_at_cancel_is_handed_on() -> None:
    a = Admission(max_concurrency=1, max_queue=10, queue_timeout=30.0, max_tokens=0)
    await a.acquire(0)
    first = asyncio.create_task(a.acquire(0))
    second = asyncio.create_task(a.acquire(0))
    await wait_for(lambda: a.queue_depth == 2, "two waiters")
    a.release(0)  # grants `first`, which is cancelled before it runs
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    await second  # the slot went on to the next waiter
    assert a.in_flight == 1 and a.queue_depth == 0
    a.release(0)
    assert a.in_flight == 0


# -- token budget -----------------------------------------------------------------------------------------


async def test_request_larger_than_token_budget(stack: contextlib.AsyncExitStack, sim: Sim) -> None:
    gw = await gateway_in(stack, [sim.url], max_tokens_in_flight=100)
    client = await client_in(stack, gw)
    estimate = tokens.messages_tokens(HELLO)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=101 - estimate)  # type: ignore[arg-type]
    error_body(caught.value.response.json(), code="tokens_budget", type="invalid_request_error")
    reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100 - estimate)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason == "length"
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="tokens_budget") == 1
    assert value(text, "gateway_requests_total", model=MODEL, status="400") == 1
    assert value(text, "gateway_tokens_in_flight_limit") == 100
    assert sim.outcomes() == ["length"]
    await settled(gw, sim)


async def test_request_waits_for_token_budget(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack)
    gw = await gateway_in(stack, [sim.url], max_tokens_in_flight=100, max_concurrency=10)
    cost = 60
    max_tokens = cost - tokens.messages_tokens(HELLO)
    await sim.faults(hang=True)
    first = asyncio.create_task(post(gw.url + CHAT, json_body=chat(max_tokens), headers={"X-Request-Id": "first"}))
    await wait_for(lambda: sim.outcomes() == ["hang"], "the first request in the engine")
    await sim.faults(hang=False)
    second = asyncio.create_task(post(gw.url + CHAT, json_body=chat(max_tokens), headers={"X-Request-Id": "second"}))
    await wait_for(lambda: gw.gateway.admission.queue_depth == 1, "the second waiting for budget")
    text = await gw.metrics()
    assert value(text, "gateway_tokens_in_flight") == cost
    assert value(text, "gateway_queue_depth") == 1
    assert value(text, "gateway_requests_in_flight") == 1  # a free slot, but no budget
    assert len(sim.journal) == 1
    await cancel(first)
    status, _, raw = await second
    assert status == 200, raw
    assert [e["request_id"] for e in sim.journal] == ["first", "second"]
    assert sim.outcomes() == ["hang", "length"]
    await settled(gw, sim)
    text = await gw.metrics()
    assert value(text, "gateway_tokens_in_flight") == 0
    assert value(text, "gateway_requests_total", model=MODEL, status="200") == 1
    assert value(text, "gateway_request_errors_total", model=MODEL, error_type="client_disconnected") == 1


async def test_waiter_cancelled_as_a_slot_frees_leaks_nothing() -> None:
    """Cancelling a queued request cancels its future at once; a release in the same loop turn must
    skip it, not grant it a slot that nobody will give back."""
    admission = Admission(1, 10, 5.0, 0)
    await admission.acquire(0)
    waiting = asyncio.create_task(admission.acquire(0))
    await asyncio.sleep(0)
    assert admission.queue_depth == 1
    waiting.cancel()
    admission.release(0)  # before the cancelled task has run its clean-up
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert (admission.in_flight, admission.queue_depth) == (0, 0)
