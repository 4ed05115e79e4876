"""The access log: one line per finished request, as logfmt text or JSON, written by a thread of its own."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import sys
import threading
from collections.abc import AsyncIterator
from queue import Empty, SimpleQueue
from typing import TextIO

from aiohttp import web

from gateway.exchange import Exchange
from gateway.logs import utc

FIELDS = (
    "time", "request_id", "client", "method", "path", "model", "status", "error_type", "upstream", "queue_wait",
    "first_byte", "ttft", "duration", "prompt_tokens", "completion_tokens", "bytes_in", "bytes_out", "key",
)  # fmt: skip
_MAX_PENDING = 100_000  # lines waiting for a stuck output; beyond it lines are dropped and counted
_PIPE_BUF = 4096  # bytes a write to a pipe delivers whole (POSIX's minimum, Linux's value)
_BATCH_S = 0.05  # seconds a line may wait on the loop before it is handed to the writer thread
_SAFE = re.compile(r"[\w.:/@+=,-]*")  # shown bare in text; anything else is quoted as a JSON string


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


@functools.lru_cache(maxsize=4096)  # models, engines, keys and paths repeat: checked once each
def _bare(value: str) -> str:
    """A text value that a space, a quote or a control character in it cannot split or forge."""
    if not value:
        return "-"
    return value if _SAFE.fullmatch(value) else json.dumps(value, ensure_ascii=False)


def _shown(value: object) -> str:
    return "-" if value is None else str(value)


def _fixed(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.6f}"  # never 7e-05


def fields(ex: Exchange) -> dict[str, object]:
    """What one request's line says, in FIELDS order; None where it does not apply (no model, no TTFT)."""
    return {
        "time": utc(ex.wall),
        "request_id": ex.request_id,
        "client": ex.client or None,
        "method": ex.method,
        "path": ex.path,
        "model": ex.model or None,
        "status": ex.status,
        "error_type": ex.error_type,
        "upstream": ex.upstream or None,
        "queue_wait": _seconds(ex.queue_wait),
        "first_byte": _seconds(ex.first_byte),
        "ttft": _seconds(ex.ttft),
        "duration": _seconds(ex.duration),
        "prompt_tokens": ex.prompt_tokens,
        "completion_tokens": ex.completion_tokens,
        "bytes_in": ex.bytes_in,
        "bytes_out": ex.bytes_out,
        "key": ex.key,
    }


def json_line(ex: Exchange) -> str:
    return json.dumps(fields(ex), ensure_ascii=False) + "\n"


def text_line(ex: Exchange) -> str:
    """logfmt: ``key=value`` pairs, ``-`` for what does not apply."""
    return (
        # the request id is of a safe alphabet (gateway.headers), the client an address: neither needs quoting
        f"time={utc(ex.wall)} request_id={ex.request_id} client={ex.client or '-'} method={ex.method} "
        f"path={_bare(ex.path)} model={_bare(ex.model)} status={ex.status} error_type={_shown(ex.error_type)} "
        f"upstream={_bare(ex.upstream)} queue_wait={_fixed(ex.queue_wait)} first_byte={_fixed(ex.first_byte)} "
        f"ttft={_fixed(ex.ttft)} duration={_fixed(ex.duration)} prompt_tokens={_shown(ex.prompt_tokens)} "
        f"completion_tokens={_shown(ex.completion_tokens)} bytes_in={ex.bytes_in} bytes_out={ex.bytes_out} "
        f"key={_bare(ex.key)}\n"
    )


def _blocks(lines: list[str]) -> list[str]:
    """Whole lines joined into blocks of at most PIPE_BUF bytes (a longer line is a block of its own): each is
    written at once, so lines of several processes writing to one pipe (``--workers``) interleave, never mix."""
    blocks, block, size = [], [], 0
    for line in lines:
        length = len(line.encode()) if not line.isascii() else len(line)
        if block and size + length > _PIPE_BUF:
            blocks.append("".join(block))
            block, size = [], 0
        block.append(line)
        size += length
    if block:
        blocks.append("".join(block))
    return blocks


class AccessLog:
    """Called with each finished request (``Proxy.on_finish``): the line is made on the loop and handed to a
    writer thread, so a slow or blocked output never stalls a request.  Lines are handed over in batches, at
    most ``_BATCH_S`` after their request ended: waking the thread for each line cost more than writing it."""

    def __init__(self, fmt: str, stream: TextIO | None = None) -> None:
        self.line = json_line if fmt == "json" else text_line
        self.stream = stream  # None: the process's stdout at the time of writing
        self.dropped = 0
        self.made = self.written = 0  # lines: each counter is only ever added to by one thread
        self._batch: list[str] = []
        self._flush: asyncio.TimerHandle | None = None
        self._queue: SimpleQueue[list[str] | None] = SimpleQueue()

    def __call__(self, ex: Exchange) -> None:
        if self.made - self.written >= _MAX_PENDING:
            self.dropped += 1
            return
        self.made += 1
        self._batch.append(self.line(ex))
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(_BATCH_S, self._hand_over)

    def _hand_over(self) -> None:
        self._flush = None
        if self._batch:
            self._queue.put(self._batch)
            self._batch = []

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: the writer runs as long as the app, and writes every line before it ends."""
        writer = threading.Thread(target=self._write, name="access-log", daemon=True)
        writer.start()
        yield
        if self._flush is not None:
            self._flush.cancel()
        self._hand_over()
        self._queue.put(None)
        await asyncio.to_thread(writer.join, 5.0)

    def _write(self) -> None:
        """Block for a batch, then take every batch waiting and write them in one go."""
        reported = 0
        while True:
            batch = self._queue.get()
            lines: list[str] = []
            while batch is not None:
                lines += batch
                try:
                    batch = self._queue.get_nowait()
                except Empty:
                    break
            count = len(lines)
            if self.dropped > reported:
                lines.append(f"access log: {self.dropped - reported} lines dropped, the output did not keep up\n")
                reported = self.dropped
            stream = self.stream or sys.stdout
            try:
                for block in _blocks(lines):
                    stream.write(block)
                    stream.flush()  # one write(2) per block: atomic on a pipe, so workers' lines never mix
            except (OSError, ValueError):  # the output is gone (closed pipe): the requests go on
                pass
            self.written += count
            if batch is None:
                return
