"""Access: API keys (401, 403, 400), per-key rate limits (429 and the x-ratelimit-* headers, the SDK's retry,
settlement), the keys file's reload, the admin pages, and that no key material leaks anywhere."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from gateway.access.keys import Key, KeyRing, digest, parse
from gateway.cli import main
from gateway.settings import Settings
from tests.harness import (
    CHAT,
    HELLO,
    MODEL,
    Gw,
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

pytestmark = pytest.mark.timeout(60)

ADMIN = "sk-admin-0123456789abcdef"
TEAM_A = "sk-team-a-0123456789abcdef"
TEAM_B = "sk-team-b-0123456789abcdef"
WRONG = "sk-wrong-0123456789abcdef"


def entry(name: str, key: str, **limits: Any) -> str:
    lines = [f'[[key]]\nname = "{name}"\nsha256 = "{digest(key)}"']
    lines += [f"{field} = {json.dumps(v)}" for field, v in limits.items()]
    return "\n".join(lines) + "\n"


def keys_file(path: Path, *entries: str) -> str:
    path.write_text("\n".join(entries))
    return str(path)


def same_stamp_rename(path: Path, old: str, new: str) -> None:
    """Rename a key in place keeping the file's size, inode and modification time: invisible to the watch."""
    before = path.stat()
    path.write_text(path.read_text().replace(old, new))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def admin_metrics(gw: Gw) -> str:
    status, _, raw = await fetch("GET", gw.url + "/metrics", headers=auth(ADMIN))
    assert status == 200, raw
    return raw.decode()


async def keyed_gateway(stack: contextlib.AsyncExitStack, tmp_path: Path, *entries: str, **options: Any) -> Gw:
    sim = options.pop("sim")
    path = keys_file(tmp_path / "keys.toml", entry("admin", ADMIN, admin=True), *entries)
    return await gateway_in(stack, [sim.url], keys_file=path, **options)


def openai_client(stack: contextlib.AsyncExitStack, gw: Gw, key: str, **options: Any) -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, **{"max_retries": 0, "timeout": 30.0, **options})
    stack.push_async_callback(client.close)
    return client


# -- keys -------------------------------------------------------------------------------------------------


async def test_missing_or_unknown_key_is_401(stack: contextlib.AsyncExitStack, tmp_path: Path) -> None:
    sim = await sim_in(stack)
    gw = await keyed_gateway(stack, tmp_path, entry("team-a", TEAM_A), sim=sim)
    with pytest.raises(openai.AuthenticationError) as caught:
        await openai_client(stack, gw, WRONG).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    assert caught.value.status_code == 401
    assert caught.value.response.headers["WWW-Authenticate"] == "Bearer"
    error_body(caught.value.response.json(), code="invalid_api_key", type="invalid_request_error")
    status, headers, raw = await post(gw.url + CHAT, json_body={"model": MODEL, "messages": HELLO})
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    error_body(json.loads(raw), code="invalid_api_key", type="invalid_request_error")
    # x-api-key works as well as Authorization: Bearer
    status, _, raw = await post(
        gw.url + CHAT, json_body={"model": MODEL, "messages": HELLO}, headers={"x-api-key": TEAM_A}
    )
    assert status == 200, raw
    text = await admin_metrics(gw)
    assert value(text, "gateway_request_errors_total", error_type="invalid_api_key", key="anonymous") == 2
    assert value(text, "gateway_requests_total", status="401", key="anonymous") == 2
    assert value(text, "gateway_requests_total", status="200", key="team-a") == 1
    assert len(sim.journal) == 1
    await settled(gw, sim)


