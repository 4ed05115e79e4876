"""The cross-worker coordination of ``--workers N``: the parent's admission authority and metrics merge, served
over a Unix socket, and the workers' client of it (``RemoteAdmission``, the ``Admission`` interface)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import signal
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from gateway.access.keys import KeyRing
from gateway.admission import Admission
from gateway.errors import GatewayError
from gateway.fair import FairQueue
from gateway.settings import Settings

log = logging.getLogger("gateway.workers")

_SNAPSHOT_TIMEOUT = 2.0  # seconds a worker has to send its series for a scrape; its last ones count after
_LINE_LIMIT = 1 << 28  # bytes of one message: a worker's series, the merged exposition
_WATCH_INTERVAL = 1.0  # seconds between looks at the keys file (as each worker's own watch)
# gauges that the parent's admission answers for all workers together
_AUTHORITY = frozenset(
    ("gateway_requests_in_flight", "gateway_queue_depth", "gateway_tokens_in_flight",
     "gateway_key_requests_in_flight", "gateway_key_queue_depth")
)  # fmt: skip
_SUMMED_GAUGES = frozenset(("gateway_client_connections", "gateway_upstream_requests_in_flight"))
_ADDITIVE = frozenset(("counter", "histogram", "summary"))

# One family: (name, type, documentation, [(sample name, labels, value)])
Family = tuple[str, str, str, list[tuple[str, dict[str, str], float]]]


def families(collected: Iterable[Metric], keep: Callable[[str], bool]) -> list[Family]:
    """The families of a registry's ``collect()`` that ``keep`` names, as plain data for the wire."""
    return [
        (m.name, m.type, m.documentation, [(s.name, s.labels, s.value) for s in m.samples])
        for m in collected
        if keep(m.name)
    ]


def gateway_series(name: str) -> bool:
    return name.startswith("gateway_")


class Merged:
    """The gateway_* series of every worker: counters and histograms summed, gauges summed or the largest."""

    def __init__(self) -> None:
        self.meta: dict[str, tuple[str, str]] = {}
        self.values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}

    def add(self, fams: Iterable[Family], *, gauges: bool = True) -> None:
        for name, kind, doc, samples in fams:
            if name in _AUTHORITY or (not gauges and kind not in _ADDITIVE):
                continue
            self.meta.setdefault(name, (kind, doc))
            values = self.values.setdefault(name, {})
            summed = kind in _ADDITIVE or name in _SUMMED_GAUGES
            for sample, labels, value in samples:
                key = (sample, tuple(sorted(labels.items())))
                old = values.get(key)
                if old is None:
                    values[key] = value
                elif summed:
                    values[key] = old + value
                elif not math.isnan(value) and (math.isnan(old) or value > old):
                    values[key] = value

    def set(self, name: str, kind: str, doc: str, samples: Iterable[tuple[dict[str, str], float]]) -> None:
        self.meta[name] = (kind, doc)
        self.values[name] = {(name, tuple(sorted(labels.items()))): value for labels, value in samples}

    def families(self) -> list[Family]:
        return [
            (name, kind, doc, [(s, dict(labels), v) for (s, labels), v in self.values[name].items()])
            for name, (kind, doc) in self.meta.items()
        ]

    def collect(self) -> Iterable[Metric]:
        for name, (kind, doc) in self.meta.items():
            metric = Metric(name, doc, kind)
            for (sample, labels), value in self.values[name].items():
                metric.add_sample(sample, dict(labels), value)
            yield metric

    def exposition(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)  # type: ignore[arg-type]
        return generate_latest(registry)


