"""The simulated engine as a specification of the two vLLM generations it imitates (0.33 and 0.11), over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import (
    CHAT,
    HELLO,
    MODEL,
    Process,
    Sim,
    error_body,
    fetch,
    post,
    sim_in,
    sim_metrics,
    value,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)

BOTH = pytest.mark.parametrize("generation", ["0.33", "0.11"])
COMPLETIONS = "/v1/completions"


def chat(**fields: object) -> dict[str, object]:
    return {"model": MODEL, "messages": HELLO, **fields}


def compact(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


async def count(sim: Sim, messages: list[dict[str, str]] = HELLO) -> int:
    """The engine's own token count of a chat prompt (its /tokenize)."""
    status, _, raw = await post(sim.url + "/tokenize", json_body={"model": MODEL, "messages": messages})
    assert status == 200
    return int(json.loads(raw)["count"])


async def client_for(stack: contextlib.AsyncExitStack, sim: Sim, key: str = "unused") -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key=key, max_retries=0, timeout=30.0)
    stack.push_async_callback(client.close)
    return client


async def settled_engine(sim: Sim, outcomes: list[str]) -> None:
    """The journal's outcomes are ``outcomes``; refused requests never ran (no finished_reason counted for
    them), and the engine holds nothing: no slot, no queue place, no unfinished request."""
    assert sim.outcomes() == outcomes
    await wait_for(lambda: sim.engine.unfinished == sim.engine.running == sim.engine.waiting == 0, "the engine idle")
    ran = len([o for o in outcomes if o not in ("rejected", "busy")])
    assert value(await sim_metrics(sim), "vllm:request_success_total") == ran


async def occupy(stack: contextlib.AsyncExitStack, sim: Sim, n: int) -> None:
    """n long requests straight to the engine, cancelled when the test ends."""
    session = aiohttp.ClientSession()
    stack.push_async_callback(session.close)
    for _ in range(n):
        task = asyncio.create_task(session.post(sim.url + CHAT, json=chat(max_tokens=100000)))
        stack.callback(task.cancel)


# -- the context window -----------------------------------------------------------------------------------


async def test_033_lowers_max_tokens_to_what_fits(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, max_model_len=100)
    prompt = await count(sim)
    client = await client_for(stack, sim)
    reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 100 - prompt
    (entry,) = sim.journal
    assert (entry["outcome"], entry["prompt_tokens"], entry["max_tokens"]) == ("length", prompt, 100 - prompt)


async def test_033_refuses_a_prompt_that_alone_overflows_the_window(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, max_model_len=50)
    messages = [{"role": "user", "content": "abcd " * 100}]
    status, _, raw = await post(sim.url + CHAT, json_body={"model": MODEL, "messages": messages})
    assert status == 400
    # a text prompt is tokenized with truncation at the window + 1: vLLM knows "at least" that many
    message = (
        "This model's maximum context length is 50 tokens. However, your prompt contains at least 51 input tokens, "
        "which exceeds this limit even without any output tokens. Please reduce the length of the input prompt. "
        "(parameter=input_tokens, value=51)"
    )
    expected = {"error": {"message": message, "type": "BadRequestError", "param": "input_tokens", "code": 400}}
    assert raw == compact(expected)
    # token ids are counted exactly
    status, _, raw = await post(sim.url + COMPLETIONS, json_body={"model": MODEL, "prompt": list(range(70))})
    assert status == 400
    error = error_body(json.loads(raw), code=400, type="BadRequestError", param="input_tokens")
    assert "your prompt contains 70 input tokens" in error["message"]
    assert error["message"].endswith("(parameter=input_tokens, value=70)")
    # a prompt exactly the window's size leaves no output token: vLLM's SamplingParams refuses max_tokens=0
    status, _, raw = await post(sim.url + COMPLETIONS, json_body={"model": MODEL, "prompt": list(range(50))})
    assert status == 400
    error = error_body(json.loads(raw), code=400, type="BadRequestError", param="max_tokens")
    assert error["message"] == "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"
    await settled_engine(sim, ["rejected"] * 3)


