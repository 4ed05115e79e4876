"""The gateway's /metrics after real traffic: histogram counts, token sums, error counters, labels, engines."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from tests.harness import (
    MODEL,
    Gw,
    Sim,
    free_port,
    gpu_available,
    sim_metrics,
    start_counting_sim,
    start_gateway,
    start_sim,
    value,
    wait_for,
)

HELLO = [{"role": "user", "content": "Hello there, how are you today?"}]
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

# Histograms observed once per forwarded request that got an answer from the engine.
PER_REQUEST_HISTOGRAMS = (
    "gateway_request_duration_seconds",
    "gateway_time_to_first_token_seconds",
    "gateway_queue_wait_seconds",
    "gateway_upstream_first_byte_seconds",
    "gateway_relay_seconds",
    "gateway_prompt_tokens",
    "gateway_completion_tokens",
)


def client_for(gw: Gw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)


async def scrape(url: str, accept: str | None = None) -> tuple[int, str, str]:
    headers = {"Accept": accept} if accept else {}
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics", headers=headers) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


async def idle_metrics(gw: Gw, active: int = 0) -> str:
    """/metrics once all handlers but ``active`` have returned (a client can hold [DONE] before the
    handler records it)."""
    await wait_for(lambda: gw.gateway.proxy.active == active, "the gateway's handlers to return")
    return await gw.metrics()


def errors_by_type(text: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "gateway_request_errors_total":
                out[s.labels["error_type"]] += int(s.value)
    return out


def delta(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in set(before) | set(after) if after[k] != before[k]}


def families(text: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in found, f"family {family.name} written twice"
        found[family.name] = family
    return found


def vllm_samples(text: str, upstream: str | None = None) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("vllm:"):
            continue
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            labels = dict(s.labels)
            if upstream is not None and labels.pop("upstream", None) != upstream:
                continue
            out[(s.name, frozenset(labels.items()))] = s.value
    return out


async def sim_idle(*sims: Sim) -> None:
    """The engines have finished every request, and recorded them in their metrics."""
    for sim in sims:
        await wait_for(
            lambda s=sim: (
                s.engine.running == 0
                and s.engine.waiting == 0
                and all(e["outcome"] != "running" for e in s.engine.journal)
            ),
            "the engine to finish its requests",
        )


# -- traffic through the openai client ---------------------------------------------------------------


async def test_histograms_and_token_sums_match_the_traffic(gw: Gw, sim: Sim) -> None:
    client = client_for(gw)
    try:
        sim0, gw0 = await sim_metrics(sim), await idle_metrics(gw)

        # N non-streamed requests: chat and completions
        replies = [
            await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3),
            await client.chat.completions.create(model=MODEL, messages=HELLO * 3, max_tokens=4),
            await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5),
        ]
        await sim_idle(sim)
        sim1, gw1 = await sim_metrics(sim), await idle_metrics(gw)
        usage = [r.usage for r in replies]
        assert all(u is not None for u in usage)
        completion = sum(u.completion_tokens for u in usage)  # type: ignore[union-attr]
        prompt = sum(u.prompt_tokens for u in usage)  # type: ignore[union-attr]
        assert completion == 3 + 4 + 5
        engine_generated = value(sim1, "vllm:generation_tokens_total") - value(sim0, "vllm:generation_tokens_total")
        engine_prompt = value(sim1, "vllm:prompt_tokens_total") - value(sim0, "vllm:prompt_tokens_total")
        assert engine_generated == completion
        assert engine_prompt == prompt
        assert value(gw1, "gateway_completion_tokens_sum") - value(gw0, "gateway_completion_tokens_sum") == completion
        assert value(gw1, "gateway_prompt_tokens_sum") - value(gw0, "gateway_prompt_tokens_sum") == prompt

        # M streamed requests: chat and completions, one where the client asks for usage itself
        streamed: list[int] = []
        streamed_usage = None
        for kind, max_tokens, include_usage in (
            ("chat", 6, False),
            ("chat", None, False),  # the engine's default length, finish_reason "stop"
            ("chat", 8, True),
            ("completions", 7, False),
        ):
            if kind == "chat":
                stream = await client.chat.completions.create(
                    model=MODEL,
                    messages=HELLO,
                    max_tokens=max_tokens,
                    stream=True,
                    stream_options={"include_usage": True} if include_usage else None,
                )
                chunks = [c async for c in stream]
                tokens = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
            else:
                stream = await client.completions.create(
                    model=MODEL, prompt="Once upon a time", max_tokens=max_tokens, stream=True
                )
                chunks = [c async for c in stream]
                tokens = sum(1 for c in chunks if c.choices and c.choices[0].text)
            usages = [c.usage for c in chunks if c.usage is not None]
            if include_usage:
                assert len(usages) == 1 and usages[0].completion_tokens == tokens
                streamed_usage = usages[0]
            else:
                assert usages == [], "the usage chunk the gateway asked for reached the client"
            streamed.append(tokens)
        assert streamed == [6, sim.engine.settings.output_tokens, 8, 7]
        assert streamed_usage is not None
        await sim_idle(sim)
        sim2, gw2 = await sim_metrics(sim), await idle_metrics(gw)
        engine_generated = value(sim2, "vllm:generation_tokens_total") - value(sim1, "vllm:generation_tokens_total")
        engine_prompt = value(sim2, "vllm:prompt_tokens_total") - value(sim1, "vllm:prompt_tokens_total")
        assert engine_generated == sum(streamed)
        assert value(gw2, "gateway_completion_tokens_sum") - value(gw1, "gateway_completion_tokens_sum") == sum(
            streamed
        )
        assert value(gw2, "gateway_prompt_tokens_sum") - value(gw1, "gateway_prompt_tokens_sum") == engine_prompt

        n, m = len(replies), len(streamed)
        for name in PER_REQUEST_HISTOGRAMS:
            got = value(gw2, name + "_count") - value(gw0, name + "_count")
            assert got == n + m, f"{name}_count moved by {got}, {n + m} requests were answered"
        itl = value(gw2, "gateway_inter_token_latency_seconds_count") - value(
            gw0, "gateway_inter_token_latency_seconds_count"
        )
        assert itl == sum(t - 1 for t in streamed), "inter-token latency: one gap per token after the first"
        assert value(gw2, "gateway_requests_total", status="200") == n + m
        assert value(gw2, "gateway_requests_total", endpoint="chat_completions") == 5
        assert value(gw2, "gateway_requests_total", endpoint="completions") == 2
        assert value(gw2, "gateway_requests_total", model=MODEL) == n + m
        assert sum(errors_by_type(gw2).values()) == 0
        # every histogram's +Inf bucket equals its count
        for family in text_string_to_metric_families(gw2):
            if family.type != "histogram":
                continue
            counts = {frozenset(s.labels.items()): s.value for s in family.samples if s.name.endswith("_count")}
            for s in family.samples:
                if s.name.endswith("_bucket") and s.labels["le"] == "+Inf":
                    labels = frozenset((k, v) for k, v in s.labels.items() if k != "le")
                    assert counts[labels] == s.value, family.name
        gw.assert_idle()
    finally:
        await client.close()


async def _coalescing_engine(events: int) -> tuple[web.AppRunner, str]:
    """An engine that writes a whole chat stream (role, ``events`` tokens, usage, [DONE]) in one write."""

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "max_model_len": 4096}]})

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    async def chat(request: web.Request) -> web.StreamResponse:
        def event(obj: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"  # as vLLM

        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
        body = event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i in range(events):
            body += event({**base, "choices": [{"index": 0, "delta": {"content": f"t{i} "}}]})
        usage = {"prompt_tokens": 9, "completion_tokens": events, "total_tokens": 9 + events}
        body += event({**base, "choices": [], "usage": usage}) + b"data: [DONE]\n\n"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(body)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.add_routes([web.get("/health", health), web.get("/v1/models", models), web.post("/v1/chat/completions", chat)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def test_itl_counts_every_gap_when_events_arrive_together() -> None:
    """Events that reach the gateway in one read still are one token each: tokens - 1 gaps per stream."""
    runner, url = await _coalescing_engine(5)
    gw = await start_gateway([url])
    client = client_for(gw)
    try:
        stream = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
        tokens = sum(1 for c in [c async for c in stream] if c.choices and c.choices[0].delta.content)
        assert tokens == 5
        text = await idle_metrics(gw)
        assert value(text, "gateway_completion_tokens_sum") == 5
        assert value(text, "gateway_time_to_first_token_seconds_count") == 1
        assert value(text, "gateway_inter_token_latency_seconds_count") == tokens - 1
    finally:
        await client.close()
        await gw.close()
        await runner.cleanup()


# -- error counters: exactly one per rejection type -------------------------------------------------------


async def moved(
    gw: Gw, action: Callable[[], Awaitable[None]], active: int = 0, after: int | None = None
) -> dict[str, int]:
    """How the error counters moved over ``action``; ``active``/``after``: requests running before/after."""
    before = errors_by_type(await idle_metrics(gw, active))
    await action()
    return delta(before, errors_by_type(await idle_metrics(gw, active if after is None else after)))


async def post_chat(session: aiohttp.ClientSession, gw: Gw, **body: Any) -> tuple[int, dict[str, str], Any]:
    payload = {"model": MODEL, "messages": HELLO, **body}
    async with session.post(gw.url + "/v1/chat/completions", json=payload) as r:
        return r.status, dict(r.headers), await r.json()


@pytest.fixture
async def hung_sim() -> AsyncIterator[Sim]:
    s = await start_sim(max_model_len=4096)
    await s.faults(hang=True)
    yield s
    await s.close()


async def test_client_errors_count_once_each() -> None:
    sim = await start_sim(max_model_len=2000)
    gw = await start_gateway([sim.url], max_body_bytes=4096, max_tokens_in_flight=1000)
    client = client_for(gw)

    async def expect(status: int, code: str | int, call: Callable[[], Awaitable[Any]]) -> None:
        with pytest.raises(openai.APIStatusError) as info:
            await call()
        assert info.value.status_code == status
        assert info.value.body is not None and info.value.body["code"] == code  # type: ignore[index]

    chat = client.chat.completions.create
    try:
        cases: list[tuple[str, int, str | int, Callable[[], Awaitable[Any]]]] = [
            (
                "body_too_large",
                413,
                "body_too_large",
                lambda: chat(model=MODEL, messages=[{"role": "user", "content": "x" * 8000}]),
            ),
            ("invalid_request", 400, "invalid_request", lambda: chat(model=MODEL, messages=HELLO, max_tokens=0)),
            ("context_exceeded", 400, 400, lambda: chat(model=MODEL, messages=HELLO, max_tokens=5000)),
            ("tokens_budget", 400, "tokens_budget", lambda: chat(model=MODEL, messages=HELLO, max_tokens=1500)),
        ]
        for error_type, status, code, call in cases:
            got = await moved(gw, lambda s=status, c=code, f=call: expect(s, c, f))
            assert got == {error_type: 1}, f"{error_type}: error counters moved by {got}"
            text = await gw.metrics()
            assert value(text, "gateway_requests_total", status=str(status)) >= 1

        async def broken_stream() -> None:
            await sim.faults(drop_after_tokens=2)
            stream = await chat(model=MODEL, messages=HELLO, max_tokens=5, stream=True)
            with pytest.raises(openai.APIError):
                async for _ in stream:
                    pass
            await sim.faults(drop_after_tokens=-1)

        got = await moved(gw, broken_stream)
        assert got == {"upstream_error": 1}
        await sim_idle(sim)
        gw.assert_idle()
    finally:
        await client.close()
        await gw.close()
        await sim.close()


async def fails_once(gw: Gw, status: int, code: str, *, active: int = 0, retry_after: bool = False) -> None:
    """One chat request fails with ``status`` and error ``code`` (and a Retry-After if ``retry_after``), and only
    the ``code`` error counter moves, by one; ``active``: requests running meanwhile."""
    async with aiohttp.ClientSession() as s:

        async def call() -> None:
            got, headers, body = await post_chat(s, gw, max_tokens=2)
            assert got == status and body["error"]["code"] == code
            if retry_after:
                assert int(headers["Retry-After"]) >= 1

        assert await moved(gw, call, active=active) == {code: 1}


async def counts_once(gw: Gw, status: int, code: str) -> None:
    """fails_once on an otherwise idle gateway, which is left idle; then close ``gw``."""
    try:
        await fails_once(gw, status, code)
        gw.assert_idle()
    finally:
        await gw.close()


async def test_upstream_unavailable_counts_once() -> None:
    gw = await start_gateway([f"http://127.0.0.1:{free_port()}"], wait_ready=False)
    await counts_once(gw, 502, "upstream_unavailable")


async def test_upstream_timeout_counts_once(hung_sim: Sim) -> None:
    gw = await start_gateway([hung_sim.url], upstream_read_timeout=0.2)
    await counts_once(gw, 504, "upstream_timeout")


async def _hold_the_slot(gw: Gw, sim: Sim, session: aiohttp.ClientSession) -> asyncio.Task[Any]:
    """A request the hung engine never answers: it holds the gateway's only slot until cancelled."""
    arrived = len(sim.journal)
    holder = asyncio.create_task(post_chat(session, gw, max_tokens=2))
    await wait_for(lambda: len(sim.journal) > arrived, "the slot holder to reach the engine")
    return holder


