"""Chat and completions through the gateway with the real openai client, streamed and not."""

from __future__ import annotations

import openai

from tests.harness import HELLO, MODEL, Gw, Sim, value


async def test_chat_not_streamed(client: openai.AsyncOpenAI, gw: Gw, sim: Sim) -> None:
    reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    assert reply.choices[0].finish_reason == "length"
    text = await gw.metrics()
    assert value(text, "gateway_requests_total", endpoint="chat_completions", model=MODEL, status="200") == 1
    assert value(text, "gateway_completion_tokens_sum", model=MODEL) == 5
    gw.assert_idle()


async def test_chat_streamed_strips_usage_it_asked_for(client: openai.AsyncOpenAI, gw: Gw, sim: Sim) -> None:
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=7, stream=True)
    chunks = [c async for c in stream]
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    body = sim.journal[-1]["body"]
    assert body["stream_options"] == {"include_usage": True}
    assert body["stop_token_ids"] == [151329, 151336, 151338]
    text = await gw.metrics()
    assert value(text, "gateway_completion_tokens_sum", model=MODEL) == 7
    assert value(text, "gateway_inter_token_latency_seconds_count", model=MODEL) == 6
    assert value(text, "gateway_time_to_first_token_seconds_count", model=MODEL) == 1
    gw.assert_idle()
