"""The C splice (gateway/_splice.c) on its own: which reads it relays as they came and which it hands back to the
Python path, checked against a reference reading of HTTP/1.1 chunked framing, under generated reads too.

Its part of the relay through a real gateway is in tests/test_relay.py, where every gateway test runs with
``--relay-splice c`` and ``python``."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.metrics.histogram import HistogramChild
from gateway.relay import Splice

TOKEN = b'data: {"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
TERMINAL = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
DONE = b"data: [DONE]\n\n"
COMMENT = b": keep-alive\n\n"
NOT_FINISHED = b'"finish_reason":null'


def chunk(payload: bytes, size: str | None = None) -> bytes:
    return (size if size is not None else f"{len(payload):x}").encode() + b"\r\n" + payload + b"\r\n"


class Transport:
    """The client's side: what was written."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


class Owner:
    """The engine connection's side: the calls the splice passes on once it has handed the connection back."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append(("connection_lost", exc))

    def eof_received(self) -> None:
        self.calls.append(("eof_received", None))

    def pause_writing(self) -> None:
        self.calls.append(("pause_writing", None))

    def resume_writing(self) -> None:
        self.calls.append(("resume_writing", None))


class Rig:
    def __init__(self) -> None:
        self.out = Transport()
        self.owner = Owner()
        self.itl = HistogramChild((0.001, 0.01, 0.1, 1.0))
        self.back: list[bytes | None] = []
        self.splice = Splice(self.out, self.owner, self.back.append, self.itl)
        self.splice.arm(1.0)  # the last token "arrived" long ago: the next gap lands in a high bucket


def whole_token_chunks(data: bytes) -> int | None:
    """The reference: the token events of ``data`` when it is whole chunks of whole token events only, else None."""
    events, at = 0, 0
    if not data:
        return None
    while at < len(data):
        head = re.match(rb"([0-9a-fA-F]{1,8})\r\n", data[at:])
        if head is None or int(head[1], 16) == 0:
            return None
        size = int(head[1], 16)
        start = at + head.end()
        payload = data[start : start + size]
        if len(payload) < size or data[start + size : start + size + 2] != b"\r\n" or not payload.endswith(b"\n\n"):
            return None
        if payload.count(b"\n\n") != payload.count(NOT_FINISHED):
            return None
        events += payload.count(b"\n\n")
        at = start + size + 2
    return events


def test_a_read_of_whole_token_chunks_is_relayed_as_it_came() -> None:
    rig = Rig()
    data = chunk(TOKEN) + chunk(TOKEN * 2)
    before = time.perf_counter()
    rig.splice.data_received(data)
    assert rig.out.written == [data] and rig.back == []
    assert (rig.splice.events, rig.splice.written) == (3, len(TOKEN) * 3)
    assert before <= rig.splice.last <= time.perf_counter() and rig.splice.active  # the read timeout's clock too
    assert rig.itl.counts == [0] * 5  # the gaps are kept in C until the Python path takes the connection back
    rig.splice.close()
    assert rig.itl.counts == [2, 0, 0, 0, 1]  # one gap since the last token, two events that came with it
    assert rig.itl.sum == pytest.approx(rig.splice.last - 1.0)


def test_the_gaps_of_a_long_spliced_stream_reach_the_histogram_once_a_second() -> None:
    rig = Rig()
    rig.splice.data_received(chunk(TOKEN))
    assert sum(rig.itl.counts) == 0
    time.sleep(1.05)
    rig.splice.data_received(chunk(TOKEN * 2))
    assert rig.itl.counts == [1, 0, 0, 0, 2] and rig.splice.active  # two gaps over 1 s, one event with the last
    rig.splice.data_received(chunk(TOKEN))
    rig.splice.close()
    assert sum(rig.itl.counts) == rig.splice.events == 4


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(chunk(TOKEN)[:-1], id="a chunk without its CRLF"),
        pytest.param(chunk(TOKEN)[:10], id="half a chunk"),
        pytest.param(chunk(TOKEN) + b"4", id="a whole chunk and the start of the next"),
        pytest.param(chunk(TOKEN) + b"0\r\n\r\n", id="the tokens and the last chunk"),
        pytest.param(b"0\r\n\r\n", id="the last chunk"),
        pytest.param(f"{len(TOKEN):x};ext=1".encode() + b"\r\n" + TOKEN + b"\r\n", id="a chunk extension"),
        pytest.param(chunk(TOKEN, size="0" * 7 + f"{len(TOKEN):x}"), id="nine hex digits"),
        pytest.param(chunk(TOKEN, size=f"+{len(TOKEN):x}"), id="a signed size"),
        pytest.param(chunk(TOKEN, size=f"{len(TOKEN) + 1:x}"), id="a size one too long"),
        pytest.param(chunk(TOKEN[:-1]), id="an event left open"),
        pytest.param(chunk(TOKEN + TERMINAL), id="a terminal chunk"),
        pytest.param(chunk(USAGE), id="the usage chunk"),
        pytest.param(chunk(DONE), id="[DONE]"),
        pytest.param(chunk(COMMENT), id="a comment"),
        pytest.param(chunk(TOKEN) + chunk(COMMENT), id="tokens, then a comment"),
        pytest.param(b"", id="nothing"),
    ],
)
def test_every_other_read_is_handed_back_whole_and_untouched(data: bytes) -> None:
    rig = Rig()
    rig.splice.data_received(data)
    assert rig.back == [data] and rig.out.written == []
    assert not rig.splice.active and rig.splice.events == 0
    assert rig.itl.counts == [0] * 5 and rig.itl.sum == 0.0


def test_sizes_in_upper_case_and_with_leading_zeros_are_chunks_too() -> None:
    rig = Rig()
    data = chunk(TOKEN, size=f"00{len(TOKEN):X}")
    rig.splice.data_received(data)
    assert rig.out.written == [data]


def test_a_client_that_cannot_take_more_is_the_python_paths_until_armed_again() -> None:
    """stall() is what the client's connection calls when its buffer fills (pause_writing) or it leaves."""
    rig = Rig()
    rig.splice.data_received(chunk(TOKEN))
    rig.splice.stall()
    rig.splice.data_received(chunk(TOKEN * 2))
    assert rig.back == [chunk(TOKEN * 2)] and rig.out.written == [chunk(TOKEN)] and not rig.splice.active
    rig.splice.arm(rig.splice.last)
    rig.splice.data_received(chunk(TOKEN))
    assert rig.out.written == [chunk(TOKEN), chunk(TOKEN)] and rig.splice.active


