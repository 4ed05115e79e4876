"""Several engines behind one gateway: KV-aware admission, the policies, the breakers, engines lost under load."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway.routing.breaker import CLOSED, HALF_OPEN, OPEN
from gateway.settings import Settings, parse_upstream
from tests.harness import (
    MODEL,
    Gw,
    Sim,
    cancel,
    client_in,
    error_body,
    fetch,
    free_port,
    gateway_in,
    post,
    settled,
    sim_in,
    value,
    wait_for,
)

# engine loads read often, and the /metrics fetch they share never cached longer than that
LOADS = {"engine_load_interval": 0.05, "engine_metrics_max_age": 0.0}


def home(sims: list[Sim], request_id: str) -> int:
    """The index of the one engine that got a request."""
    found = [i for i, sim in enumerate(sims) if any(e["request_id"] == request_id for e in sim.journal)]
    assert len(found) == 1, (request_id, found)
    return found[0]


def known(gw: Gw) -> bool:
    """Every engine's load comes from its own /metrics, KV capacity included."""
    now = time.monotonic()
    return all(s.capacity(now) for s in gw.gateway.router.states.values())


async def test_long_request_goes_where_kv_room_is_and_waits_when_none_has_it(
    stack: contextlib.AsyncExitStack,
) -> None:
    sims = [
        await sim_in(stack, kv_cache_tokens=1600, itl=0.001),
        await sim_in(stack, kv_cache_tokens=3200, itl=0.002, max_num_seqs=8),
        await sim_in(stack, kv_cache_tokens=16000, itl=0.004, ttft=0.02),
    ]
    gw = await gateway_in(stack, [s.url for s in sims], max_concurrency=2, **LOADS)
    await wait_for(lambda: known(gw), "every engine's KV capacity")
    client = await client_in(stack, gw)
    router = gw.gateway.router
    long_prompt = list(range(10000))  # token ids: the gateway counts them exactly; 10010 tokens with max_tokens

    async def complete(request_id: str, prompt: list[int]) -> Any:
        return await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=10, extra_headers={"X-Request-Id": request_id}
        )

    await sims[2].faults(latency=3600)  # the first long request stays at the engine until cancelled
    first = asyncio.create_task(complete("long-1", long_prompt))
    await wait_for(lambda: sims[2].journal, "the first long request at the large engine")
    assert home(sims, "long-1") == 2  # the only engine with room for 10010 tokens (16000 x 0.9)

    second = asyncio.create_task(complete("long-2", long_prompt))
    await wait_for(lambda: router.waiting == 1, "the second long request to wait for room")
    assert [len(s.journal) for s in sims] == [0, 0, 1]  # not sent to an engine without room
    status, _, body = await post(
        gw.url + "/v1/completions", json_body={"model": MODEL, "prompt": list(range(20000)), "max_tokens": 1}
    )  # more than any engine holds: refused at once, though both slots are taken
    assert status == 400
    error_body(json.loads(body), code="kv_capacity", type="invalid_request_error")

    await sims[2].faults(latency=0)
    await cancel(first)  # its tokens leave the large engine: the waiting request goes there
    answer = await second
    assert answer.usage.prompt_tokens == 10000
    assert home(sims, "long-2") == 2

    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", error_type="kv_capacity") == 1
    assert value(text, "gateway_routing_decisions_total", upstream=sims[2].url, reason="least_load") == 2
    await settled(gw, *sims)
    await wait_for(lambda: router.states[gw.gateway.pool.upstreams[2]].room(time.monotonic()) == 14400, "room")
    assert value(await gw.metrics(), "gateway_upstream_kv_free_tokens", upstream=sims[2].url) == 14400


async def kill(sim: Sim) -> None:
    """The engine goes away: its port refuses connections from now on."""
    await sim.close()


async def chat(client: openai.AsyncOpenAI, request_id: str, messages: list[dict[str, str]], **headers: str) -> str:
    answer = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2, extra_headers={"X-Request-Id": request_id, **headers}
    )
    return answer.choices[0].message.content or ""