async def test_033_refuses_an_output_limit_larger_than_the_window(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, max_model_len=100)
    client = await client_for(stack, sim)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=101)  # type: ignore[arg-type]
    error = error_body(caught.value.response.json(), code=400, type="BadRequestError", param="max_tokens")
    assert error["message"] == (
        "max_tokens=101 cannot be greater than max_model_len=100. Please request fewer output tokens. "
        "(parameter=max_tokens, value=101)"
    )
    # the field the limit came from is named: on chat, max_completion_tokens before max_tokens
    status, _, raw = await post(sim.url + CHAT, json_body=chat(max_tokens=1, max_completion_tokens=200))
    assert status == 400
    error = error_body(json.loads(raw), code=400, type="BadRequestError", param="max_completion_tokens")
    assert error["message"].startswith("max_completion_tokens=200 cannot be greater than max_model_len=100.")
    await settled_engine(sim, ["rejected", "rejected"])


async def test_011_refuses_what_does_not_fit_in_its_old_wording(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, max_model_len=100, vllm_compat="0.11")
    prompt = await count(sim)
    client = await client_for(stack, sim)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100)  # type: ignore[arg-type]
    error = error_body(caught.value.response.json(), code=400, type="BadRequestError", param=None)
    assert error["message"] == (
        f"'max_tokens' or 'max_completion_tokens' is too large: 100. This model's maximum context length is 100 "
        f"tokens and your request has {prompt} input tokens (100 > 100 - {prompt})."
    )
    status, _, raw = await post(sim.url + COMPLETIONS, json_body={"model": MODEL, "prompt": list(range(100))})
    assert status == 400
    error = error_body(json.loads(raw), code=400, type="BadRequestError", param=None)
    assert error["message"] == (
        "This model's maximum context length is 100 tokens. However, your request has 100 input tokens. "
        "Please reduce the length of the input messages."
    )
    reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100 - prompt)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.completion_tokens == 100 - prompt
    await settled_engine(sim, ["rejected", "rejected", "length"])


@pytest.mark.parametrize(
    ("generation", "fields", "tokens"),
    [
        ("0.33", {"max_tokens": 5, "max_completion_tokens": 3}, 3),
        ("0.33", {"max_tokens": 5, "max_completion_tokens": None}, 5),
        ("0.11", {"max_tokens": 5, "max_completion_tokens": 3}, 3),
        ("0.11", {"max_tokens": 5, "max_completion_tokens": 0}, 5),  # 0.11 reads `max_completion_tokens or ...`
    ],
)
async def test_chat_reads_max_completion_tokens_first(
    stack: contextlib.AsyncExitStack, generation: str, fields: dict[str, Any], tokens: int
) -> None:
    sim = await sim_in(stack, vllm_compat=generation)
    status, _, raw = await post(sim.url + CHAT, json_body=chat(**fields))
    assert status == 200, raw
    assert json.loads(raw)["usage"]["completion_tokens"] == tokens
    # completions know only max_tokens
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "max_completion_tokens": 2}
    status, _, raw = await post(sim.url + COMPLETIONS, json_body=body)
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 4


# -- models ------------------------------------------------------------------------------------------------


@BOTH
async def test_an_unknown_model_is_vllms_404(stack: contextlib.AsyncExitStack, generation: str) -> None:
    sim = await sim_in(stack, vllm_compat=generation)
    client = await client_for(stack, sim)
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="gpt-4", messages=HELLO)  # type: ignore[arg-type]
    body = caught.value.response.json()
    if generation == "0.33":
        message = f"The model `gpt-4` does not exist. Valid aliases: {MODEL}."
        expected = {"error": {"message": message, "type": "NotFoundError", "param": "model", "code": 404}}
        assert caught.value.response.content == compact(expected)
    else:
        error_body(body, code=404, type="NotFoundError", param=None)
        assert body["error"]["message"] == "The model `gpt-4` does not exist."
    status, _, raw = await post(sim.url + COMPLETIONS, json_body={"model": "gpt-4", "prompt": "Hello"})
    assert status == 404 and json.loads(raw) == body
    # a request that names no model is the served model's
    status, _, raw = await post(sim.url + CHAT, json_body={"messages": HELLO, "max_tokens": 2})
    assert status == 200 and json.loads(raw)["model"] == MODEL
    await settled_engine(sim, ["rejected", "rejected", "length"])


# -- streams ----------------------------------------------------------------------------------------------