def _frame(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


@dataclass
class WorkerLink:
    """One worker's connection to the parent: what it holds and waits for, for a clean-up when it dies."""

    index: int
    pid: int
    writer: asyncio.StreamWriter
    admitted: int = 0  # slots granted to it: how much it has served
    held: Counter[tuple[int, str]] = field(default_factory=Counter)
    waiting: dict[int, asyncio.Task[float]] = field(default_factory=dict)
    snapshots: dict[int, asyncio.Future[list[Family]]] = field(default_factory=dict)
    last: list[Family] = field(default_factory=list)  # its series at the last scrape

    def send(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(_frame(message))


class Authority:
    """The parent's side: the one ``Admission`` of all workers, and the merge of their series."""

    def __init__(
        self, settings: Settings, describe: Callable[[], list[dict[str, Any]]], connected: Callable[[int], None]
    ) -> None:
        self.settings = settings
        self.ring = KeyRing.from_settings(settings.api_key, settings.keys_file)
        self.admission = Admission(
            settings.max_concurrency, settings.max_queue, settings.queue_timeout, settings.max_tokens_in_flight,
            fair=self.ring is not None,
        )  # fmt: skip
        self.describe = describe  # the supervisor's view of its workers, for /status
        self.connected = connected  # told each worker's index when it connects
        self.links: dict[int, WorkerLink] = {}
        self.retired = Merged()  # the counters of workers that died, so that no total goes backwards
        self._ids = itertools.count()
        self._scrapes: set[asyncio.Future[None]] = set()
        self.configure()

    def configure(self) -> None:
        """The keys' fair-queue weights and caps, from the keys file (again on SIGHUP or change)."""
        fair = self.admission.fair
        if self.ring is None or fair is None:
            return
        for key in self.ring.keys.values():
            fair.configure(key.name, key.weight, key.max_concurrency)

    def reload(self) -> None:
        if self.ring is not None:
            self.ring.reload()
            self.configure()

    async def watch_keys(self) -> None:
        while self.ring is not None and self.ring.path:
            await asyncio.sleep(_WATCH_INTERVAL)
            if self.ring.changed():
                self.reload()

    async def serve(self, path: str) -> asyncio.AbstractServer:
        return await asyncio.start_unix_server(self._connection, path, limit=_LINE_LIMIT)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = json.loads(await reader.readline())
        link = WorkerLink(hello["index"], hello["pid"], writer)
        self.links[link.index] = link
        self.connected(link.index)
        try:
            while line := await reader.readline():
                self._handle(link, json.loads(line))
        except (ConnectionError, ValueError) as exc:
            log.warning("worker %d: coordination connection broken: %s", link.index, exc)
        finally:
            self._gone(link)
            writer.close()

    def _handle(self, link: WorkerLink, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "acquire":
            task = asyncio.ensure_future(self.admission.acquire(msg["cost"], msg["key"]))
            link.waiting[msg["id"]] = task
            task.add_done_callback(lambda t, m=msg: self._decided(link, m, t))
        elif op == "release":
            grant = (msg["cost"], msg["key"])
            link.held[grant] -= 1
            if not link.held[grant]:
                del link.held[grant]
            self.admission.release(*grant)
        elif op == "cancel":
            task = link.waiting.get(msg["id"])
            if task is not None:
                task.cancel()  # a grant at this moment is handed on by Admission itself
        elif op == "series":
            future = link.snapshots.pop(msg["id"], None)
            if future is not None and not future.done():
                future.set_result(msg["families"])
        elif op == "metrics":
            task = asyncio.ensure_future(self._metrics(link, msg["id"]))
            self._scrapes.add(task)
            task.add_done_callback(self._scrapes.discard)
        elif op == "status":
            link.send({"id": msg["id"], "workers": self.describe(), "admission": self.admission.stats()})
        elif op == "final":  # a worker that drained: its last series, before it exits
            link.last = msg["families"]

    def _decided(self, link: WorkerLink, msg: dict[str, Any], task: asyncio.Task[float]) -> None:
        link.waiting.pop(msg["id"], None)
        reply: dict[str, Any] = {"id": msg["id"], "state": self.state()}
        if task.cancelled():
            reply["cancelled"] = True
        elif isinstance(exc := task.exception(), GatewayError):
            reply["error"] = [exc.error_type, exc.message, exc.retry_after]
        elif exc is not None:
            raise exc
        else:
            link.admitted += 1
            link.held[(msg["cost"], msg["key"])] += 1
            reply |= {"waited": task.result(), "cost": msg["cost"], "key": msg["key"]}
        if link.writer.is_closing():
            if "waited" in reply:  # granted to a worker that is gone: hand it on
                self._release_all(link)
            return
        link.send(reply)

    def state(self) -> list[float]:
        a = self.admission
        return [a.in_flight, a.queue_depth, a.tokens_in_flight, a.granted, a.eta(1)]

    def _release_all(self, link: WorkerLink) -> None:
        for (cost, key), count in list(link.held.items()):
            for _ in range(count):
                self.admission.release(cost, key)
        link.held.clear()

    def _gone(self, link: WorkerLink) -> None:
        """A worker's connection closed (it exited or was killed): its waiters cancelled, its slots freed,
        its counters kept."""
        for task in list(link.waiting.values()):
            task.cancel()
        self._release_all(link)
        self.retired.add(link.last, gauges=False)
        if self.links.get(link.index) is link:
            del self.links[link.index]

    async def _snapshot(self, link: WorkerLink) -> list[Family]:
        ask = next(self._ids)
        future = link.snapshots[ask] = asyncio.get_running_loop().create_future()
        link.send({"op": "series", "id": ask})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_SNAPSHOT_TIMEOUT):
                link.last = await future
        link.snapshots.pop(ask, None)
        return link.last

    async def merged(self) -> bytes:
        """Every worker's gateway_* series merged, the dead workers' counters, and the global state gauges."""
        merged = Merged()
        for fams in await asyncio.gather(*(self._snapshot(link) for link in list(self.links.values()))):
            merged.add(fams)
        merged.add(self.retired.families())
        a = self.admission
        merged.set("gateway_requests_in_flight", "gauge", "Requests forwarded and not finished.", [({}, a.in_flight)])
        merged.set("gateway_queue_depth", "gauge", "Requests waiting for a slot.", [({}, a.queue_depth)])
        merged.set(
            "gateway_tokens_in_flight", "gauge", "Estimated tokens (prompt + max_tokens) forwarded.",
            [({}, a.tokens_in_flight)],
        )  # fmt: skip
        if a.fair is not None and self.ring is not None:
            tenants = [a.fair.tenant(name) for name in self.ring.names()]
            merged.set(
                "gateway_key_requests_in_flight", "gauge", "Requests forwarded per API key.",
                [({"key": t.name}, t.in_flight) for t in tenants],
            )  # fmt: skip
            merged.set(
                "gateway_key_queue_depth", "gauge", "Requests waiting for a slot per API key.",
                [({"key": t.name}, len(t.waiters)) for t in tenants],
            )  # fmt: skip
        return merged.exposition()

    async def _metrics(self, link: WorkerLink, ask: int) -> None:
        link.send({"id": ask, "text": (await self.merged()).decode()})


class RemoteAdmission:
    """A worker's admission: every slot asked of the parent's ``Admission``; the same interface, so the proxy
    does not know.  Queue positions and ETAs are read from the parent's state at its last answer."""

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

    async def connect(self, path: str) -> None:
        reader, self._writer = await asyncio.open_unix_connection(path, limit=_LINE_LIMIT)
        self._send({"index": self.index, "pid": os.getpid()})
        self._reader_task = asyncio.create_task(self._read(reader), name="coordination")

    def _send(self, message: dict[str, Any]) -> None:
        assert self._writer is not None, "not connected to the parent"
        self._writer.write(_frame(message))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                msg = json.loads(line)
                if msg.get("op") == "series":
                    self._send({"op": "series", "id": msg["id"], "families": self.series()})
                    continue
                if "state" in msg:
                    self.in_flight, self.queue_depth, self.tokens_in_flight, self.granted, self._slot_eta = msg["state"]
                future = self._answers.pop(msg["id"], None)
                if future is not None and not future.done():
                    future.set_result(msg)
                elif "waited" in msg:  # granted after this worker gave up waiting: hand it back
                    self._send({"op": "release", "cost": msg["cost"], "key": msg["key"]})
        except ConnectionError:
            pass
        log.error("the parent's coordination socket closed: draining this worker")
        os.kill(os.getpid(), signal.SIGTERM)

    async def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        ask = message["id"] = next(self._ids)
        future = self._answers[ask] = asyncio.get_running_loop().create_future()
        self._send(message)
        return await future

    async def acquire(self, cost: int, key: str = "") -> float:
        ask = next(self._ids)
        future = self._answers[ask] = asyncio.get_running_loop().create_future()
        self._send({"op": "acquire", "id": ask, "cost": cost, "key": key})
        try:
            answer = await future
        except BaseException:
            self._answers.pop(ask, None)  # a grant still on its way is handed back by _read
            self._send({"op": "cancel", "id": ask})
            raise
        if "error" in answer:
            error_type, message, retry_after = answer["error"]
            raise GatewayError(error_type, message, retry_after=retry_after)
        return float(answer["waited"])

    def release(self, cost: int, key: str = "") -> None:
        self._send({"op": "release", "cost": cost, "key": key})

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
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
