"""Several models behind one gateway: each request goes to an engine serving the model it names, a model no
engine serves is vLLM's 404, a request naming none gets the first served model, and /v1/models lists the
ready engines' models with each one's max_model_len."""

from __future__ import annotations

import asyncio
import contextlib
import json

import openai
import pytest

from tests.harness import (
    CHAT,
    HELLO,
    MODEL,
    Gw,
    Sim,
    client_in,
    error_body,
    fetch,
    gateway_in,
    post,
    settled,
    sim_in,
    value,
    wait_for,
)

OTHER = "other-model"


async def two_models(stack: contextlib.AsyncExitStack) -> tuple[Gw, Sim, Sim]:
    glm = await sim_in(stack, max_model_len=131072)
    other = await sim_in(stack, model=OTHER, max_model_len=8192)
    gw = await gateway_in(stack, [glm.url, other.url])
    await wait_for(lambda: all(u.up for u in gw.gateway.pool.upstreams), "both engines up")
    return gw, glm, other


async def test_each_request_goes_to_an_engine_serving_its_model(stack: contextlib.AsyncExitStack) -> None:
    gw, glm, other = await two_models(stack)
    client = await client_in(stack, gw)
    for _ in range(3):
        answer = await client.chat.completions.create(model=OTHER, messages=HELLO, max_tokens=2)
        assert answer.model == OTHER
        answer = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        assert answer.model == MODEL
    stream = await client.chat.completions.create(model=OTHER, messages=HELLO, max_tokens=2, stream=True)
    async for _ in stream:
        pass
    assert [e["body"]["model"] for e in other.journal] == [OTHER] * 4
    assert [e["body"]["model"] for e in glm.journal] == [MODEL] * 3
    await settled(gw, glm, other)


async def test_a_request_naming_no_model_gets_the_first_served_model(stack: contextlib.AsyncExitStack) -> None:
    gw, glm, other = await two_models(stack)
    status, _, body = await post(gw.url + "/v1/completions", json_body={"prompt": "Hello", "max_tokens": 2})
    assert status == 200 and json.loads(body)["model"] == MODEL
    assert len(glm.journal) == 1 and other.journal == []
    await settled(gw, glm, other)


async def test_a_model_no_engine_serves_is_vllms_404(stack: contextlib.AsyncExitStack) -> None:
    gw, glm, other = await two_models(stack)
    client = await client_in(stack, gw)
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="gpt-4", messages=HELLO, max_tokens=2)
    assert caught.value.status_code == 404
    status, _, body = await post(gw.url + CHAT, json_body={"model": "gpt-4", "messages": HELLO})
    assert status == 404 and body.endswith(b"\n")
    error = error_body(json.loads(body), code=404, type="NotFoundError", param="model")
    assert error["message"] == "The model `gpt-4` does not exist."
    text = await gw.metrics()
    assert value(text, "gateway_request_errors_total", error_type="model_not_found") == 2
    assert value(text, "gateway_requests_total", status="404") == 2
    assert glm.journal == [] and other.journal == []  # neither engine saw it
    await settled(gw, glm, other)


async def test_models_lists_the_ready_engines_models(stack: contextlib.AsyncExitStack) -> None:
    gw, glm, other = await two_models(stack)
    client = await client_in(stack, gw)
    page = await client.models.list()
    assert {m.id: m.model_extra["max_model_len"] for m in page.data} == {MODEL: 131072, OTHER: 8192}
    assert all(m.object == "model" and m.owned_by == "vllm" for m in page.data)  # the engines' own cards
    text = await gw.metrics()
    assert value(text, "gateway_requests_total", endpoint="models", status="200") == 1

    await other.close()  # gone: once marked down, its model leaves the list
    await wait_for(lambda: not gw.gateway.pool.upstreams[1].up, "the other engine marked down")
    status, _, body = await fetch("GET", gw.url + "/v1/models")
    assert status == 200 and [c["id"] for c in json.loads(body)["data"]] == [MODEL]
    await settled(gw, glm)


async def test_an_unknown_model_is_refused_before_it_waits_for_a_slot(stack: contextlib.AsyncExitStack) -> None:
    """With every slot taken, a request for a model nobody serves is still answered at once."""
    sim = await sim_in(stack)
    gw = await gateway_in(stack, [sim.url], max_concurrency=1)
    await sim.faults(hang=True)
    held = asyncio.create_task(post(gw.url + CHAT, json_body={"model": MODEL, "messages": HELLO}))
    stack.callback(held.cancel)
    await wait_for(lambda: gw.gateway.admission.in_flight == 1, "the one slot to be taken")
    status, _, raw = await post(gw.url + CHAT, json_body={"model": "gpt-4", "messages": HELLO})
    assert status == 404
    error_body(json.loads(raw), code=404, type="NotFoundError", param="model")
    assert gw.gateway.admission.queue_depth == 0