@BOTH
async def test_the_usage_chunk_and_the_fingerprint(stack: contextlib.AsyncExitStack, generation: str) -> None:
    sim = await sim_in(stack, vllm_compat=generation)
    async with aiohttp.ClientSession() as s:
        body = chat(max_tokens=3, stream=True, stream_options={"include_usage": True})
        async with s.post(sim.url + CHAT, json=body) as r:
            raw = await r.read()
        async with s.post(sim.url + CHAT, json=chat(max_tokens=3, stream=True)) as r:
            without_usage = await r.read()
    events = [json.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    assert [len(e["choices"]) for e in events] == [1, 1, 1, 1, 0]  # role, three tokens, usage
    usage = events[-1]
    assert usage["usage"] == {"prompt_tokens": await count(sim), "completion_tokens": 3, "total_tokens": 3 + 7}
    assert raw.endswith(b"data: [DONE]\n\n")
    last = [json.loads(e[6:]) for e in without_usage.split(b"\n\n") if e.startswith(b"data: {")][-1]
    status, _, whole = await post(sim.url + CHAT, json_body=chat(max_tokens=2))
    assert status == 200
    reply = json.loads(whole)
    if generation == "0.33":
        fingerprint = usage["system_fingerprint"]
        assert fingerprint.startswith("vllm-0.33.0-")
        assert "system_fingerprint" not in events[-2]  # only on the final message
        assert last["system_fingerprint"] == fingerprint == reply["system_fingerprint"]
        assert whole == compact(reply)
    else:
        assert all("system_fingerprint" not in e for e in [*events, last, reply])


async def test_033_keep_alive_comments_while_queued_in_prefill_and_between_tokens(
    stack: contextlib.AsyncExitStack,
) -> None:
    sim = await sim_in(stack, max_num_seqs=1, sse_keep_alive_interval=0.005, ttft=0.05, itl=0.02)
    async with contextlib.AsyncExitStack() as blocker, aiohttp.ClientSession() as s:
        await occupy(blocker, sim, 1)
        await wait_for(lambda: sim.engine.running == 1, "the only slot taken")
        async with s.post(sim.url + CHAT, json=chat(max_tokens=3, stream=True)) as r:
            assert r.status == 200
            queued = b""
            while b": keep-alive\n\n" not in queued:  # comments while the stream waits for the slot
                queued += await r.content.readany()
            assert b"data:" not in queued and sim.engine.waiting == 1
            await blocker.aclose()  # the other client leaves: the engine aborts it and the slot frees
            raw = queued + await r.read()
    events = raw.split(b"\n\n")[:-1]
    data = [e for e in events if e.startswith(b"data: ")]
    assert len(data) == 1 + 3 + 1  # role, three tokens, [DONE]
    assert set(events) - set(data) == {b": keep-alive"}
    # comments in prefill and between tokens too: after the role chunk, before the last token
    first, last = raw.index(b"data: "), raw.rindex(b'"finish_reason":"length"')
    assert b": keep-alive" in raw[first:last]
    await settled_engine(sim, ["abort", "length"])


async def test_the_openai_client_reads_a_stream_with_keep_alive_comments(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, sse_keep_alive_interval=0.001, ttft=0.02, itl=0.01)
    client = await client_for(stack, sim)
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, stream=True)  # type: ignore[arg-type]
    content = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
    assert len(content) == 4


# -- the engine's own queue -------------------------------------------------------------------------------


async def test_033_a_full_engine_answers_503_busy(stack: contextlib.AsyncExitStack) -> None:
    """--max-num-queued-reqs caps the unfinished requests (running + waiting) as vLLM 0.33's check_admission;
    beyond it the engine answers 503 before any stream starts, and counts it without an engine label."""
    sim = await sim_in(stack, max_num_seqs=1, max_num_queued_reqs=2)
    await occupy(stack, sim, 2)
    await wait_for(lambda: sim.engine.running == 1 and sim.engine.waiting == 1, "the engine full")
    message = (
        "The engine is currently busy and cannot accept new requests. Please try again later or on a different "
        "instance."
    )
    expected = {"error": {"message": message, "type": "Service Unavailable", "param": None, "code": 503}}
    for stream in (False, True):
        status, headers, raw = await post(sim.url + CHAT, json_body=chat(max_tokens=2, stream=stream))
        assert status == 503 and headers["Content-Type"].startswith("application/json")
        assert raw == compact(expected)
    text = await sim_metrics(sim)
    assert value(text, "vllm:admission_rejections_total", model_name=MODEL, reason="max_num_queued_reqs") == 2
    assert value(text, "vllm:admission_rejections_total", reason="max_num_queued_tokens") == 0
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert all("engine" not in s.labels for s in families["vllm:admission_rejections"].samples)
    assert sim.outcomes()[-2:] == ["busy", "busy"]
    assert value(text, "vllm:request_success_total") == 0


# -- metrics ----------------------------------------------------------------------------------------------