def test_the_transports_other_calls_hand_the_connection_back_first() -> None:
    rig = Rig()
    error = ConnectionResetError("gone")
    rig.splice.connection_lost(error)
    assert rig.back == [None] and rig.owner.calls == [("connection_lost", error)]
    rig.splice.arm(1.0)
    rig.splice.eof_received()
    rig.splice.pause_writing()
    rig.splice.resume_writing()
    assert rig.back == [None, None]  # handed back once; the calls after it go straight on
    assert [name for name, _ in rig.owner.calls[1:]] == ["eof_received", "pause_writing", "resume_writing"]


def test_close_hands_back_once_and_lets_go() -> None:
    rig = Rig()
    rig.splice.close()
    assert rig.back == [None] and not rig.splice.active
    with pytest.raises(RuntimeError, match="closed"):
        rig.splice.connection_lost(None)
    rig.splice.close()  # a second close does nothing
    assert rig.back == [None]


def test_a_closed_or_never_initialised_splice_cannot_be_armed() -> None:
    rig = Rig()
    rig.splice.close()
    with pytest.raises(RuntimeError, match="closed"):
        rig.splice.arm(1.0)
    with pytest.raises(RuntimeError, match="closed"):
        Splice.__new__(Splice).arm(1.0)


def test_a_close_from_within_the_write_lets_the_read_finish() -> None:
    rig = Rig()
    call = rig.out.write

    def closing(data: bytes) -> None:
        splice.close()
        call(data)

    rig.out.write = closing  # type: ignore[method-assign]
    splice = Splice(rig.out, rig.owner, rig.back.append, rig.itl)
    splice.arm(1.0)
    splice.data_received(chunk(TOKEN))
    assert rig.back == [None] and rig.out.written == [chunk(TOKEN)] and splice.events == 1
    assert not splice.active
    splice.close()
    assert sum(rig.itl.counts) == 1


def test_a_close_from_within_back_still_passes_the_transports_call_on() -> None:
    rig = Rig()

    def back(data: bytes | None) -> None:
        rig.back.append(data)
        splice.close()

    splice = Splice(rig.out, rig.owner, back, rig.itl)
    splice.arm(1.0)
    splice.connection_lost(None)
    assert rig.back == [None] and rig.owner.calls == [("connection_lost", None)]


def test_counts_shortened_in_place_are_refused_not_written_past() -> None:
    rig = Rig()
    rig.splice.data_received(chunk(TOKEN))
    rig.itl.counts.clear()
    with pytest.raises(RuntimeError, match="counts"):
        rig.splice.close()
    assert rig.splice.events == 1 and rig.back == [None]  # written and handed back, whatever the histogram


def test_the_transports_call_is_passed_on_even_when_the_gaps_cannot_go_into_the_histogram() -> None:
    """A connection_lost that did not reach the engine connection would leave its request waiting: the call goes
    on first, the histogram's failure is raised after it."""
    rig = Rig()
    rig.splice.data_received(chunk(TOKEN))
    rig.itl.counts.clear()
    with pytest.raises(RuntimeError, match="counts"):
        rig.splice.connection_lost(None)
    assert rig.back == [None] and rig.owner.calls == [("connection_lost", None)]


