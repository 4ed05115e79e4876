"""The cross-worker coordination of ``--workers N``, over a Unix socket: the parent's side (the one admission of
all workers, the engines' state of ``EngineHost`` sent to each, the merge of the metrics, the keys' reload) and
each worker's (``ParentLink``: the ``Admission`` interface, and the parent's engine state applied as it comes)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.admission import RATE_WINDOW
from gateway.enginehost import EngineHost
from gateway.errors import GatewayError
from gateway.fair import FairQueue
from gateway.metrics.merge import Family, Merged, families, gateway_series, parents_series
from gateway.settings import Settings
from gateway.upstreams import Upstream

log = logging.getLogger("gateway.workers")

_SNAPSHOT_TIMEOUT = 2.0  # seconds a worker has to send its series for a scrape; its last ones count after
_LINE_LIMIT = 1 << 28  # bytes of one message: a worker's series, the merged exposition
_WATCH_INTERVAL = 1.0  # seconds between looks at the keys file (as one process's watch)
_SPARE_SHARE = 4  # a worker keeps spare at most its even share of the slots and tokens divided by this
_NO_BUDGET = 1 << 62  # the spare tokens' bound without --max-tokens-in-flight: the slots' bound is the one
_RECALL_TIMEOUT = 0.25  # seconds the acquires wait for every worker's spare slots; a stalled worker keeps its own


class AtTurnEnd:
    """Calls ``action`` once at the end of this turn of the event loop, however often it is asked to meanwhile:
    the messages of a turn go out in one write."""

    __slots__ = ("action", "due")

    def __init__(self, action: Callable[[], None]) -> None:
        self.action = action
        self.due = False

    def __call__(self) -> None:
        if not self.due:
            self.due = True
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        self.due = False
        self.action()


def _frame(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


# The messages of every request, each a short line of fields split by spaces, the key's name last (letters,
# digits, '-' and '_', or empty): an acquire, a release, and the grant that answers an acquire (with the
# admission's levels, see Authority.levels).  A JSON object costs about 5 us to write or read, this a tenth.
# Every other message is a JSON object: a line that starts with "{".
def _acquire_line(ask: int, cost: int, key: str) -> bytes:
    return b"a %d %d %s\n" % (ask, cost, key.encode())


def _release_line(cost: int, key: str) -> bytes:
    return b"r %d %s\n" % (cost, key.encode())


def _grant_line(ask: int, waited: float, levels: Sequence[float], cost: int, key: str) -> bytes:
    in_flight, queue_depth, tokens, granted, eta = levels
    return b"g %d %r %d %d %d %d %r %d %s\n" % (ask, waited, in_flight, queue_depth, tokens, granted, eta, cost,
                                                key.encode())  # fmt: skip


# A worker's tokens in flight at each engine (``t``, after the requests of a turn started or ended there) and
# every worker's (``h``, from the parent to the others): lines too, as often as requests come.  Engine URLs hold
# no whitespace (gateway/settings.py refuses it).
def _tokens_line(tokens: dict[str, int]) -> bytes:
    return b"t" + b"".join(b" %s %d" % (url.encode(), n) for url, n in tokens.items()) + b"\n"


def _parse_tokens(line: bytes) -> dict[str, int]:
    fields = line.split()
    return {fields[i].decode(): int(fields[i + 1]) for i in range(1, len(fields) - 1, 2)}


def _held_line(held: dict[str, dict[str, int]]) -> bytes:
    pairs = (b" %s %s %d" % (url.encode(), worker.encode(), n) for url, of in held.items() for worker, n in of.items())
    return b"h" + b"".join(pairs) + b"\n"


def _parse_held(line: bytes) -> dict[str, dict[str, int]]:
    fields = line.split()
    held: dict[str, dict[str, int]] = {}
    for i in range(1, len(fields) - 2, 3):
        held.setdefault(fields[i].decode(), {})[fields[i + 1].decode()] = int(fields[i + 2])
    return held


# Spare slots (README: Workers): ``k S T`` (parent to worker: keep up to S freed slots and T tokens spare, and admit
# from them without asking), ``x`` (give them back and keep none until the next ``k``) and its answer ``u S T``
# (worker to parent: the spare slots and tokens given back, and when it kept its last ones: the release rate
# behind Retry-After counts them).
_RECALL = b"x\n"
# Stopping: ``d`` (parent to worker: drain, as on a first SIGTERM) and ``c`` (cut off what is left: the parent's
# second signal).  Words, not signals: a worker that also gets a SIGTERM of its own at the same moment (systemd's
# KillMode=control-group, pkill) drains once instead of taking the two for a second signal.
_DRAIN, _CUT = b"d\n", b"c\n"


def _keep_line(slots: int, tokens: int) -> bytes:
    return b"k %d %d\n" % (slots, tokens)


def _spare_line(slots: int, tokens: int, released: Sequence[float]) -> bytes:
    return b"u %d %d" % (slots, tokens) + b"".join(b" %r" % t for t in released) + b"\n"


def _orphaned() -> GatewayError:
    """What a worker gets for what it would ask of a parent that is gone."""
    return GatewayError(
        "draining",
        "The gateway's parent process is gone: this worker is shutting down. Retry on another instance.",
        retry_after=1,
    )


def signal_self(cut: bool) -> None:
    """A worker told to stop before it serves: nothing to drain, its SIGTERM handler ends it."""
    os.kill(os.getpid(), signal.SIGTERM)


def spare_bounds(settings: Settings) -> tuple[int, int] | None:
    """The slots and tokens a worker may keep spare, or None where every request asks the parent: with API keys
    (their caps and fair share are per request) and where a worker's part of the cap would be under one slot."""
    share = _SPARE_SHARE * settings.worker_count
    if settings.api_key or settings.keys_file:
        return None
    slots = settings.max_concurrency // share
    tokens = settings.max_tokens_in_flight // share if settings.max_tokens_in_flight else _NO_BUDGET
    return (slots, tokens) if slots and tokens else None


