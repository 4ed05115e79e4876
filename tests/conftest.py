"""Fixtures: a fast simulated engine, the gateway in front of it, and an OpenAI client for the gateway."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import openai
import pytest

from tests.harness import Gw, Sim, start_gateway, start_sim


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    s = await start_sim()
    yield s
    await s.close()


@pytest.fixture
async def gw(sim: Sim) -> AsyncIterator[Gw]:
    g = await start_gateway([sim.url])
    yield g
    await g.close()


@pytest.fixture
async def client(gw: Gw) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    yield c
    await c.close()


@pytest.fixture
async def stack() -> AsyncIterator[contextlib.AsyncExitStack]:
    """An exit stack closed at the end of the test (see ``sim_in``, ``gateway_in``, ``client_in``)."""
    async with contextlib.AsyncExitStack() as st:
        yield st