async def test_401_does_not_wait_for_the_body(stack: contextlib.AsyncExitStack, tmp_path: Path) -> None:
    sim = await sim_in(stack)
    gw = await keyed_gateway(stack, tmp_path, sim=sim)
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 16000000\r\n\r\n{".encode()
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")  # answered while 16 MB are still to come
    assert head.startswith(b"HTTP/1.1 401 ")
    writer.close()
    assert sim.journal == []
    await settled(gw, sim)


async def test_model_not_allowed_is_403(stack: contextlib.AsyncExitStack, tmp_path: Path) -> None:
    sim = await sim_in(stack)
    gw = await keyed_gateway(stack, tmp_path, entry("team-a", TEAM_A, models=["another-model"]), sim=sim)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await openai_client(stack, gw, TEAM_A).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    error_body(caught.value.response.json(), code="model_not_allowed", type="permission_error", param="model")
    text = await admin_metrics(gw)
    assert value(text, "gateway_request_errors_total", error_type="model_not_allowed", key="team-a") == 1
    assert sim.journal == []
    await settled(gw, sim)


async def test_max_prompt_tokens_is_400(stack: contextlib.AsyncExitStack, tmp_path: Path) -> None:
    sim = await sim_in(stack)
    gw = await keyed_gateway(stack, tmp_path, entry("team-a", TEAM_A, max_prompt_tokens=50), sim=sim)
    client = openai_client(stack, gw, TEAM_A)
    long = [{"role": "user", "content": "word " * 200}]
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=MODEL, messages=long, max_tokens=2)  # type: ignore[arg-type]
    error = error_body(caught.value.response.json(), code="max_prompt_tokens", param="messages")
    assert "max_prompt_tokens of 50" in error["message"]
    reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason == "length"
    text = await admin_metrics(gw)
    assert value(text, "gateway_request_errors_total", error_type="max_prompt_tokens", key="team-a") == 1
    assert len(sim.journal) == 1
    await settled(gw, sim)


async def test_engine_sees_the_upstream_key_never_the_clients(stack: contextlib.AsyncExitStack, tmp_path: Path) -> None:
    sim = await sim_in(stack)
    gw = await keyed_gateway(stack, tmp_path, entry("team-a", TEAM_A), sim=sim, upstream_api_key="engine-key-42")
    client = openai_client(stack, gw, TEAM_A)
    await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    await post(
        gw.url + CHAT, json_body={"model": MODEL, "messages": HELLO, "max_tokens": 2}, headers={"x-api-key": TEAM_A}
    )
    async with aiohttp.ClientSession() as s, s.get(sim.url + "/admin/state") as r:
        requests = (await r.json())["requests"]
    assert len(requests) == 2
    for seen in requests:
        headers = {k.lower(): v for k, v in seen["headers"].items()}
        assert headers["authorization"] == "Bearer engine-key-42"
        assert "x-api-key" not in headers
        assert TEAM_A not in json.dumps(seen)
    await settled(gw, sim)


async def test_without_an_upstream_key_no_authorization_reaches_the_engine(
    stack: contextlib.AsyncExitStack, tmp_path: Path
) -> None:
    sim = await sim_in(stack)
    gw = await keyed_gateway(stack, tmp_path, entry("team-a", TEAM_A), sim=sim)
    await openai_client(stack, gw, TEAM_A).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    headers = {k.lower() for k in sim.journal[0]["headers"]}
    assert "authorization" not in headers and "x-api-key" not in headers
    await settled(gw, sim)


# -- admin pages ------------------------------------------------------------------------------------------


async def test_metrics_and_status_need_an_admin_key(stack: contextlib.AsyncExitStack, tmp_path: Path) -> None:
    sim = await sim_in(stack)
    gw = await keyed_gateway(stack, tmp_path, entry("team-a", TEAM_A), sim=sim)
    for path in ("/metrics", "/status"):
        status, headers, raw = await fetch("GET", gw.url + path)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        error_body(json.loads(raw), code="invalid_api_key")
        status, _, raw = await fetch("GET", gw.url + path, headers=auth(TEAM_A))
        assert status == 403
        error_body(json.loads(raw), code="admin_only", type="permission_error")
        status, _, _ = await fetch("GET", gw.url + path, headers=auth(ADMIN))
        assert status == 200
    for path in ("/health/live", "/health/ready", "/health"):
        status, _, _ = await fetch("GET", gw.url + path)
        assert status == 200, path
    status, _, raw = await fetch("GET", gw.url + "/status", headers=auth(ADMIN))
    assert set(json.loads(raw)["admission"]["keys"]) == {"admin", "team-a"}
    await settled(gw, sim)


