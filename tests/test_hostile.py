"""Fuzz: generated bodies, malformed and valid-but-strange, to the generation endpoints of the real gateway in
front of the real sim; never a 5xx the gateway made, never an internal_error, nothing left in flight.

Hundreds of examples by default; ``GATEWAY_FUZZ_EXAMPLES=5000`` runs thousands.  The corpus of hostile
bodies that once broke the gateway is kept as explicit examples.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import os
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.errors import ERROR_TYPES
from tests.harness import MODEL, Gw, Sim, settled, start_gateway, start_sim, value

EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "500"))
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
JSON = {"Content-Type": "application/json"}
T = TypeVar("T")


class Stack:
    """The sim and the gateway on an event loop of their own thread, so hypothesis drives them synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-stack", daemon=True)
        self.thread.start()
        # itl 0 and a token budget: a generated max_tokens never makes a long generation
        self.sim: Sim = self.run(start_sim(itl=0.0, ttft=0.0))
        self.gw: Gw = self.run(start_gateway([self.sim.url], max_tokens_in_flight=20000))
        host, port = self.gw.url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def send(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """One request on the kept-alive connection (a fresh one when the gateway closed it): status, body."""
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                response = self.conn.getresponse()
                answer = response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                return response.status, answer
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()
        self.run(self.gw.close())
        self.run(self.sim.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack()
    try:
        yield s
        # afterwards: nothing in flight, no internal_error, no 5xx of the gateway's own
        s.run(settled(s.gw, s.sim))
        metrics = s.run(s.gw.metrics())
        assert value(metrics, "gateway_request_errors_total", error_type="internal_error") == 0
    finally:
        s.close()


def _nested(depth: int, leaf: str) -> str:
    """JSON text of ``leaf`` inside ``depth`` arrays (built as text: json.dumps would recurse)."""
    return "[" * depth + leaf + "]" * depth


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
_KEYS = st.sampled_from(
    [
        "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "stream", "stream_options",
        "include_usage", "n", "stop", "stop_token_ids", "temperature", "top_p", "logprobs", "role", "content",
        "type", "text", "tools", "tool_choice", "response_format", "seed", "user", "echo", "best_of",
    ]
) | st.text(max_size=12)  # fmt: skip
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_KEYS, inner, max_size=6),
    max_leaves=25,
)
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "", "USER"]) | _SCALARS},
    optional={"content": st.text(max_size=60) | _JSON, "name": _SCALARS},
)
_CHAT = st.fixed_dictionaries(
    {"messages": st.lists(_MESSAGE, max_size=4) | _JSON},
    optional={
        "model": st.just(MODEL) | st.text(max_size=30) | _SCALARS,
        "max_tokens": st.integers(min_value=-5, max_value=64) | _SCALARS,
        "max_completion_tokens": st.integers(min_value=-5, max_value=64) | _SCALARS,
        "stream": st.booleans() | _SCALARS,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": _SCALARS}) | _JSON,
        "stop": st.lists(st.text(max_size=5), max_size=3) | _SCALARS,
        "n": st.integers(min_value=-1, max_value=3) | _SCALARS,
    },
)
_COMPLETION = st.fixed_dictionaries(
    {"prompt": st.text(max_size=60) | st.lists(st.integers(min_value=-1, max_value=200000), max_size=8) | _JSON},
    optional={
        "model": st.just(MODEL) | _SCALARS,
        "max_tokens": st.integers(min_value=-5, max_value=64) | _SCALARS,
        "stream": st.booleans() | _SCALARS,
        "echo": _SCALARS,
    },
)


def _encoded(value: Any) -> st.SearchStrategy[bytes]:
    text = json.dumps(value, allow_nan=True)
    return st.just(text.encode()) | st.just(text.encode()[: max(len(text) // 2, 1)])  # whole, or cut short


_BODIES = st.one_of(
    _CHAT.flatmap(_encoded).map(lambda b: (CHAT, b, JSON)),
    _COMPLETION.flatmap(_encoded).map(lambda b: (COMPLETIONS, b, JSON)),
    st.tuples(st.sampled_from([CHAT, COMPLETIONS]), _JSON.flatmap(_encoded), st.just(JSON)),
    st.tuples(st.sampled_from([CHAT, COMPLETIONS]), st.binary(max_size=200), st.sampled_from([JSON, {}])),
)

_MESSAGE_JSON = '{"role":"user","content":"x"}'
_BUDGET_BYPASS = {"model": MODEL, "messages": [], "max_tokens": 1, "max_completion_tokens": 10**5}
_CORPUS: list[tuple[str, bytes, dict[str, str]]] = [
    (CHAT, _nested(100_000, "").encode(), JSON),  # 100,000 nested arrays
    (CHAT, (f'{{"model":"{MODEL}","messages":{_nested(1000, _MESSAGE_JSON)}}}').encode(), JSON),
    (COMPLETIONS, ('{{"model":"{}","prompt":{}}}'.format(MODEL, _nested(500, '"x"'))).encode(), JSON),
    (
        CHAT,
        b'{"model":"glm-4-9b-chat-1m\\ud800","messages":[{"role":"user","content":"hi"}],'
        b'"stream":true,"stream_options":{}}',
        JSON,
    ),
    (CHAT, b'{"model":"x","messages":[{"role":"user","content":"\\udfff"}]}', JSON),
    (CHAT, b"\x1f\x8b\x08\x00not gzip at all", {**JSON, "Content-Encoding": "gzip"}),
    (
        CHAT,
        gzip.compress(json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()),
        {**JSON, "Content-Encoding": "gzip"},
    ),
    (CHAT, json.dumps(_BUDGET_BYPASS).encode(), JSON),
]


def _with_corpus(test: Any) -> Any:
    for case in _CORPUS:
        test = example(case)(test)
    return test


@_with_corpus
@given(case=_BODIES)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_generated_bodies_never_get_a_5xx_from_the_gateway(
    stack: Stack, case: tuple[str, bytes, dict[str, str]]
) -> None:
    path, body, headers = case
    status, answer = stack.send("POST", path, body, headers)
    assert status < 500 or not _gateway_made(answer), (status, answer[:300], path, body[:300], headers)
    assert stack.send("GET", "/health/live")[0] == 200


def _gateway_made(answer: bytes) -> bool:
    """Is this error the gateway's own (one of its error types), not the engine's answer passed through?"""
    try:
        code = json.loads(answer)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return False
    return code in ERROR_TYPES