REMOVED_IN_033 = ("vllm:gpu_cache_usage_perc", "vllm:time_per_output_token_seconds", "vllm:gpu_prefix_cache_queries")
NEW_IN_033 = (
    "vllm:num_requests_waiting_by_reason",
    "vllm:prompt_tokens_cached",
    "vllm:request_prefill_kv_computed_tokens",
    "vllm:engine_sleep_state",
    "vllm:cache_config_info",
    "vllm:admission_rejections",
)


@BOTH
async def test_the_series_of_each_generation(stack: contextlib.AsyncExitStack, generation: str) -> None:
    sim = await sim_in(stack, vllm_compat=generation, kv_cache_tokens=1000)
    families = {f.name: f for f in text_string_to_metric_families(await sim_metrics(sim))}
    for name in REMOVED_IN_033:
        assert name not in families
    for name in ("vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries", "vllm:inter_token_latency_seconds"):
        assert name in families
    reasons = {s.labels["finished_reason"]: s.value for s in families["vllm:request_success"].samples}
    if generation == "0.11":
        assert not set(NEW_IN_033) & set(families)
        assert reasons == {"stop": 0, "length": 0, "abort": 0}
        return
    assert set(NEW_IN_033) <= set(families)
    assert reasons == {"stop": 0, "length": 0, "abort": 0, "error": 0, "repetition": 0}
    (info,) = families["vllm:cache_config_info"].samples
    assert info.value == 1 and info.labels["engine"] == "0"
    assert int(info.labels["num_gpu_blocks"]) * int(info.labels["block_size"]) == 992  # 1000 in 16-token blocks
    assert {"cache_dtype", "gpu_memory_utilization", "enable_prefix_caching"} <= set(info.labels)
    sleep = {s.labels["sleep_state"]: s.value for s in families["vllm:engine_sleep_state"].samples}
    assert sleep == {"awake": 1, "weights_offloaded": 0, "discard_all": 0}
    waiting = {s.labels["reason"]: s.value for s in families["vllm:num_requests_waiting_by_reason"].samples}
    assert waiting == {"capacity": 0, "deferred": 0}


@BOTH
async def test_a_repeated_prompt_prefix_is_a_prefix_cache_hit(
    stack: contextlib.AsyncExitStack, generation: str
) -> None:
    sim = await sim_in(stack, vllm_compat=generation)
    messages = [{"role": "user", "content": "abcd " * 100}]
    prompt = await count(sim, messages)
    for _ in range(2):
        status, _, raw = await post(sim.url + CHAT, json_body={"model": MODEL, "messages": messages, "max_tokens": 1})
        assert status == 200, raw
    text = await sim_metrics(sim)
    cached = (prompt - 1) // 16 * 16  # every full block but the one holding the last prompt token
    assert value(text, "vllm:prefix_cache_queries_total") == 2 * prompt
    assert value(text, "vllm:prefix_cache_hits_total") == cached
    assert value(text, "vllm:prompt_tokens_total") == 2 * prompt
    if generation == "0.33":
        assert value(text, "vllm:prompt_tokens_cached_total") == cached
        assert value(text, "vllm:request_prefill_kv_computed_tokens_sum") == 2 * prompt - cached
        assert value(text, "vllm:request_prefill_kv_computed_tokens_count") == 2


# -- faults, the admin surface, --api-key -----------------------------------------------------------------


async def test_033_finish_reason_fault_error_and_repetition(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack)
    client = await client_for(stack, sim)
    await sim.faults(finish_reason="repetition")
    reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason == "repetition"
    await sim.faults(finish_reason="error")
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    error_body(caught.value.response.json(), code=500, type="InternalServerError")
    status, _, raw = await post(sim.url + CHAT, json_body=chat(max_tokens=2, stream=True))
    assert status == 200
    assert raw.endswith(
        b'data: {"error":{"message":"Internal server error","type":"InternalServerError",'
        b'"param":null,"code":500}}\n\ndata: [DONE]\n\n'
    )
    text = await sim_metrics(sim)
    assert value(text, "vllm:request_success_total", finished_reason="repetition") == 1
    assert value(text, "vllm:request_success_total", finished_reason="error") == 2
    await settled_engine(sim, ["repetition", "error", "error"])