async def _disconnect(holder: asyncio.Task[Any], session: aiohttp.ClientSession) -> None:
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)
    await session.close()


async def test_queue_full_and_client_disconnect_count_once_each(hung_sim: Sim) -> None:
    gw = await start_gateway([hung_sim.url], max_concurrency=1, max_queue=0)
    try:
        holder_session = aiohttp.ClientSession()
        holder = await _hold_the_slot(gw, hung_sim, holder_session)
        busy = await gw.metrics()
        assert value(busy, "gateway_requests_in_flight") == 1
        assert value(busy, "gateway_tokens_in_flight") > 0
        assert value(busy, "gateway_upstream_requests_in_flight", upstream=hung_sim.url) == 1
        await fails_once(gw, 429, "queue_full", active=1, retry_after=True)
        got = await moved(gw, lambda: _disconnect(holder, holder_session), active=1, after=0)
        assert got == {"client_disconnected": 1}
        text = await gw.metrics()
        assert value(text, "gateway_requests_total", status="499") == 1
        assert value(text, "gateway_requests_in_flight") == 0
        gw.assert_idle()
    finally:
        await gw.close()


async def test_queue_timeout_counts_once(hung_sim: Sim) -> None:
    gw = await start_gateway([hung_sim.url], max_concurrency=1, max_queue=1, queue_timeout=0.2)
    try:
        holder_session = aiohttp.ClientSession()
        holder = await _hold_the_slot(gw, hung_sim, holder_session)
        await fails_once(gw, 503, "queue_timeout", active=1, retry_after=True)
        # the slot holder leaving is the one other error this gateway sees
        assert await moved(gw, lambda: _disconnect(holder, holder_session), 1, 0) == {"client_disconnected": 1}
        gw.assert_idle()
    finally:
        await gw.close()