class Outbox:
    """The frames for one peer in this turn of the event loop, written at its end in one write: one system call
    here and one wake-up there.  ``wake`` asks for the end of the turn (an ``AtTurnEnd``), which calls ``flush``."""

    __slots__ = ("frames", "wake", "writer")

    def __init__(self, writer: asyncio.StreamWriter, wake: Callable[[], None]) -> None:
        self.writer = writer
        self.wake = wake
        self.frames: list[bytes] = []

    def put(self, frame: bytes) -> None:
        self.frames.append(frame)
        self.wake()

    def flush(self) -> None:
        if self.frames:
            data = b"".join(self.frames)
            self.frames.clear()
            if not self.writer.is_closing():
                self.writer.write(data)


@dataclass
class WorkerLink:
    """One worker's connection to the parent: what it holds and waits for, for a clean-up when it dies."""

    index: int
    pid: int
    writer: asyncio.StreamWriter
    outbox: Outbox  # what the parent sends it, written at the end of each turn of the parent's loop
    admitted: int = 0  # requests it admitted, from its spare slots or granted here, as it last said
    from_spare: int = 0  # of them, those admitted from its spare slots without asking
    spare: tuple[int, int] = (0, 0)  # its slots and tokens held and not in use, as it last said
    held: dict[str, list[int]] = field(default_factory=dict)  # key -> [slots, tokens] held (in use or spare)
    waiting: dict[int, asyncio.Task[float]] = field(default_factory=dict)
    snapshots: dict[int, asyncio.Future[None]] = field(default_factory=dict)  # asked, until it answers
    last: list[Family] = field(default_factory=list)  # its series at the last scrape
    tokens: dict[str, int] = field(default_factory=dict)  # engine URL -> its tokens in flight there, last said

    def send(self, message: dict[str, Any]) -> None:
        self.write(_frame(message))

    def write(self, frame: bytes) -> None:
        self.outbox.put(frame)

    def hold(self, slots: int, tokens: int, key: str) -> None:
        held = self.held.setdefault(key, [0, 0])
        held[0] += slots
        held[1] += tokens

    def report(self, msg: dict[str, Any]) -> None:
        """What it said of itself in answer to a snapshot: its admissions, spare slots and (unless light) series."""
        slots, tokens = msg["spare"]
        self.admitted, self.from_spare, self.spare = msg["admitted"], msg["from_spare"], (int(slots), int(tokens))
        if msg.get("families") is not None:
            self.last = msg["families"]


