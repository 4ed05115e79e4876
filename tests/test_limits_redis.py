"""One limit across replicas: two gateway processes share their keys' token buckets in a real Redis, and
fall back to local buckets of limit / replicas when Redis stops, without failing a request."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.access.keys import digest
from tests.harness import CHAT, HELLO, MODEL, Process, fetch, free_port, post, sim_in, value, wait_http

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed (.ci/run does)"),
]

ADMIN = "sk-admin-0123456789abcdef"
TEAM = "sk-team-a-0123456789abcdef"
CAP = 2000  # tokens per minute for team-a, shared by both gateways
MAX_TOKENS = 90


@pytest.fixture
def redis_url() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        proc.terminate()
        proc.wait(10)


async def start_gateways(stack: contextlib.ExitStack, tmp_path: Path, sim_url: str, redis: str) -> list[str]:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        f'[[key]]\nname = "admin"\nsha256 = "{digest(ADMIN)}"\nadmin = true\n\n'
        f'[[key]]\nname = "team-a"\nsha256 = "{digest(TEAM)}"\ntokens_per_minute = {CAP}\n'
    )
    urls = []
    for _ in range(2):
        port = free_port()
        proc = Process(
            "serve", "--host", "127.0.0.1", "--port", str(port), "--upstream", sim_url, "--keys-file", str(keys),
            "--limits-redis", redis, "--replicas", "2", "--health-interval", "0.1",
        )  # fmt: skip
        stack.callback(proc.stop)
        log = tmp_path / f"gw-{port}.log"
        stack.callback(lambda p=proc, log=log: log.write_text(_stopped_output(p)))
        urls.append(f"http://127.0.0.1:{port}")
    for url in urls:
        await asyncio.to_thread(wait_http, url + "/health/ready")
    return urls


def read_logs(folder: Path) -> str:
    return "".join(p.read_text() for p in folder.glob("gw-*.log"))


def _stopped_output(proc: Process) -> str:
    proc.stop()
    return proc.output()


async def used_tokens(url: str) -> tuple[float, str]:
    status, _, raw = await fetch("GET", url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    assert status == 200
    text = raw.decode()
    return value(text, "gateway_key_tokens_total", key="team-a"), text


async def spend(urls: list[str], count: int) -> list[int]:
    """``count`` requests of team-a, in turn to each gateway; their statuses."""
    body = {"model": MODEL, "messages": HELLO, "max_tokens": MAX_TOKENS}
    statuses = []
    for i in range(count):
        status, _, _ = await post(
            urls[i % len(urls)] + CHAT, json_body=body, headers={"Authorization": f"Bearer {TEAM}"}
        )
        statuses.append(status)
    return statuses


async def test_two_gateways_share_one_limit_then_fall_back_when_redis_stops(
    tmp_path: Path, redis_url: tuple[str, subprocess.Popen[bytes]]
) -> None:
    url, redis = redis_url
    async with contextlib.AsyncExitStack() as astack:
        sim = await sim_in(astack)
        with contextlib.ExitStack() as stack:
            gws = await start_gateways(stack, tmp_path, sim.url, url)
            started = time.monotonic()
            statuses = await spend(gws, 3 * CAP // MAX_TOKENS)
            elapsed = time.monotonic() - started
            assert set(statuses) == {200, 429}
            used = [(await used_tokens(gw))[0] for gw in gws]
            assert all(u > 0 for u in used)  # both replicas admitted some
            refill = CAP * elapsed / 60
            # together within one limit (plus what refilled meanwhile), where local buckets would admit 2 x CAP
            assert CAP - 2 * MAX_TOKENS <= sum(used) <= CAP + refill
            for gw in gws:
                assert value((await used_tokens(gw))[1], "gateway_limits_redis_up") == 1

            redis.terminate()  # Redis goes away mid-run: each replica falls back to CAP / 2, fails nothing
            redis.wait(10)
            started = time.monotonic()
            statuses = await spend(gws[:1], CAP // MAX_TOKENS)
            elapsed = time.monotonic() - started
            assert set(statuses) == {200, 429}
            fallback = (await used_tokens(gws[0]))[0] - used[0]
            assert CAP / 2 - 2 * MAX_TOKENS <= fallback <= CAP / 2 * (1 + elapsed / 60)
            assert await spend(gws[1:], 1) == [200]  # the other replica's own local half
            for gw in gws:
                assert value((await used_tokens(gw))[1], "gateway_limits_redis_up") == 0
        logs = read_logs(tmp_path)
        assert "Redis unreachable" in logs
        assert TEAM not in logs and digest(TEAM) not in logs