# -- labels -----------------------------------------------------------------------------------------------


async def test_label_hygiene(gw: Gw, sim: Sim) -> None:
    client = client_for(gw)
    trace_id = "trace-5f0c2bd9e1a44c7f"
    try:
        # models nobody serves are vLLM's 404 (with a gateway-made request id)
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="some-model-nobody-serves", messages=HELLO, max_tokens=2)
        await client.completions.create(
            model=MODEL, prompt="hi", max_tokens=2, extra_headers={"X-Request-Id": trace_id}
        )
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="another-unknown", messages=HELLO, max_tokens=2, stream=True)
    finally:
        await client.close()
    assert trace_id in {e["request_id"] for e in sim.journal}
    text = await idle_metrics(gw)
    assert value(text, "gateway_requests_total", model="other") == 2
    assert value(text, "gateway_requests_total", model=MODEL) == 1
    assert trace_id not in text
    request_ids = {e["request_id"] for e in sim.journal}
    hexish = re.compile(r"[0-9a-f]{16,}|chatcmpl-|cmpl-")
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert "request_id" not in s.labels and "id" not in s.labels, s
            for label, label_value in s.labels.items():
                assert label_value not in request_ids, (s.name, label)
                assert not hexish.search(label_value), (s.name, label, label_value)
            if s.name.startswith("gateway_") and "model" in s.labels:
                assert s.labels["model"] in {MODEL, "other", ""}, s

    fams = families(text)
    assert value(text, "gateway_build_info", version=__version__) == 1
    settings = gw.gateway.settings
    gauges = {
        "gateway_requests_in_flight": 0,
        "gateway_queue_depth": 0,
        "gateway_tokens_in_flight": 0,
        "gateway_queue_limit": settings.max_queue,
        "gateway_concurrency_limit": settings.max_concurrency,
        "gateway_tokens_in_flight_limit": settings.max_tokens_in_flight,
        "gateway_draining": 0,
        "gateway_build_info": 1,
    }
    for name, expected in gauges.items():
        assert fams[name].type == "gauge", name
        assert [s.value for s in fams[name].samples] == [expected], name
    up = {s.labels["upstream"]: s.value for s in fams["gateway_upstream_up"].samples}
    assert up == {sim.url: 1}
    assert fams["gateway_upstream_requests_in_flight"].type == "gauge"
    assert {s.labels["upstream"]: s.value for s in fams["gateway_upstream_requests_in_flight"].samples} == {sim.url: 0}


