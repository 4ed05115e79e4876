"""DNS discovery: an upstream given by a DNS name is each of its addresses, followed as the records change, against
a DNS server on loopback that the test controls (dnslib) and engines on several loopback addresses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from typing import Any

import openai
import pytest
from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSRecord, DNSServer

from gateway.settings import Settings, SimSettings
from gateway.sim.engine import SimEngine, serve
from tests.harness import FAST_SIM, MODEL, Gw, Sim, client_in, fetch, gateway_in, settled, value, wait_for

NAME = "engines.test"
HOSTS = ("127.0.0.2", "127.0.0.3")  # loopback addresses beside 127.0.0.1: one engine on each, on the same port
LOADS = {"engine_load_interval": 0.05, "engine_metrics_max_age": 0.0}


class Zone(BaseResolver):  # type: ignore[misc]
    """The DNS server's answers, changed by the test: the A records of each name, or one failure for every query."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.failure: int | None = None  # an RCODE, e.g. SERVFAIL

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        addresses = self.records.get(str(request.q.qname).rstrip("."))
        if self.failure is not None:
            reply.header.rcode = self.failure
        elif addresses is None:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.A:
            for address in addresses:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=0))
        return reply


def dns_server(stack: contextlib.ExitStack | contextlib.AsyncExitStack) -> tuple[Zone, str]:
    """A DNS server on a free UDP port of 127.0.0.1, stopped when ``stack`` closes; its zone and address."""
    zone = Zone()
    server = DNSServer(zone, address="127.0.0.1", port=0, logger=DNSLogger("-request,-reply,-truncated,-error"))
    server.start_thread()
    stack.callback(server.server.server_close)
    stack.callback(server.stop)
    return zone, f"127.0.0.1:{server.server.server_address[1]}"


def shared_port() -> int:
    """A port free on every one of HOSTS."""
    while True:
        with socket.socket() as first:
            first.bind((HOSTS[0], 0))
            port = int(first.getsockname()[1])
            with contextlib.ExitStack() as others:
                try:
                    for host in HOSTS[1:]:
                        others.enter_context(socket.socket()).bind((host, port))
                except OSError:
                    continue
        return port


async def sim_at(stack: contextlib.AsyncExitStack, host: str, port: int, **overrides: Any) -> Sim:
    """A simulated engine on ``host:port``, closed when ``stack`` closes."""
    engine = SimEngine(SimSettings(**{"port": port, **FAST_SIM, **overrides}))
    runner = await serve(engine, host, port)
    stack.push_async_callback(runner.cleanup)
    return Sim(engine, runner, f"http://{host}:{port}")


async def status(gw: Gw) -> dict[str, Any]:
    code, _, body = await fetch("GET", gw.url + "/status")
    assert code == 200
    return json.loads(body)


def engines(gw: Gw) -> list[str]:
    return [u.name for u in gw.gateway.pool.upstreams]


def count(gw: Gw, result: str) -> float:
    return gw.gateway.registry.get_sample_value("gateway_dns_resolutions_total", {"result": result}) or 0.0


def served(sim: Sim, prefix: str) -> list[str]:
    return [e["request_id"] for e in sim.journal if e["request_id"].startswith(prefix)]


async def chat(client: openai.AsyncOpenAI, request_id: str, max_tokens: int = 4) -> str:
    answer = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens,
        extra_headers={"X-Request-Id": request_id},
    )  # fmt: skip
    return answer.choices[0].finish_reason


