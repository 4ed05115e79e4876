"""The floor: the least an aiohttp proxy can do, the gateway's own server set-up and engine client and nothing else.

No body parsing, admission, metrics or header filtering: what this adds over direct access is what
aiohttp's server, the event loop, the engine client and the extra hop cost, and no gateway built on them
can add less.  It passes a request id, as the gateway does, so the engine does the same work behind both.
``python -m bench.floor --port P --upstream URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools

import uvloop
from aiohttp import web

from gateway.app import make_runner
from gateway.client import EngineClient

_PASSED = ("Content-Type",)


def app(upstream: str) -> web.Application:
    client = EngineClient(connect_timeout=10, read_timeout=600)
    ids = itertools.count()

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        headers = [(name, request.headers[name]) for name in _PASSED if name in request.headers]
        headers.append(("X-Request-Id", f"floor-{next(ids)}"))
        resp = await client.request(upstream, request.method, request.raw_path, headers, body)
        data = await resp.read()
        resp.release()
        headers = [(name, resp.headers[name]) for name in _PASSED if name in resp.headers]
        return web.Response(status=resp.status, body=data, headers=headers)

    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", forward)
    return application


async def serve(port: int, upstream: str) -> None:
    runner = make_runner(app(upstream))  # the gateway's own AppRunner options
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    ns = parser.parse_args()
    uvloop.run(serve(ns.port, ns.upstream))


if __name__ == "__main__":
    main()