async def test_011_has_no_error_or_repetition_finish(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_in(stack, vllm_compat="0.11")
    status, _, raw = await post(sim.url + "/admin/faults", json_body={"finish_reason": "repetition"})
    assert status == 400
    assert "finish_reason 'repetition'" in error_body(json.loads(raw), code=400)["message"]


@BOTH
async def test_admin_state_has_the_journal_and_the_peak(stack: contextlib.AsyncExitStack, generation: str) -> None:
    sim = await sim_in(stack, vllm_compat=generation, max_num_seqs=2)
    async with contextlib.AsyncExitStack() as blocker:
        await occupy(blocker, sim, 3)
        await wait_for(lambda: sim.engine.running == 2 and sim.engine.waiting == 1, "two running, one waiting")
        state = await sim.state()
        assert (state["running"], state["peak_running"], state["waiting"]) == (2, 2, 1)
    await wait_for(lambda: sim.engine.running == 0 and sim.engine.waiting == 0, "the engine idle")
    await sim.reset()
    status, _, _ = await post(sim.url + CHAT, json_body=chat(max_tokens=1), headers={"X-Request-Id": "r-1"})
    assert status == 200
    state = await sim.state()
    assert (state["peak_running"], state["aborted"], state["vllm_compat"]) == (1, 3, generation)
    (entry,) = state["requests"]
    headers = {name.lower(): v for name, v in entry["headers"].items()}  # as the engine received them
    assert entry["request_id"] == headers["x-request-id"] == "r-1"
    assert entry["outcome"] == "length" and entry["body"] == chat(max_tokens=1)


@BOTH
async def test_api_key_guards_v1_only(stack: contextlib.AsyncExitStack, generation: str) -> None:
    sim = await sim_in(stack, vllm_compat=generation, api_key="engine-key")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic engine-key"}):
        for method, path in (("GET", "/v1/models"), ("POST", CHAT)):
            status, _, raw = await fetch(method, sim.url + path, json_body=chat(), headers=headers)
            assert status == 401 and json.loads(raw) == {"error": "Unauthorized"}
    for method, path in (("GET", "/health"), ("GET", "/metrics"), ("POST", "/tokenize")):
        status, _, _ = await fetch(method, sim.url + path, json_body={"prompt": "Hello"})
        assert status == 200, path
    with pytest.raises(openai.AuthenticationError):
        await (await client_for(stack, sim)).models.list()
    client = await client_for(stack, sim, key="engine-key")
    assert [m.id for m in (await client.models.list()).data] == [MODEL]
    reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.completion_tokens == 2
    await settled_engine(sim, ["length"])  # refused requests never reached the engine


# -- options ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--itl", "-1"], {}, "--itl must be 0 or more"),
        ([], {"GATEWAY_SIM_ITL": "-1"}, "GATEWAY_SIM_ITL must be 0 or more (got '-1')"),
        (["--max-num-seqs", "-3"], {}, "--max-num-seqs must be at least 1"),
        (["--max-num-seqs", "0"], {}, "--max-num-seqs must be at least 1"),
        (["--max-model-len", "0"], {}, "--max-model-len must be at least 1"),
        (["--prefill-tokens-per-s", "0"], {}, "--prefill-tokens-per-s must be more than 0"),
        (["--kv-cache-tokens", "8"], {}, "--kv-cache-tokens must be at least 16"),
        (["--vllm-compat", "0.2"], {}, "--vllm-compat"),
        ([], {"GATEWAY_SIM_VLLM_COMPAT": "0.2"}, "GATEWAY_SIM_VLLM_COMPAT"),
        (["--vllm-compat", "0.11", "--max-num-queued-reqs", "4"], {}, "--max-num-queued-reqs must be 0 with"),
        (["--vllm-compat", "0.11", "--sse-keep-alive-interval", "1"], {}, "--sse-keep-alive-interval must be 0 with"),
        (["--sse-keep-alive-interval", "-1"], {}, "--sse-keep-alive-interval must be 0 (off) or more"),
    ],
)
def test_bad_options_exit_2_naming_the_option(args: list[str], env: dict[str, str], named: str) -> None:
    proc = Process("sim", "--port", "0", *args, env=env)
    try:
        assert proc.wait(30) == 2
        lines = [line for line in proc.output().splitlines() if line.startswith("glm-gateway") and ": error: " in line]
        assert len(lines) == 1 and named in lines[0], lines
        assert "Traceback" not in proc.output()
    finally:
        proc.stop()


@BOTH
async def test_an_empty_prompt_is_answered_not_a_500(stack: contextlib.AsyncExitStack, generation: str) -> None:
    sim = await sim_in(stack, vllm_compat=generation)
    status, _, raw = await post(sim.url + COMPLETIONS, json_body={"model": MODEL, "prompt": "", "max_tokens": 2})
    assert status == 200, raw
    assert value(await sim_metrics(sim), "vllm:prefix_cache_hits_total") == 0