class Authority:
    """The parent's side: the one ``Admission`` of all workers, the engines' state sent to every worker, the keys'
    reload, and the merge of their series."""

    def __init__(self, settings: Settings, describe: Callable[[], list[dict[str, Any]]]) -> None:
        self.settings = settings
        self.host = EngineHost(settings, self.send_state)
        self.admission = self.host.admission
        self.describe = describe  # the supervisor's view of its workers, for /status
        self.stopping = False  # the workers were told to drain: one that connects from now on is told too
        self.links: dict[int, WorkerLink] = {}
        self.retired = Merged()  # the counters of workers that died, so that no total goes backwards
        self._ids = itertools.count()
        self._scrapes: set[asyncio.Future[None]] = set()
        self._engines_due = False  # the engines' state is sent every worker at the end of this moment
        self._moved: set[int] = set()  # the workers whose tokens at the engines changed in this moment
        self._wake = AtTurnEnd(self._flush)  # every link's messages written at the end of this turn of the loop
        self._pending = 0  # acquires not answered at once: the next ones queue behind them, in arrival order
        self.spare_bounds = spare_bounds(settings)
        self.lending = False  # the workers are told that they may keep spare slots
        self._recalling: set[int] = set()  # the workers whose spare slots are called back and not yet returned
        # acquires that wait for them meanwhile, with the time each arrived (the wait counts in its queue timeout)
        self._deferred: list[tuple[WorkerLink, int, int, str, float]] | None = None
        self._recall_timer: asyncio.TimerHandle | None = None
        m, a = self.host.metrics, self.admission
        m.in_flight.set_function(lambda: a.in_flight - self.spare()[0])  # type: ignore[attr-defined]
        m.tokens_in_flight.set_function(lambda: a.tokens_in_flight - self.spare()[1])  # type: ignore[attr-defined]

    def reload(self) -> None:
        """SIGHUP or a change of the keys file: read here (the fair queue's weights and caps) and by every worker."""
        if self.host.access is not None:
            self.host.access.reload()
            self._send_all({"op": "keys"})

    async def watch_keys(self) -> None:
        """The one watch of the keys file's changes on the host."""
        ring = self.host.access.ring if self.host.access is not None else None
        while ring is not None and ring.path:
            await asyncio.sleep(_WATCH_INTERVAL)
            if ring.changed():
                self.reload()

    def send_state(self) -> None:
        """The engines' state to every worker, once for all the changes of this moment."""
        self._engines_due = True
        self._wake()

    def _tokens_moved(self, index: int) -> None:
        """A worker's tokens at the engines changed: the other workers are told, once for all the changes of this
        moment."""
        self._moved.add(index)
        self._wake()

    def _flush(self) -> None:
        """The end of this turn: the state due, the word that spare slots may be kept again, then each worker's
        messages in one write."""
        if not self.lending and self._may_lend():
            self.lending = True
            assert self.spare_bounds is not None
            frame = _keep_line(*self.spare_bounds)
            for link in self.links.values():
                link.write(frame)
        if self._engines_due:
            self._engines_due = False
            self._send_all(self._state())
        elif self._moved:
            frame = _held_line(self._held())
            for link in self.links.values():
                if any(index != link.index for index in self._moved):  # not only its own tokens moved
                    link.write(frame)
        self._moved.clear()
        for link in self.links.values():
            link.outbox.flush()

    def _state(self) -> dict[str, Any]:
        return self.host.state() | {"held": self._held()}

    def _held(self) -> dict[str, dict[str, int]]:
        """Each engine's tokens in flight from each worker (the KV room counts them all)."""
        held: dict[str, dict[str, int]] = {}
        for link in self.links.values():
            for url, tokens in link.tokens.items():
                if tokens:
                    held.setdefault(url, {})[str(link.index)] = tokens
        return held

    def stop_workers(self, cut: bool) -> None:
        """Every worker drains (``cut``: cuts off what it still runs)."""
        self.stopping = True
        for link in self.links.values():
            link.write(_CUT if cut else _DRAIN)

    def _send_all(self, message: dict[str, Any]) -> None:
        frame = _frame(message)
        for link in self.links.values():
            link.write(frame)

    async def serve(self, path: str) -> asyncio.AbstractServer:
        return await asyncio.start_unix_server(self._connection, path, limit=_LINE_LIMIT)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = json.loads(await reader.readline())
        link = WorkerLink(hello["index"], hello["pid"], writer, Outbox(writer, self._wake))
        self.links[link.index] = link
        link.send(self._state())  # before it takes connections, a worker knows the engines
        if self.lending and self.spare_bounds is not None:
            link.write(_keep_line(*self.spare_bounds))
        if self.stopping:  # (started before the stop, connected after it)
            link.write(_DRAIN)
        try:
            while line := await reader.readline():
                if line[:1] == b"a":
                    _, ask, cost, key = line[:-1].split(b" ")
                    self._acquire(link, int(ask), int(cost), key.decode())
                elif line[:1] == b"r":
                    _, cost, key = line[:-1].split(b" ")
                    self._release(link, int(cost), key.decode())
                elif line[:1] == b"t":
                    link.tokens = _parse_tokens(line)
                    self._tokens_moved(link.index)
                elif line[:1] == b"u":
                    _, slots, tokens, *released = line[:-1].split(b" ")
                    self.admission.heard([float(t) for t in released])
                    self._returned(link, int(slots), int(tokens))
                else:
                    self._handle(link, json.loads(line))
        except (ConnectionError, ValueError) as exc:
            log.warning("worker %d: coordination connection broken: %s", link.index, exc)
        finally:
            self._gone(link)
            writer.close()

    def spare(self) -> tuple[int, int]:
        """The slots and tokens that workers hold spare (as they last said): held, not in flight."""
        links = self.links.values()
        return sum(link.spare[0] for link in links), sum(link.spare[1] for link in links)

    def _may_lend(self) -> bool:
        """Whether the workers may keep spare slots again: nothing waits, and the cap has room for all of them."""
        a, bounds = self.admission, self.spare_bounds
        if bounds is None or self._deferred is not None or self._pending or a.queue_depth or not self.links:
            return False
        slots, tokens = (n * len(self.links) for n in bounds)
        fits_tokens = not a.max_tokens or a.tokens_in_flight + tokens <= a.max_tokens
        return fits_tokens and a.in_flight + slots <= a.max_concurrency

    def _acquire(self, link: WorkerLink, ask: int, cost: int, key: str, since: float | None = None) -> None:
        """A worker's acquire, arrived now or (``since``) deferred while the spare slots were called back."""
        if self._deferred is not None:  # the spare slots are being called back: after them, in arrival order
            self._deferred.append((link, ask, cost, key, time.monotonic() if since is None else since))
            return
        waited = 0.0 if since is None else time.monotonic() - since
        if not self._pending and self.admission.try_acquire(cost, key):
            self._granted(link, ask, cost, key, waited)
            return
        a = self.admission
        if self.lending and not (a.max_tokens and cost > a.max_tokens):
            # the room it needs may be spare in a worker: called back before it waits or is refused
            self.lending = False
            self._recalling = set(self.links)
            self._deferred = [(link, ask, cost, key, time.monotonic() - waited)]
            for other in self.links.values():
                other.write(_RECALL)
            self._recall_timer = asyncio.get_running_loop().call_later(_RECALL_TIMEOUT, self._recall_expired)
            return
        self._pending += 1  # until it is decided, later acquires take this way too: none overtakes it
        task = asyncio.ensure_future(self.admission.acquire(cost, key, waited))
        link.waiting[ask] = task
        task.add_done_callback(lambda t: self._decided(link, ask, cost, key, t))

    def _release(self, link: WorkerLink, cost: int, key: str) -> None:
        link.hold(-1, -cost, key)
        self.admission.release(cost, key)
        if not self.lending:
            self._wake()  # the end of this turn looks whether spare slots may be kept again

    def _returned(self, link: WorkerLink, slots: int, tokens: int) -> None:
        """A worker's spare slots, called back: free here, and once every worker's are back, the acquires that
        waited for them go on in their order."""
        link.hold(-slots, -tokens, "")
        link.spare = (0, 0)
        self.admission.give_back(slots, tokens)
        self._recalling.discard(link.index)
        self._resume()
        self._wake()  # (a late answer may be what leaves room to lend again)

    def _recall_expired(self) -> None:
        """A worker that has not answered the call-back in time (stopped, its loop blocked) keeps its spare slots
        until it does; the acquires go on without them."""
        self._recall_timer = None
        log.warning("workers %s did not give their spare slots back in %g s", sorted(self._recalling), _RECALL_TIMEOUT)
        self._recalling.clear()
        self._resume()

    def _resume(self) -> None:
        if self._deferred is None or self._recalling:
            return
        if self._recall_timer is not None:
            self._recall_timer.cancel()
            self._recall_timer = None
        deferred, self._deferred = self._deferred, None
        for link, ask, cost, key, since in deferred:
            if self.links.get(link.index) is link:
                self._acquire(link, ask, cost, key, since)
        self._wake()

    def _handle(self, link: WorkerLink, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "cancel":
            task = link.waiting.get(msg["id"])
            if task is not None:
                task.cancel()  # a grant at this moment is handed on by Admission itself
            elif self._deferred is not None:  # waiting for the spare slots to come back: it need not wait at all
                self._deferred = [d for d in self._deferred if d[0] is not link or d[1] != msg["id"]]
        elif op == "observed":
            self.host.observed(msg)
        elif op == "series":
            link.report(msg)
            future = link.snapshots.pop(msg["id"], None)
            if future is not None and not future.done():
                future.set_result(None)
        elif op == "metrics":
            task = asyncio.ensure_future(self._metrics(link, msg["id"]))
            self._scrapes.add(task)
            task.add_done_callback(self._scrapes.discard)
        elif op == "status":
            task = asyncio.ensure_future(self._status(link, msg["id"]))
            self._scrapes.add(task)
            task.add_done_callback(self._scrapes.discard)
        elif op == "final":  # a worker that drained: its last series, before it exits
            link.last = msg["families"]

    def _granted(self, link: WorkerLink, ask: int, cost: int, key: str, waited: float) -> None:
        """A slot the admission gave a worker's acquire: held by that worker, which is told (a worker that is
        gone meanwhile hands it on)."""
        link.hold(1, cost, key)
        if self.links.get(link.index) is not link or link.writer.is_closing():
            self._release_all(link)
        else:
            link.write(_grant_line(ask, waited, self.levels(), cost, key))

    def _decided(self, link: WorkerLink, ask: int, cost: int, key: str, task: asyncio.Task[float]) -> None:
        self._pending -= 1
        link.waiting.pop(ask, None)
        if task.cancelled():
            outcome: dict[str, Any] = {"cancelled": True}
        elif isinstance(exc := task.exception(), GatewayError):
            outcome = {"error": [exc.error_type, exc.message, exc.retry_after]}
        elif exc is not None:
            raise exc
        else:
            self._granted(link, ask, cost, key, task.result())
            return
        if not link.writer.is_closing():
            link.send({"id": ask, "state": self.levels(), **outcome})

    def levels(self) -> list[float]:
        """The admission's levels that a worker reads between its own asks (queue positions, ETAs, /status)."""
        a = self.admission
        slots, tokens = self.spare()
        return [a.in_flight - slots, a.queue_depth, a.tokens_in_flight - tokens, a.granted, a.eta(1)]

    def stats(self) -> dict[str, Any]:
        """The admission's state for /status: what is in flight, without the workers' spare slots (shown apart)."""
        slots, tokens = self.spare()
        stats = self.admission.stats()
        stats["in_flight"] = int(stats["in_flight"]) - slots
        stats["tokens_in_flight"] = int(stats["tokens_in_flight"]) - tokens
        return stats | {"spare_slots": slots, "spare_tokens": tokens, "lending": self.lending}

    def _release_all(self, link: WorkerLink) -> None:
        held, link.held = link.held, {}
        link.spare = (0, 0)
        for key, (slots, tokens) in held.items():
            if slots or tokens:
                self.admission.give_back(slots, tokens, key)

    def _gone(self, link: WorkerLink) -> None:
        """A worker's connection closed (it exited or was killed): its waiters cancelled, its slots freed,
        its counters kept."""
        for task in list(link.waiting.values()):
            task.cancel()
        self._release_all(link)
        self.retired.add([f for f in link.last if gateway_series(f[0])], gauges=False)
        if self.links.get(link.index) is link:
            del self.links[link.index]
        self._recalling.discard(link.index)
        self._resume()  # (without its own deferred acquires: it is no longer one of the links)
        self._wake()  # the end of this turn looks whether spare slots may be kept again
        if any(link.tokens.values()):  # its tokens left the engines with it
            self._tokens_moved(link.index)

    async def _snapshot(self, link: WorkerLink, *, light: bool = False) -> None:
        """A worker's admissions and spare slots, and (unless ``light``) its series into ``link.last``; what it said
        last stands if it does not answer in time."""
        ask = next(self._ids)
        future = link.snapshots[ask] = asyncio.get_running_loop().create_future()
        link.send({"op": "series", "id": ask, "light": light})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_SNAPSHOT_TIMEOUT):
                await future
        link.snapshots.pop(ask, None)

    async def merged(self) -> bytes:
        """One scrape for the host: every worker's gateway_* series merged with the dead workers' counters, the
        parent's global gauges (admission, engine up, breakers), GPU and host series, each process's process_*
        and python_* (labelled ``worker``), and the engines' vllm:* series of the parent's fetch."""
        merged = Merged()
        links = list(self.links.values())
        await asyncio.gather(*(self._snapshot(link) for link in links))
        for link in links:
            if self.links.get(link.index) is link:  # one that died meanwhile is in self.retired: counted there
                merged.add(link.last)
        merged.add(self.retired.families())
        own = families(self.host.registry.collect(), "parent")
        merged.put(f for f in own if parents_series(f[0]))
        merged.add([f for f in own if not gateway_series(f[0])])
        await self.host.engines.refresh(self.host.session)
        return merged.exposition() + self.host.engines.exposition()

    async def _metrics(self, link: WorkerLink, ask: int) -> None:
        link.send({"id": ask, "text": (await self.merged()).decode()})

    async def _status(self, link: WorkerLink, ask: int) -> None:
        await asyncio.gather(*(self._snapshot(other, light=True) for other in list(self.links.values())))
        link.send({"id": ask, "workers": self.describe(), "admission": self.stats(), "engine_checks": self.host.rounds})