async def test_metrics_port_serves_the_admin_pages_apart(stack: contextlib.AsyncExitStack, tmp_path: Path) -> None:
    sim = await sim_in(stack)
    port = free_port()
    gw = await keyed_gateway(stack, tmp_path, sim=sim, metrics_port=port)
    side = f"http://127.0.0.1:{port}"
    for path in ("/metrics", "/status"):
        status, _, _ = await fetch("GET", side + path)
        assert status == 200, path
        status, _, raw = await fetch("GET", gw.url + path, headers=auth(ADMIN))
        assert status == 404, path
        error_body(json.loads(raw), code="not_found")
    await settled(gw, sim)


# -- rate limits ------------------------------------------------------------------------------------------


async def test_requests_per_minute_429_with_headers(stack: contextlib.AsyncExitStack, tmp_path: Path) -> None:
    sim = await sim_in(stack)
    gw = await keyed_gateway(stack, tmp_path, entry("team-a", TEAM_A, requests_per_minute=2), sim=sim)
    client = openai_client(stack, gw, TEAM_A)
    for left in (1, 0):
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        assert raw.headers["x-ratelimit-remaining-requests"] == str(left)
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
        assert "x-ratelimit-limit-tokens" not in raw.headers  # no tokens_per_minute for this key
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    error_body(caught.value.response.json(), code="rate_limited", type="rate_limit_error")
    headers = caught.value.response.headers
    assert 1 <= int(headers["Retry-After"]) <= 30  # one request refills in 60 s / 2
    assert headers["x-ratelimit-remaining-requests"] == "0"
    # a stream's answer carries them too
    stream = await openai_client(stack, gw, ADMIN).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=2,
        stream=True,  # type: ignore[arg-type]
    )
    assert "x-ratelimit-limit-requests" not in stream.headers  # the admin key has no limits
    async for _ in stream.parse():
        pass
    text = await admin_metrics(gw)
    assert value(text, "gateway_rate_limited_total", key="team-a", limit="requests") == 1
    assert value(text, "gateway_request_errors_total", error_type="rate_limited", key="team-a") == 1
    assert value(text, "gateway_requests_total", status="429", key="team-a") == 1
    assert len(sim.journal) == 3
    await settled(gw, sim)


async def test_sdk_retry_waits_for_the_refill_then_succeeds(stack: contextlib.AsyncExitStack, tmp_path: Path) -> None:
    sim = await sim_in(stack)
    gw = await keyed_gateway(stack, tmp_path, entry("team-a", TEAM_A, requests_per_minute=12), sim=sim)
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 1}
    answers = await asyncio.gather(*(post(gw.url + CHAT, json_body=body, headers=auth(TEAM_A)) for _ in range(12)))
    assert [status for status, _, _ in answers] == [200] * 12  # the whole minute's requests, at once
    client = openai_client(stack, gw, TEAM_A, max_retries=3)
    reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason == "length"
    # the SDK's first try was refused; it waited for Retry-After (5 s at most) and was served
    text = await admin_metrics(gw)
    assert value(text, "gateway_requests_total", key="team-a", status="429") >= 1
    assert value(text, "gateway_requests_total", key="team-a", status="200") == 13
    await settled(gw, sim)


