"""``GET /v1/models`` in front of several engines: the union of the ready engines' models, from their checks."""

from __future__ import annotations

import json

from aiohttp import web

from gateway.errors import REQUEST_ID
from gateway.exchange import Exchange
from gateway.proxy import Proxy
from gateway.upstreams import UpstreamPool


class ModelList:
    """Answers GET /v1/models from the cards the health checks read (each as its engine sent it, with its
    ``max_model_len``); other methods, and any time no engine is ready, go to an engine as before."""

    def __init__(self, proxy: Proxy, pool: UpstreamPool) -> None:
        self.proxy = proxy
        self.pool = pool

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD") or not self.pool.cards():
            return await self.proxy.handle(request)
        return await self.proxy.serve(request, self._answer)  # counted as endpoint "models", access-logged

    async def _answer(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        if self.proxy.access is not None:  # vLLM 0.33 guards /v1/models with its key: so does the gateway
            self.proxy.access.authenticate(request, ex)
        body = json.dumps({"object": "list", "data": self.pool.cards()}).encode() + b"\n"
        ex.status, ex.bytes_out = 200, len(body)
        return web.Response(body=body, content_type="application/json", headers={REQUEST_ID: ex.request_id})