async def test_session_stays_on_one_engine_and_moves_only_when_it_dies(stack: contextlib.AsyncExitStack) -> None:
    sims = [await sim_in(stack, kv_cache_tokens=n) for n in (40000, 80000, 160000)]
    urls = [s.url for s in sims]
    gws = [
        await gateway_in(stack, urls, routing="session", **LOADS),
        await gateway_in(stack, urls[::-1], routing="session", **LOADS),  # another replica, its list reversed
    ]
    clients = [await client_in(stack, gw) for gw in gws]
    homes: dict[str, set[int]] = {}
    for session in ("alice", "bob", "carol", "dave", "erin", "frank"):
        messages = [{"role": "user", "content": f"hello from {session}"}]
        for turn in range(4):
            gw_index = turn % 2  # the turns alternate between the two gateways
            rid = f"{session}-{turn}"
            reply = await chat(clients[gw_index], rid, messages, **{"x-session-id": session})
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": f"turn {turn}"}]
            homes.setdefault(session, set()).add(home(sims, rid))
    assert all(len(engines) == 1 for engines in homes.values()), homes  # every turn, on both gateways
    assert len({next(iter(e)) for e in homes.values()}) > 1  # sessions spread over the engines
    for gw in gws:
        text = await gw.metrics()
        assert value(text, "gateway_affinity_moves_total") == 0
        assert value(text, "gateway_routing_decisions_total", policy="session", reason="affinity") == 12

    victim = next(iter(homes["alice"]))
    await kill(sims[victim])
    moved = set()
    for turn in range(4, 8):
        rid = f"alice-{turn}"
        await chat(
            clients[turn % 2], rid, [{"role": "user", "content": "hello from alice"}], **{"x-session-id": "alice"}
        )
        moved.add(home(sims, rid))
    assert len(moved) == 1 and victim not in moved  # one new engine, the same on both gateways
    for gw in gws:
        assert value(await gw.metrics(), "gateway_affinity_moves_total") >= 1
    # the OpenAI `user` field names a session when the header does not
    for turn in range(3):
        await clients[turn % 2].chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1, user="grace",
            extra_headers={"X-Request-Id": f"grace-{turn}"},
        )  # fmt: skip
    assert len({home(sims, f"grace-{turn}") for turn in range(3)}) == 1
    alive = [s for i, s in enumerate(sims) if i != victim]
    for gw in gws:
        await settled(gw, *alive)


async def test_prefix_keeps_a_shared_document_on_one_engine(stack: contextlib.AsyncExitStack) -> None:
    sims = [await sim_in(stack) for _ in range(3)]
    gw = await gateway_in(stack, [s.url for s in sims], routing="prefix", **LOADS)
    client = await client_in(stack, gw)
    document = "A long shared document. " * 2000
    for i in range(8):
        messages = [
            {"role": "system", "content": document},
            {"role": "user", "content": f"question {i} about it, and a different one each time"},
        ]
        await chat(client, f"doc-{i}", messages)
    assert len({home(sims, f"doc-{i}") for i in range(8)}) == 1
    for i in range(12):  # other documents, each its own prefix: spread over the engines
        await chat(client, f"other-{i}", [{"role": "user", "content": f"document number {i} " * 100}])
    assert len({home(sims, f"other-{i}") for i in range(12)}) > 1
    text = await gw.metrics()
    assert value(text, "gateway_routing_decisions_total", policy="prefix", reason="affinity") == 20
    await settled(gw, *sims)


