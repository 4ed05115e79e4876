"""The fair share of the queue across keys: another tenant is admitted at the next release while one keeps
50 requests queued; one tenant alone gets the whole capacity; per-key max_concurrency; weights."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.access.keys import digest
from gateway.admission import Admission
from tests.harness import CHAT, HELLO, MODEL, Gw, cancel, error_body, gateway_in, post, settled, sim_in, wait_for

pytestmark = pytest.mark.timeout(60)

KEYS = {name: f"sk-{name}-0123456789abcdef" for name in ("team-a", "team-b")}


def write_keys(path: Path, **options: dict[str, Any]) -> str:
    text = ""
    for name, key in KEYS.items():
        text += f'[[key]]\nname = "{name}"\nsha256 = "{digest(key)}"\n'
        text += "".join(f"{field} = {v}\n" for field, v in options.get(name, {}).items())
    path.write_text(text)
    return str(path)


def send(gw: Gw, name: str, rid: str) -> asyncio.Task[Any]:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 100}
    headers = {"Authorization": f"Bearer {KEYS[name]}", "X-Request-Id": rid}
    return asyncio.create_task(post(gw.url + CHAT, json_body=body, headers=headers))


def tenant(gw: Gw, name: str) -> dict[str, int]:
    return gw.gateway.admission.tenant_stats()[name]


async def test_a_second_tenant_is_admitted_at_the_next_release(
    stack: contextlib.AsyncExitStack, tmp_path: Path
) -> None:
    sim = await sim_in(stack)
    await sim.faults(hang=True)  # every request holds its slot until its client leaves: we release by hand
    gw = await gateway_in(stack, [sim.url], keys_file=write_keys(tmp_path / "keys.toml"), max_concurrency=2)
    a = {f"a-{i}": send(gw, "team-a", f"a-{i}") for i in range(52)}
    await wait_for(lambda: tenant(gw, "team-a")["queue_depth"] == 50, "team-a's 50 requests queued")
    assert tenant(gw, "team-a")["in_flight"] == 2  # alone, team-a holds the whole capacity

    def engine_has() -> list[str]:
        return [e["request_id"] for e in sim.journal if e["request_id"] in a]

    for round_ in range(3):
        b = send(gw, "team-b", f"b-{round_}")
        await wait_for(lambda: tenant(gw, "team-b")["queue_depth"] == 1, "team-b queued")
        await wait_for(lambda: len(engine_has()) == 2, "team-a's two in flight at the engine")
        await cancel(a.pop(engine_has()[-1]))  # one of team-a's requests ends: one release of capacity
        await wait_for(lambda: tenant(gw, "team-b")["in_flight"] == 1, "team-b admitted")
        assert tenant(gw, "team-a")["in_flight"] == 1  # the release went to team-b, not to team-a's queue
        assert tenant(gw, "team-b")["queue_depth"] == 0
        queued = tenant(gw, "team-a")["queue_depth"]
        await cancel(b)  # team-b is idle again: team-a gets the whole capacity back
        await wait_for(lambda: tenant(gw, "team-a")["in_flight"] == 2, "team-a back at the whole capacity")
        assert tenant(gw, "team-a")["queue_depth"] == queued - 1
    b_ids = [e["request_id"] for e in sim.journal if e["request_id"].startswith("b-")]
    assert b_ids == ["b-0", "b-1", "b-2"]
    for task in a.values():
        await cancel(task)
    await sim.faults(hang=False)
    await settled(gw, sim)


async def test_max_concurrency_per_key_waits_without_taking_others_slots(
    stack: contextlib.AsyncExitStack, tmp_path: Path
) -> None:
    sim = await sim_in(stack)
    await sim.faults(hang=True)
    path = write_keys(tmp_path / "keys.toml", **{"team-a": {"max_concurrency": 1}})
    gw = await gateway_in(stack, [sim.url], keys_file=path, max_concurrency=4, queue_timeout=1.0)
    first = send(gw, "team-a", "a-0")
    await wait_for(lambda: tenant(gw, "team-a")["in_flight"] == 1, "team-a's first in flight")
    second = send(gw, "team-a", "a-1")
    await wait_for(lambda: tenant(gw, "team-a")["queue_depth"] == 1, "team-a's second waiting for its own cap")
    other = send(gw, "team-b", "b-0")
    await wait_for(lambda: tenant(gw, "team-b")["in_flight"] == 1, "team-b admitted past team-a's waiter")
    status, headers, raw = await second  # times out like any queued request
    assert status == 503 and headers["Retry-After"]
    error_body(json.loads(raw), code="queue_timeout", type="server_error")
    assert [e["request_id"] for e in sim.journal] == ["a-0", "b-0"]
    await cancel(first)
    await cancel(other)
    await sim.faults(hang=False)
    await settled(gw, sim)


async def test_weights_share_the_capacity() -> None:
    """Weighted fair share on tokens in flight: weight 3 gets three times the tokens of weight 1."""
    admission = Admission(max_concurrency=4, max_queue=100, queue_timeout=30.0, max_tokens=0, fair=True)
    assert admission.fair is not None
    admission.fair.configure("heavy", 3.0, 0)
    admission.fair.configure("light", 1.0, 0)
    for _ in range(4):
        await admission.acquire(10, "first")
    waiting = [asyncio.create_task(admission.acquire(10, name)) for _ in range(10) for name in ("light", "heavy")]
    await wait_for(lambda: admission.queue_depth == 20, "both queued")
    for _ in range(4):
        admission.release(10, "first")
    stats = admission.tenant_stats()
    assert stats["heavy"]["in_flight"] == 3 and stats["light"]["in_flight"] == 1
    for task in waiting:
        await cancel(task)
    for name, held in stats.items():
        for _ in range(held["in_flight"]):
            admission.release(10, name)
    assert admission.in_flight == 0 and admission.queue_depth == 0 and admission.tokens_in_flight == 0
