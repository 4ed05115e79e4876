"""The spliced stream's per-read path in C (gateway/_splice.c): whole chunks of token events, engine to client."""

import asyncio
from collections.abc import Callable

from gateway.metrics.histogram import HistogramChild

class Splice:
    events: int
    written: int
    last: float
    active: int

    def __init__(
        self,
        out: asyncio.Transport,
        owner: asyncio.Protocol,
        back: Callable[[bytes | None], None],
        loop: asyncio.AbstractEventLoop,
        itl: HistogramChild,
    ) -> None: ...
    def arm(self, last: float) -> None: ...
    def close(self) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def eof_received(self) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