async def test_tokens_charged_at_admission_and_settled_at_the_end(
    stack: contextlib.AsyncExitStack, tmp_path: Path
) -> None:
    """An aborted stream charged prompt + max_tokens gives back what it did not generate."""
    sim = await sim_in(stack, itl=0.05)
    cap = 6000  # refills 100 tokens a second: far less than the refund within this test
    gw = await keyed_gateway(stack, tmp_path, entry("team-a", TEAM_A, tokens_per_minute=cap), sim=sim)
    client = openai_client(stack, gw, TEAM_A)
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=3000,
        stream=True,  # type: ignore[arg-type]
    )
    charged_left = int(raw.headers["x-ratelimit-remaining-tokens"])
    prompt = cap - 3000 - charged_left  # what the bucket lost beyond max_tokens: the prompt estimate
    assert 0 < prompt < 50
    stream = raw.parse()
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()  # the client leaves after its first token
    await wait_for(lambda: gw.gateway.proxy.active == 0, "the aborted stream to end")
    again = await client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=1)  # type: ignore[arg-type]
    # with settlement only the two prompts and the few tokens generated are gone; without it, 3000 more
    # (the bucket would need 30 s to refill that)
    assert int(again.headers["x-ratelimit-remaining-tokens"]) >= cap - 2 * prompt - 50
    text = await admin_metrics(gw)
    assert value(text, "gateway_request_errors_total", error_type="client_disconnected", key="team-a") == 1
    await settled(gw, sim)


async def test_request_larger_than_the_keys_tokens_per_minute(stack: contextlib.AsyncExitStack, tmp_path: Path) -> None:
    sim = await sim_in(stack)
    gw = await keyed_gateway(stack, tmp_path, entry("team-a", TEAM_A, tokens_per_minute=100), sim=sim)
    with pytest.raises(openai.RateLimitError) as caught:
        await openai_client(stack, gw, TEAM_A).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=200)  # type: ignore[arg-type]
    error = error_body(caught.value.response.json(), code="rate_limited")
    assert "tokens_per_minute of 100" in error["message"]
    assert sim.journal == []
    await settled(gw, sim)


# -- the keys file ----------------------------------------------------------------------------------------


async def test_reload_on_change_good_and_bad(stack: contextlib.AsyncExitStack, tmp_path: Path) -> None:
    sim = await sim_in(stack)
    gw = await keyed_gateway(stack, tmp_path, entry("team-a", TEAM_A), sim=sim)
    ring = gw.gateway.access.ring  # type: ignore[union-attr]
    path = Path(ring.path)
    new = tmp_path / "new.toml"
    keys_file(new, entry("admin", ADMIN, admin=True), entry("team-b", TEAM_B))
    os.replace(new, path)
    await wait_for(lambda: ring.reloads == 1, "the changed file to be read")
    assert (await post(gw.url + CHAT, json_body={"model": MODEL, "messages": HELLO}, headers=auth(TEAM_A)))[0] == 401
    assert (await post(gw.url + CHAT, json_body={"model": MODEL, "messages": HELLO}, headers=auth(TEAM_B)))[0] == 200
    bad = tmp_path / "bad.toml"
    keys_file(bad, "[[key]]\nname = 'broken\n")
    os.replace(bad, path)
    await wait_for(lambda: ring.reload_failed, "the broken file to be refused")
    assert (await post(gw.url + CHAT, json_body={"model": MODEL, "messages": HELLO}, headers=auth(TEAM_B)))[0] == 200
    text = await admin_metrics(gw)
    assert value(text, "gateway_keys_reload_failed") == 1
    assert value(text, "gateway_keys") == 2
    await settled(gw, sim)


async def test_reload_on_sighup(stack: contextlib.AsyncExitStack, tmp_path: Path) -> None:
    sim = await sim_in(stack)
    gw = await keyed_gateway(stack, tmp_path, entry("team-a", TEAM_A), sim=sim)
    ring = gw.gateway.access.ring  # type: ignore[union-attr]
    path = Path(ring.path)
    same_stamp_rename(path, '"team-a"', '"team-z"')  # only SIGHUP makes the gateway read it again
    os.kill(os.getpid(), signal.SIGHUP)
    await wait_for(lambda: ring.reloads == 1, "SIGHUP to reload the file")
    assert "team-z" in ring.names()
    await post(gw.url + CHAT, json_body={"model": MODEL, "messages": HELLO, "max_tokens": 1}, headers=auth(TEAM_A))
    text = await admin_metrics(gw)
    assert value(text, "gateway_requests_total", key="team-z", status="200") == 1
    await settled(gw, sim)