async def test_breaker_opens_after_failures_half_opens_and_closes_on_success(
    stack: contextlib.AsyncExitStack,
) -> None:
    sims = [await sim_in(stack), await sim_in(stack)]
    gw = await gateway_in(
        stack, [s.url for s in sims], breaker_failures=3, breaker_cooldown=3.0, slow_start=3600.0, **LOADS
    )
    await wait_for(lambda: all(u.up for u in gw.gateway.pool.upstreams), "both engines up")
    client = await client_in(stack, gw)
    failing = sims[0]
    breaker = gw.gateway.router.states[gw.gateway.pool.upstreams[0]].breaker

    async def state() -> float:
        return value(await gw.metrics(), "gateway_upstream_breaker_state", upstream=failing.url)

    await failing.faults(error_rate=1, error_status=500)
    for i in range(3):  # both idle: the first engine of the list is chosen, and fails
        with pytest.raises(openai.InternalServerError):
            await chat(client, f"fail-{i}", [{"role": "user", "content": "hi"}])
        assert home(sims, f"fail-{i}") == 0
    assert breaker.state() == OPEN
    assert await state() == 2
    await chat(client, "while-open", [{"role": "user", "content": "hi"}])
    assert home(sims, "while-open") == 1  # the open engine gets nothing
    await wait_for(lambda: breaker.state() == HALF_OPEN, "the cool-down", timeout=30)
    assert await state() == 1
    await failing.faults(error_rate=0)
    await chat(client, "probe", [{"role": "user", "content": "hi"}])
    assert home(sims, "probe") == 0  # the probe
    assert breaker.state() == CLOSED
    assert await state() == 0
    _, _, body = await fetch("GET", gw.url + "/status")
    routing = json.loads(body)["upstreams"][0]["routing"]
    assert routing["breaker"] == CLOSED and routing["load_source"] == "engine"
    assert routing["share"] == 0.1  # slow start: a tenth of its weight, ramping up over --slow-start
    await chat(client, "after", [{"role": "user", "content": "hi"}])
    assert home(sims, "after") == 1  # both idle: the engine at its full share is preferred
    await settled(gw, *sims)


async def test_engine_killed_under_load_fails_no_request_that_had_no_byte(stack: contextlib.AsyncExitStack) -> None:
    sims = [
        await sim_in(stack, itl=0.01),
        await sim_in(stack, itl=0.02, kv_cache_tokens=300000),
        await sim_in(stack, itl=0.03, max_num_seqs=4),
    ]
    gw = await gateway_in(stack, [s.url for s in sims], max_concurrency=6, **LOADS)
    await wait_for(lambda: all(u.up for u in gw.gateway.pool.upstreams), "every engine up")
    client = await client_in(stack, gw)
    proxy, victim = gw.gateway.proxy, gw.gateway.pool.upstreams[1]
    got_byte: dict[str, bool] = {}

    async def stream(request_id: str) -> str:
        got_byte[request_id] = False
        try:
            chunks = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "tell me"}], max_tokens=20, stream=True,
                extra_headers={"X-Request-Id": request_id},
            )  # fmt: skip
            async for _ in chunks:
                got_byte[request_id] = True
        except openai.APIError:
            return "failed"
        return "ok"

    ids = [f"load-{i}" for i in range(30)]
    tasks = [asyncio.create_task(stream(rid)) for rid in ids]

    def mid_stream() -> bool:
        """Requests wait in the queue; the victim streams; no request waits for an engine's first byte."""
        forwarded = list(proxy.forwarded)
        return (
            gw.gateway.admission.queue_depth > 0
            and any(ex.upstream == victim.name and ex.phase == "decode" for ex in forwarded)
            and all(ex.phase == "decode" for ex in forwarded)
        )

    await wait_for(mid_stream, "the victim to stream while others queue")
    streaming = {ex.request_id for ex in proxy.forwarded if ex.upstream == victim.name}
    sims[1].engine._refuse(3600)  # the engine dies: its streams are cut, its port refuses from now on
    outcomes = dict(zip(ids, await asyncio.gather(*tasks), strict=True))
    for rid, outcome in outcomes.items():
        if rid not in streaming:
            assert outcome == "ok", (rid, outcome)  # queued, or on the engines that stayed: answered
        elif outcome == "failed":
            assert got_byte[rid], rid  # only a stream already under way to the dead engine is cut
    assert any(outcomes[rid] == "failed" for rid in streaming)
    assert not gw.gateway.pool.upstreams[1].up
    await settled(gw, sims[0], sims[2])