# -- the engines' series ----------------------------------------------------------------------------------


async def test_two_engines_come_through_one_scrape() -> None:
    sims = [await start_sim(), await start_sim()]
    # fetched at the scrape, after the traffic: the load view's background fetches do not serve it from before
    gw = await start_gateway([s.url for s in sims], engine_metrics_max_age=0)
    await wait_for(lambda: all(u.up for u in gw.gateway.pool.upstreams), "both engines to be up")
    client = client_for(gw)
    try:

        async def one(i: int) -> None:
            await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2 + i % 3)
            stream = await client.completions.create(model=MODEL, prompt="hi", max_tokens=3, stream=True)
            async for _ in stream:
                pass

        # concurrent, so the least-loaded choice spreads them over both engines
        await asyncio.gather(*(one(i) for i in range(6)))
        await sim_idle(*sims)
        text = await idle_metrics(gw)
        own = [await sim_metrics(s) for s in sims]
    finally:
        await client.close()
        await gw.close()
        for s in sims:
            await s.close()

    assert all(s.journal for s in sims), "traffic should reach both engines"
    gw_fams = families(text)
    for sim, sim_page in zip(sims, own, strict=True):
        for family in text_string_to_metric_families(sim_page):
            if not family.name.startswith("vllm:"):
                continue
            assert family.name in gw_fams, family.name
            assert gw_fams[family.name].type == family.type, family.name
            assert gw_fams[family.name].documentation == family.documentation
        # every sample of the engine, same name, labels and value, plus upstream=<its url>
        assert vllm_samples(text, upstream=sim.url) == vllm_samples(sim_page)
    assert gw_fams["vllm:num_requests_running"].type == "gauge"
    assert gw_fams["vllm:request_success"].type == "counter"
    assert gw_fams["vllm:time_to_first_token_seconds"].type == "histogram"
    for name in ("vllm:num_requests_running", "vllm:request_success", "vllm:time_to_first_token_seconds"):
        upstreams = {s.labels.get("upstream") for s in gw_fams[name].samples}
        assert upstreams == {s.url for s in sims}, name
    success = {
        s.labels["upstream"]: s.value
        for s in gw_fams["vllm:request_success"].samples
        if s.name == "vllm:request_success_total" and s.labels["finished_reason"] == "length"
    }
    assert success == {s.url: len(s.journal) for s in sims}
    # the engines' process_*/python_*/http_* series are not re-exported: the gateway's own are written once
    type_lines = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(type_lines) == len(set(type_lines)), Counter(type_lines).most_common(3)
    assert "process_cpu_seconds_total" in type_lines
    for family in gw_fams.values():
        if not family.name.startswith("vllm:"):
            assert all("upstream" not in s.labels for s in family.samples if s.name.startswith(("process_", "python_")))
    assert not any(line.startswith("http_") for line in text.splitlines())