async def test_no_key_material_in_logs_status_or_metrics(
    stack: contextlib.AsyncExitStack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sim = await sim_in(stack)
    gw = await keyed_gateway(
        stack, tmp_path, entry("team-a", TEAM_A, requests_per_minute=1), sim=sim, upstream_api_key="engine-key-42"
    )
    for key in (TEAM_A, TEAM_A, WRONG):
        await post(gw.url + CHAT, json_body={"model": MODEL, "messages": HELLO, "max_tokens": 1}, headers=auth(key))
    keys_file(Path(gw.gateway.settings.keys_file), "not toml [")
    await wait_for(lambda: gw.gateway.access.ring.reload_failed, "the broken file")  # type: ignore[union-attr]
    _, _, status = await fetch("GET", gw.url + "/status", headers=auth(ADMIN))
    seen = "\n".join([caplog.text, status.decode(), await admin_metrics(gw)])
    assert "team-a" in seen  # names are fine
    for secret in (ADMIN, TEAM_A, WRONG, "engine-key-42"):
        assert secret not in seen
        assert digest(secret) not in seen
    await settled(gw, sim)


# -- the file format --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not toml [", "not valid TOML"),
        ("", "no [[key]] entries"),
        ('[[key]]\nname = "a"\n', "exactly one of sha256 (recommended) or key"),
        (f'[[key]]\nname = "a"\nsha256 = "{digest(TEAM_A)}"\nrpm = 5\n', "unknown field(s) rpm"),
        (f'[[key]]\nname = "a b"\nsha256 = "{digest(TEAM_A)}"\n', "name must be"),
        ('[[key]]\nname = "a"\nsha256 = "xyz"\n', "sha256 must be 64 hex digits"),
        (f'[[key]]\nname = "a"\nsha256 = "{digest(TEAM_A)}"\nweight = 0\n', "weight must be"),
        (f'[[key]]\nname = "a"\nsha256 = "{digest(TEAM_A)}"\ntokens_per_minute = -1\n', "tokens_per_minute"),
        (entry("a", TEAM_A) + entry("a", TEAM_B), "used twice"),
        (entry("a", TEAM_A) + entry("b", TEAM_A), "the same key as 'a'"),
        (entry("anonymous", TEAM_A), "reserved"),
    ],
)
def test_a_bad_keys_file_stops_the_start_naming_it(tmp_path: Path, text: str, message: str) -> None:
    path = keys_file(tmp_path / "keys.toml", text)
    with pytest.raises(ValueError, match="--keys-file") as caught:
        Settings(keys_file=path)
    assert message in str(caught.value)
    assert TEAM_A not in str(caught.value)


def test_plain_keys_in_the_file_and_on_the_command_line(tmp_path: Path) -> None:
    path = keys_file(tmp_path / "keys.toml", f'[[key]]\nname = "a"\nkey = "{TEAM_A}"\nmodels = ["m"]\n')
    ring = KeyRing.from_settings([], path)
    assert ring is not None and ring.lookup(TEAM_A) == Key("a", digest(TEAM_A), models=frozenset({"m"}))
    assert ring.lookup(TEAM_B) is None
    flags = KeyRing.from_settings([TEAM_A, TEAM_B], "")
    assert flags is not None and flags.names() == ["api-key-1", "api-key-2"]
    assert all(k.admin for k in flags.keys.values())
    assert KeyRing.from_settings([], "") is None
    with pytest.raises(ValueError, match="--api-key"):
        Settings(api_key=[TEAM_A], keys_file=path)


def test_keys_new_prints_a_key_and_its_entry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "new", "team-c"]) == 0
    out = capsys.readouterr().out
    key = next(word for word in out.split() if word.startswith("sk-"))
    entry_text = out[out.index("[[key]]") :]
    assert parse(entry_text)[digest(key)].name == "team-c"
    assert key not in entry_text