@pytest.mark.parametrize("retries", [2, 0])
async def test_an_answer_dropped_before_its_head_moves_to_another_engine(
    stack: contextlib.AsyncExitStack, retries: int
) -> None:
    """A non-streamed generation has no head until it is done: an engine that dies meanwhile drops it before
    any byte, and vLLM aborts a request whose connection is gone (a dead engine runs nothing), so the request
    moves to another engine, never the same one again; with --retries 0 it is the client's 502."""
    dying, other = await sim_in(stack, itl=0.05), await sim_in(stack)
    gw = await gateway_in(stack, [dying.url, other.url], retries=retries, **LOADS)
    await wait_for(lambda: all(u.up for u in gw.gateway.pool.upstreams), "both engines up")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}
    answer = asyncio.create_task(post(gw.url + "/v1/chat/completions", json_body=body))
    await wait_for(lambda: dying.engine.running == 1, "the generation to run on the first engine")
    dying.engine._refuse(3600)  # the engine dies: its connections drop, its port refuses from now on
    status, _, raw = await answer
    text = await gw.metrics()
    if retries:
        assert status == 200, raw
        assert json.loads(raw)["usage"]["completion_tokens"] == 200
        assert other.outcomes() == ["length"]
        assert value(text, "gateway_retries_total", upstream=dying.url, reason="reset") == 1
        assert value(text, "gateway_request_errors_total") == 0
    else:
        assert status == 502, raw
        error_body(json.loads(raw), code="upstream_error", type="server_error")
        assert other.outcomes() == []
        assert value(text, "gateway_retries_total", upstream=dying.url, reason="reset") == 0
    await settled(gw, other)