def test_an_observation_that_fails_leaves_the_histogram_as_it_was() -> None:
    class NoSum(HistogramChild):
        __slots__ = ()

        def __getattribute__(self, name: str) -> Any:
            if name == "sum":
                raise ValueError("no sum")
            return object.__getattribute__(self, name)

    rig = Rig()
    itl = NoSum((0.001, 0.01, 0.1, 1.0))
    splice = Splice(rig.out, rig.owner, rig.back.append, itl)
    splice.arm(1.0)
    splice.data_received(chunk(TOKEN))
    with pytest.raises(ValueError, match="no sum"):
        splice.data_received(b"0\r\n\r\n")  # the last chunk: handed back, the gaps kept here put in the child
    assert itl.counts == [0] * 5 and splice.events == 1 and rig.back == [b"0\r\n\r\n"]


class Count:
    """A count that runs Python code when the splice reads it (``__index__``): ``then()``, once."""

    def __init__(self, then: Any) -> None:
        self.then = then

    def __index__(self) -> int:
        then, self.then = self.then, None
        if then is not None:
            then()
        return 0


def test_a_flush_from_within_the_sums_attribute_adds_nothing_twice() -> None:
    class Closing(HistogramChild):
        __slots__ = ()

        def __setattr__(self, name: str, value: Any) -> None:
            object.__setattr__(self, name, value)
            if name == "sum" and hooks:
                hooks.pop()()  # a close: its own flush, while the first one is setting the sum

    hooks: list[Any] = []
    rig = Rig()
    itl = Closing((0.001, 0.01, 0.1, 1.0))
    splice = Splice(rig.out, rig.owner, rig.back.append, itl)
    splice.arm(1.0)
    splice.data_received(chunk(TOKEN))
    hooks.append(splice.close)
    splice.close()
    assert itl.counts == [0, 0, 0, 0, 1] and itl.sum == pytest.approx(splice.last - 1.0)


def test_a_flush_from_within_a_counts_own_code_loses_nothing() -> None:
    rig = Rig()
    rig.splice.data_received(chunk(TOKEN))
    rig.itl.counts[4] = Count(lambda: rig.splice.data_received(b"0\r\n\r\n"))  # handed back again: a flush
    rig.splice.data_received(b"0\r\n\r\n")
    assert rig.itl.counts == [0, 0, 0, 0, 1]
    rig.splice.arm(1.0)
    rig.splice.data_received(chunk(TOKEN))
    rig.splice.close()
    assert rig.itl.counts == [0, 0, 0, 0, 2]  # the next gap is not taken for one already put in


def test_counts_emptied_by_a_counts_own_code_are_refused_not_written_past() -> None:
    rig = Rig()
    rig.splice.data_received(chunk(TOKEN))
    rig.itl.counts[4] = Count(rig.itl.counts.clear)
    with pytest.raises(RuntimeError, match="counts"):
        rig.splice.close()
    assert rig.itl.counts == [] and rig.back == [None]


def test_only_a_histogram_child_is_taken_for_the_gaps() -> None:
    child = HistogramChild((0.1, 1.0))
    child.counts = [0, 0]  # one count short of the bounds and +Inf
    with pytest.raises(TypeError, match="HistogramChild"):
        Splice(Transport(), Owner(), print, child)
    with pytest.raises(AttributeError):
        Splice(Transport(), Owner(), print, object())


pieces = st.sampled_from(
    [
        chunk(TOKEN),
        chunk(TOKEN * 3),
        chunk(USAGE),
        chunk(COMMENT),
        b"0\r\n\r\n",
        b"\r\n",
        b"ff\r\n",
        TOKEN,
        NOT_FINISHED,
        # the scans' edges: ends and markers run together, cut short, or with other '_' about them
        chunk(TOKEN + b"\n"),
        chunk(b"_" + NOT_FINISHED + NOT_FINISHED + b"\n\n\n\n"),
        chunk(b'"finish' + NOT_FINISHED[:-1] + b"\n\n"),
        chunk(NOT_FINISHED + b"_\n\n"),
        b"\n\n\n",
        b"_",
    ]
)


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(st.one_of(pieces, st.binary(max_size=12)), max_size=6), cut=st.integers(0, 8))
def test_any_read_is_relayed_exactly_when_it_is_whole_token_chunks(parts: list[bytes], cut: int) -> None:
    data = b"".join(parts)
    data = data[: len(data) - cut] if cut and data else data
    rig = Rig()
    rig.splice.data_received(data)
    events = whole_token_chunks(data)
    if events is None:
        assert rig.back == [data] and rig.out.written == []
    else:
        assert rig.out.written == [data] and rig.back == []
        rig.splice.close()
        assert rig.splice.events == events == sum(rig.itl.counts)