async def test_a_name_is_each_of_its_addresses_followed_as_its_records_change(
    stack: contextlib.AsyncExitStack,
) -> None:
    zone, server = dns_server(stack)
    zone.records[NAME] = [HOSTS[0]]
    port = shared_port()
    sims = [await sim_at(stack, host, port, itl=0.02) for host in HOSTS]
    names = [f"{NAME}@{host}:{port}" for host in HOSTS]
    gw = await gateway_in(
        stack, [f"http://{NAME}:{port};weight=2"], dns_interval=0.05, dns_server=server, slow_start=0, **LOADS
    )
    client = await client_in(stack, gw)

    # one address: one engine, named by the host and its address
    body = await status(gw)
    assert [(u["name"], u["url"], u["up"]) for u in body["upstreams"]] == [(names[0], sims[0].url, True)]
    assert body["settings"]["dns_interval"] == 0.05
    text = await gw.metrics()
    assert value(text, "gateway_upstream_up", upstream=names[0]) == 1
    assert value(text, "gateway_dns_resolutions_total", result="ok") >= 1
    added, removed = (value(text, "gateway_upstream_changes_total", change=c) for c in ("added", "removed"))

    # a second record: a second engine, and requests go to both
    zone.records[NAME] = list(HOSTS)
    await wait_for(lambda: engines(gw) == names and all(u.up for u in gw.gateway.pool.upstreams), "two engines")
    await wait_for(lambda: all(s.capacity(time.monotonic()) for s in gw.gateway.router.states.values()), "KV views")
    body = await status(gw)
    assert [(u["name"], u["url"], u["up"], u["routing"]["weight"]) for u in body["upstreams"]] == [
        (name, sim.url, True, 2) for name, sim in zip(names, sims, strict=True)
    ]  # each address an engine with the upstream's weight
    code, _, models = await fetch("GET", gw.url + "/v1/models")
    assert code == 200 and [m["id"] for m in json.loads(models)["data"]] == [MODEL]
    assert await asyncio.gather(*(chat(client, f"both-{i}", 8) for i in range(8))) == ["length"] * 8
    assert all(served(sim, "both-") for sim in sims), [served(sim, "both-") for sim in sims]
    text = await gw.metrics()
    assert all(value(text, "gateway_upstream_up", upstream=name) == 1 for name in names)
    assert value(text, "gateway_upstream_changes_total", change="added") == added + 1

    # one record removed under traffic: the stream in flight there finishes, new requests go to the other
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "tell me"}], max_tokens=300, stream=True,
        extra_headers={"X-Request-Id": "leaving"},
    )  # fmt: skip
    chunks = [await anext(aiter(stream))]
    victim = next(i for i, sim in enumerate(sims) if served(sim, "leaving"))
    survivor = 1 - victim
    stop = asyncio.Event()

    async def load() -> list[str]:
        outcomes = []
        while not stop.is_set():
            outcomes.append(await chat(client, f"load-{len(outcomes)}"))
        return outcomes

    traffic = asyncio.create_task(load())
    zone.records[NAME] = [HOSTS[survivor]]
    await wait_for(lambda: engines(gw) == [names[survivor]], "the engine to leave the pool")
    body = await status(gw)
    assert [u["name"] for u in body["upstreams"]] == [names[survivor]]
    assert body["routing"]["leaving"] == [{"name": names[victim], "in_flight": 1}]  # the stream, still running
    for i in range(4):
        assert await chat(client, f"after-{i}") == "length"
    assert served(sims[survivor], "after-") == [f"after-{i}" for i in range(4)] and not served(sims[victim], "after-")
    stop.set()
    assert set(await traffic) == {"length"}  # no client request failed
    chunks += [chunk async for chunk in stream]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) == 300  # the whole stream
    assert [e["outcome"] for e in sims[victim].journal if e["request_id"] == "leaving"] == ["length"]
    await wait_for(lambda: not gw.gateway.router.leaving(), "the engine's last request to finish")
    text = await gw.metrics()
    assert names[victim] not in text  # none of its series, the gateway's nor its vllm:* ones
    assert value(text, "gateway_upstream_up", upstream=names[survivor]) == 1
    assert value(text, "vllm:num_requests_running", upstream=names[survivor]) == 0
    assert value(text, "gateway_upstream_changes_total", change="removed") == removed + 1

    # a failed resolution, and a name without addresses, keep the engines
    for failure, result in ((RCODE.SERVFAIL, "error"), (None, "no_address")):
        before = count(gw, result)
        zone.failure = failure
        if failure is None:
            zone.records.clear()
        await wait_for(lambda r=result, b=before: count(gw, r) > b, f"a resolution with result {result}")
        assert engines(gw) == [names[survivor]]
        assert await chat(client, f"kept-{result}") == "length"
        code, _, _ = await fetch("GET", gw.url + "/health/ready")
        assert code == 200
    assert served(sims[survivor], "kept-") == ["kept-error", "kept-no_address"]
    text = await gw.metrics()
    assert value(text, "gateway_dns_resolutions_total", result="error") >= 1
    assert value(text, "gateway_dns_resolutions_total", result="no_address") >= 1
    assert value(text, "gateway_upstream_changes_total", change="removed") == removed + 1
    await settled(gw, *sims)


async def test_the_system_resolver_gives_one_engine_per_host_not_per_address_family(
    stack: contextlib.AsyncExitStack,
) -> None:
    sim = await sim_at(stack, "127.0.0.1", shared_port())
    port = sim.url.rpartition(":")[2]
    gw = await gateway_in(stack, [f"local=http://localhost:{port}"], dns_interval=30)
    assert engines(gw) == [f"local@127.0.0.1:{port}"]  # localhost's ::1 is the same engine: IPv4 only
    assert [u.url for u in gw.gateway.pool.upstreams] == [sim.url]
    client = await client_in(stack, gw)
    assert await chat(client, "system") == "length"
    await settled(gw, sim)


async def test_without_an_interval_a_name_is_one_engine(stack: contextlib.AsyncExitStack) -> None:
    sim = await sim_at(stack, "127.0.0.1", shared_port())
    port = sim.url.rpartition(":")[2]
    gw = await gateway_in(stack, [f"http://localhost:{port}"], dns_interval=0)
    assert gw.gateway.discovery is None
    assert engines(gw) == [f"http://localhost:{port}"]
    assert "gateway_dns_resolutions_total{" not in await gw.metrics()  # no series: nothing is resolved


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dns_interval": -1}, "--dns-interval must be 0 (off) or more"),
        ({"dns_server": "dns.example:53"}, "--dns-server must be an IP address[:PORT]"),
        ({"dns_server": "10.0.0.1:99999"}, "--dns-server must be an IP address[:PORT]"),
    ],
)
def test_bad_dns_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Settings(**options)