async def test_retry_budget_stops_a_storm_when_every_engine_is_gone(stack: contextlib.AsyncExitStack) -> None:
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(3)]  # nothing listens there
    gw = await gateway_in(stack, urls, wait_ready=False, **LOADS)
    client = await client_in(stack, gw)
    requests = 20
    for i in range(requests):
        with pytest.raises(openai.APIStatusError) as caught:
            await chat(client, f"storm-{i}", [{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 502
        error_body(caught.value.response.json(), code="upstream_unavailable", type="server_error")
    text = await gw.metrics()
    retries = value(text, "gateway_retries_total")
    # without the budget every request would try all three engines: 2 retries each
    assert 3 <= retries <= max(3, 0.2 * requests) < 2 * requests
    assert value(text, "gateway_request_errors_total", error_type="upstream_unavailable") == requests
    gw.assert_idle()


async def test_a_retry_passes_over_an_engine_that_left_the_pool_meanwhile(stack: contextlib.AsyncExitStack) -> None:
    """The engines are ordered when the request is admitted; one that leaves the pool (DNS discovery) while the
    first answers busy is not where the request moves: the next one still in the pool is."""
    later = [await sim_in(stack), await sim_in(stack)]
    gw: Gw | None = None

    async def busy(request: web.Request) -> web.Response:
        assert gw is not None
        await request.read()
        gw.gateway.set_engines([parse_upstream(first_url), parse_upstream(later[1].url)])  # the second leaves
        body = {"error": {"message": "The engine is currently busy. Please retry.", "type": "ServiceUnavailable",
                          "param": None, "code": 503}}  # fmt: skip
        return web.json_response(body, status=503)

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    async def models(request: web.Request) -> web.Response:
        card = {"id": MODEL, "object": "model", "max_model_len": 1 << 20}
        return web.json_response({"object": "list", "data": [card]})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", busy)
    runner = web.AppRunner(app)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    first_url = f"http://127.0.0.1:{port}"
    gw = await gateway_in(stack, [first_url, *(s.url for s in later)], **LOADS)
    await wait_for(lambda: all(u.up for u in gw.gateway.pool.upstreams), "the three engines up")
    status, _, raw = await post(gw.url + "/v1/chat/completions", json_body={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
    })  # fmt: skip
    assert status == 200, raw
    assert later[0].outcomes() == [] and later[1].outcomes() == ["length"]
    text = await gw.metrics()
    assert value(text, "gateway_retries_total", upstream=first_url, reason="unavailable") == 1
    assert value(text, "gateway_routing_decisions_total", upstream=later[1].url, reason="retry") == 1
    await settled(gw, *later)


async def test_weights_give_an_engine_its_share(stack: contextlib.AsyncExitStack) -> None:
    sims = [await sim_in(stack, itl=0.05), await sim_in(stack, itl=0.05)]
    gw = await gateway_in(stack, [f"{sims[0].url};weight=3", sims[1].url], **LOADS)
    await wait_for(lambda: all(u.up for u in gw.gateway.pool.upstreams), "both engines up")
    assert [u.url for u in gw.gateway.pool.upstreams] == [s.url for s in sims]
    client = await client_in(stack, gw)
    ids = [f"w-{i}" for i in range(16)]
    await asyncio.gather(*(chat(client, rid, [{"role": "user", "content": "hi"}]) for rid in ids))
    counts = [sum(home(sims, rid) == i for rid in ids) for i in range(2)]
    assert counts[0] > 2 * counts[1] > 0, counts  # held at once: about three to one
    await settled(gw, *sims)


@pytest.mark.parametrize("spec", ["http://e:8000;weight=0", "http://e:8000;weight=x", "http://e:8000;colour=red"])
def test_a_bad_upstream_weight_is_refused_at_start(spec: str) -> None:
    with pytest.raises(ValueError, match="--upstream must be"):
        Settings(upstream=[spec])


async def test_an_engine_without_metrics_is_routed_by_the_gateway_s_own_counts(
    stack: contextlib.AsyncExitStack,
) -> None:
    silent, talking = await sim_in(stack), await sim_in(stack)
    await silent.faults(metrics_delay=3600)  # its /metrics never answers, as an OpenAI server without one
    gw = await gateway_in(stack, [silent.url, talking.url], engine_metrics_timeout=0.5, **LOADS)
    await wait_for(lambda: all(u.up for u in gw.gateway.pool.upstreams), "both engines up")
    await wait_for(lambda: known_except(gw, 0), "the talking engine's KV capacity")
    _, _, body = await fetch("GET", gw.url + "/status")
    views = [u["routing"] for u in json.loads(body)["upstreams"]]
    assert [v["load_source"] for v in views] == ["gateway", "engine"]
    assert views[0]["kv_free_tokens"] is None and views[1]["kv_free_tokens"] == 600000 * 9 // 10
    client = await client_in(stack, gw)
    ids = [f"mixed-{i}" for i in range(6)]
    await asyncio.gather(*(chat(client, rid, [{"role": "user", "content": "hi"}]) for rid in ids))
    assert sum(len(s.journal) for s in (silent, talking)) == len(ids)
    text = await gw.metrics()
    assert math.isnan(value(text, "gateway_upstream_kv_free_tokens", upstream=silent.url))
    assert value(text, "gateway_routing_decisions_total", policy="least-load", reason="least_load") == 6
    await settled(gw, silent, talking)


def known_except(gw: Gw, index: int) -> bool:
    """Every engine but one reports its KV capacity."""
    now = time.monotonic()
    states = list(gw.gateway.router.states.values())
    return all(s.capacity(now) for i, s in enumerate(states) if i != index)


async def test_a_request_waiting_for_kv_room_times_out_like_any_queued_one(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, kv_cache_tokens=16000)
    gw = await gateway_in(stack, [sim.url], queue_timeout=0.5, **LOADS)
    await wait_for(lambda: known(gw), "the engine's KV capacity")
    client = await client_in(stack, gw)
    await sim.faults(latency=3600)
    held = asyncio.create_task(client.completions.create(model=MODEL, prompt=list(range(10000)), max_tokens=10))
    await wait_for(lambda: sim.journal, "the first request at the engine")
    status, headers, body = await post(
        gw.url + "/v1/completions", json_body={"model": MODEL, "prompt": list(range(10000)), "max_tokens": 10}
    )
    assert status == 503 and headers["Retry-After"] == "1"
    error_body(json.loads(body), code="queue_timeout", type="server_error")
    assert len(sim.journal) == 1 and gw.gateway.router.waiting == 0
    assert value(await gw.metrics(), "gateway_request_errors_total", error_type="queue_timeout") == 1
    await sim.faults(latency=0)
    await cancel(held)
    await settled(gw, sim)  # no token left held at the engine, no waiter left