async def test_slow_or_down_engine_leaves_only_its_series_out() -> None:
    good, slow = await start_sim(), await start_sim()
    gw = await start_gateway([good.url, slow.url], engine_metrics_timeout=0.3)
    stopped = False
    await wait_for(lambda: all(u.up for u in gw.gateway.pool.upstreams), "both engines to be up")
    try:
        text = await gw.metrics()
        assert vllm_samples(text, upstream=slow.url) and vllm_samples(text, upstream=good.url)

        await slow.faults(metrics_delay=30)
        latest: dict[str, str] = {}

        async def poll() -> None:
            latest["text"] = await gw.metrics()  # asserts 200

        async def slow_series_gone() -> bool:
            await poll()
            return not vllm_samples(latest["text"], upstream=slow.url)

        await wait_async(slow_series_gone, "the slow engine's series to drop out")
        text = latest["text"]
        assert vllm_samples(text, upstream=good.url), "the good engine's series must stay"
        # a slow /metrics is not a failed health check
        assert value(text, "gateway_upstream_up", upstream=slow.url) == 1

        await slow.faults(metrics_delay=0)
        await slow.close()
        stopped = True

        async def marked_down() -> bool:
            await poll()
            return value(latest["text"], "gateway_upstream_up", upstream=slow.url) == 0

        await wait_async(marked_down, "the stopped engine to be marked down")
        text = latest["text"]
        assert not vllm_samples(text, upstream=slow.url)
        assert vllm_samples(text, upstream=good.url)
        assert value(text, "gateway_upstream_up", upstream=good.url) == 1
    finally:
        await gw.close()
        await good.close()
        if not stopped:
            await slow.close()