class ParentLink:
    """A worker's side: its admission (spare slots while the parent lends them, else a slot asked of the parent's
    ``Admission``; the same interface, so the proxy does not know; queue positions and ETAs read from the parent's
    state at its last answer), the parent's engine state and keys reloads as they come, and what its requests
    observed of the engines, sent up."""

    def __init__(self, settings: Settings, index: int) -> None:
        self.max_concurrency = settings.max_concurrency
        self.max_queue = settings.max_queue
        self.queue_timeout = settings.queue_timeout
        self.max_tokens = settings.max_tokens_in_flight
        self.index = index
        # the keys' weights and caps are configured here by Access as in one process; the parent applies them
        self.fair = FairQueue() if settings.api_key or settings.keys_file else None
        self.in_flight = self.queue_depth = self.tokens_in_flight = self.granted = 0
        self._slot_eta = settings.queue_timeout
        self._ids = itertools.count()
        self._answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self.series: Callable[[], list[Family]] = list
        self.engines: dict[str, Any] = {}  # the parent's last engine state
        self.known = asyncio.Event()  # the first one came (the parent sends it as the worker connects)
        self.on_engines: Callable[[dict[str, Any]], None] | None = None
        self.on_keys: Callable[[], None] | None = None
        self.on_tokens: Callable[[dict[str, dict[str, int]]], None] | None = None
        self.tokens: Callable[[], dict[str, int]] = dict  # engine URL -> this worker's tokens in flight there
        self._tokens_due = False
        self._outbox: Outbox | None = None  # what is sent to the parent, written at the end of this turn
        self._wake = AtTurnEnd(self._flush)
        self.keep: tuple[int, int] | None = None  # the spare slots and tokens the parent lets this worker keep
        self.spare = self.spare_tokens = 0  # slots (and their tokens) held from the parent and not in use
        self.admitted = self.from_spare = 0  # requests admitted, and of them those from spare slots
        self._released: deque[float] = deque(maxlen=RATE_WINDOW)  # when it last kept a slot spare
        self.gone = False  # the parent's socket closed: nothing asked of it will be answered
        self.on_stop: Callable[[bool], None] = signal_self  # the parent's word to drain (False) or cut off (True)

    async def connect(self, path: str) -> None:
        reader, self._writer = await asyncio.open_unix_connection(path, limit=_LINE_LIMIT)
        self._outbox = Outbox(self._writer, self._wake)
        self._send({"index": self.index, "pid": os.getpid()})
        self._reader_task = asyncio.create_task(self._read(reader), name="coordination")

    def _send(self, message: dict[str, Any]) -> None:
        self._put(_frame(message))

    def _put(self, frame: bytes) -> None:
        assert self._outbox is not None, "not connected to the parent"
        self._outbox.put(frame)

    def _flush(self) -> None:
        """The end of this turn: its messages (acquires, releases, the tokens if they changed) in one write, one
        system call here and one wake-up of the parent."""
        assert self._outbox is not None, "not connected to the parent"
        if self._tokens_due:
            self._tokens_due = False
            self._outbox.frames.append(_tokens_line(self.tokens()))
        self._outbox.flush()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                if line[:1] == b"g":
                    self._granted(line)
                    continue
                if line[:1] == b"h":
                    self._told("tokens", {"held": _parse_held(line)})
                    continue
                if line[:1] == b"k":
                    _, slots, tokens = line[:-1].split(b" ")
                    self.keep = (int(slots), int(tokens))
                    continue
                if line == _RECALL:
                    self._give_spare_back()
                    continue
                if line in (_DRAIN, _CUT):
                    self.on_stop(line == _CUT)
                    continue
                msg = json.loads(line)
                op = msg.get("op")
                if op == "series":
                    self._send({
                        "op": "series", "id": msg["id"], "families": None if msg["light"] else self.series(),
                        "admitted": self.admitted, "from_spare": self.from_spare,
                        "spare": [self.spare, self.spare_tokens],
                    })  # fmt: skip
                    continue
                if op is not None:
                    self._told(op, msg)
                    continue
                if "state" in msg:
                    self.in_flight, self.queue_depth, self.tokens_in_flight, self.granted, self._slot_eta = msg["state"]
                future = self._answers.pop(msg["id"], None)
                if future is not None and not future.done():
                    future.set_result(msg)
        except ConnectionError:
            pass
        log.error("the parent's coordination socket closed: draining this worker")
        self.gone, self.keep = True, None
        answers, self._answers = self._answers, {}
        for future in answers.values():  # acquires queued there, scrapes: refused now, not at the drain's end
            if not future.done():
                future.set_exception(_orphaned())
        self.on_stop(False)

    def _give_spare_back(self) -> None:
        """The parent calls the spare slots back (a request somewhere does not fit): all of them go, and every
        request asks the parent until it says they may be kept again."""
        self.keep = None
        self._put(_spare_line(self.spare, self.spare_tokens, self._released))
        self._released.clear()
        self.spare = self.spare_tokens = 0

    def _granted(self, line: bytes) -> None:
        """The parent's answer to an acquire: a slot, and the admission's levels (see ``_grant_line``)."""
        _, ask, waited, in_flight, queue_depth, tokens, granted, eta, cost, key = line[:-1].split(b" ")
        self.in_flight, self.queue_depth, self.tokens_in_flight = int(in_flight), int(queue_depth), int(tokens)
        self.granted, self._slot_eta = int(granted), float(eta)
        future = self._answers.pop(int(ask), None)
        if future is not None and not future.done():
            future.set_result({"waited": float(waited)})
        else:  # granted after this worker gave up waiting: released (kept spare, or handed back)
            self.release(int(cost), key.decode())

    def _told(self, op: str, msg: dict[str, Any]) -> None:
        """The parent's news: the engines' state, the other workers' tokens at them, or the keys file to read."""
        try:
            if op == "engines":
                self.engines = msg
                if self.on_engines is not None:
                    self.on_engines(msg)
                self.known.set()
            elif op == "tokens" and self.on_tokens is not None:
                self.on_tokens(msg["held"])
            elif op == "keys" and self.on_keys is not None:
                self.on_keys()
        except Exception:  # a bug here must not cut this worker off its parent
            log.exception("applying the parent's %s failed", op)

    def observed(self, upstream: Upstream, event: str, reason: str = "", *, down: bool = False) -> None:
        """What a request met at an engine, for the parent's breaker (and its view of the engine being up)."""
        self._send({"op": "observed", "url": upstream.url, "event": event, "reason": reason, "down": down})

    def held(self) -> None:
        """This worker's tokens in flight to an engine changed: the parent hears it (once for the changes of this
        moment) and tells the other workers."""
        self._tokens_due = True
        self._wake()

    async def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        if self.gone:
            raise _orphaned()
        ask = message["id"] = next(self._ids)
        future = self._answers[ask] = asyncio.get_running_loop().create_future()
        self._send(message)
        return await future

    async def acquire(self, cost: int, key: str = "") -> float:
        """A spare slot when there is one with the tokens (no message, no wait), else the parent's grant."""
        if self.spare and cost <= self.spare_tokens:  # (spare only while the parent lets them be kept)
            self.spare -= 1
            self.spare_tokens -= cost
            self.admitted += 1
            self.from_spare += 1
            return 0.0
        if self.gone:
            raise _orphaned()
        ask = next(self._ids)
        future = self._answers[ask] = asyncio.get_running_loop().create_future()
        self._put(_acquire_line(ask, cost, key))
        try:
            answer = await future
        except BaseException:
            self._answers.pop(ask, None)  # a grant still on its way is handed back by _read
            self._send({"op": "cancel", "id": ask})
            raise
        if "error" in answer:
            error_type, message, retry_after = answer["error"]
            raise GatewayError(error_type, message, retry_after=retry_after)
        self.admitted += 1
        return float(answer["waited"])

    def release(self, cost: int, key: str = "") -> None:
        """The slot kept spare while the parent lets this worker keep it (within the bounds), else handed back."""
        keep = self.keep
        if keep is not None and self.spare < keep[0] and self.spare_tokens + cost <= keep[1]:
            self.spare += 1
            self.spare_tokens += cost
            self._released.append(time.monotonic())
            return
        self._put(_release_line(cost, key))

    def retry_after(self) -> float:
        return self.eta(self.queue_depth + 1)

    def position(self, ahead: int, granted: int) -> int:
        return max(1, ahead + 1 - (self.granted - granted))

    def eta(self, backlog: int) -> float:
        return backlog * self._slot_eta

    def stats(self) -> dict[str, int | float]:
        return {
            "in_flight": self.in_flight,
            "max_concurrency": self.max_concurrency,
            "queue_depth": self.queue_depth,
            "max_queue": self.max_queue,
            "tokens_in_flight": self.tokens_in_flight,
            "max_tokens_in_flight": self.max_tokens,
            "retry_after_s": math.ceil(self.retry_after()),
        }

    async def status(self) -> dict[str, Any]:
        return await self._ask({"op": "status"})

    async def metrics(self) -> bytes:
        return (await self._ask({"op": "metrics"}))["text"].encode()

    def final(self) -> None:
        """The series of a worker about to exit, so that its counters outlive it."""
        if self._writer is not None and not self._writer.is_closing():
            self._send({"op": "final", "families": self.series()})

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._flush()  # the final series
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