async def wait_async(predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:  # noqa: ASYNC109
    """wait_for for a predicate that must await (each call is a scrape)."""
    done = False

    async def check() -> None:
        nonlocal done
        done = await predicate()

    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        await check()
        if done:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_concurrent_scrapes_share_one_engine_fetch() -> None:
    sim = await start_counting_sim()
    gw = await start_gateway([sim.url], engine_metrics_max_age=60)
    try:
        await sim.faults(metrics_delay=0.2)  # concurrent scrapes overlap one fetch in flight
        fetches = sim.engine.metrics_fetches  # type: ignore[attr-defined]
        pages = await asyncio.gather(*(gw.metrics() for _ in range(20)))
        pages += [await gw.metrics() for _ in range(5)]
        assert len(fetches) == 1, f"{len(pages)} scrapes fetched the engine's /metrics {len(fetches)} times"
        assert all("vllm:num_requests_running{" in p for p in pages)
    finally:
        await gw.close()
        await sim.close()


async def test_engine_fetched_at_most_once_per_max_age() -> None:
    sim = await start_counting_sim()
    gw = await start_gateway([sim.url])  # the default engine_metrics_max_age
    max_age = gw.gateway.settings.engine_metrics_max_age
    try:
        fetches = sim.engine.metrics_fetches  # type: ignore[attr-defined]
        scrapes = 0

        async def two_fetches() -> bool:
            nonlocal scrapes
            await asyncio.gather(*(gw.metrics() for _ in range(5)))
            scrapes += 5
            return len(fetches) >= 2

        await wait_async(two_fetches, "the engine to be fetched again")
        assert scrapes > len(fetches)
        gaps = [b - a for a, b in itertools.pairwise(fetches)]
        assert all(gap >= max_age for gap in gaps), f"fetch gaps {gaps} shorter than {max_age} s"
    finally:
        await gw.close()
        await sim.close()


# -- exposition format -------------------------------------------------------------------------------------


async def test_classic_text_format_even_when_openmetrics_is_asked(gw: Gw, client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    await idle_metrics(gw)
    status, content_type, text = await scrape(gw.url, OPENMETRICS)
    assert status == 200
    assert content_type.startswith("text/plain") and "version=0.0.4" in content_type
    assert "# EOF" not in text
    assert "# TYPE vllm:num_requests_running gauge" in text
    assert re.search(r"^vllm:num_requests_running\{", text, re.M), "engine series keep their colon names"
    assert not re.search(r"^vllm_", text, re.M), "colon names mangled to underscores"
    assert families(text)  # parses as the classic format


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
async def test_promtool_lints_the_gateways_own_series_clean(gw: Gw, client: openai.AsyncOpenAI) -> None:
    # traffic so every family has samples: histograms, an error counter, ITL
    await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, stream=True)
    async for _ in stream:
        pass
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=0)
    text = await idle_metrics(gw)
    assert value(text, "gateway_request_errors_total") == 1
    # vllm:* keep vLLM's names on purpose; colons are a lint there (engine-facts), so check the rest
    own = "\n".join(
        line for line in text.splitlines() if not line.startswith(("vllm:", "# HELP vllm:", "# TYPE vllm:"))
    )
    assert "gateway_inter_token_latency_seconds_bucket" in own
    result = await asyncio.to_thread(
        subprocess.run,
        ["promtool", "check", "metrics"],
        input=own + "\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


# -- no GPU ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(gpu_available(), reason="this machine has an NVIDIA GPU: the no-GPU path cannot be seen here")
async def test_no_gpu_is_reported_not_failed(gw: Gw) -> None:
    text = await gw.metrics()
    assert value(text, "gateway_gpu_available") == 0
    assert "gateway_gpu_available 0.0" in text
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert {n for n in names if n.startswith("gateway_gpu_")} == {"gateway_gpu_available"}
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/health") as r:
            assert r.status == 200
            body = await r.json()
        async with s.get(gw.url + "/status") as r:
            assert r.status == 200
            status = await r.json()
    assert body["gpu_available"] is False
    assert body["status"] == "healthy" and body["reasons"] == []
    assert status["gpus"] == []
