"""What crosses the hop to the engine and back: hop-by-hop headers dropped, forwarding headers set, request ids."""

from __future__ import annotations

import itertools
import re
import uuid

from aiohttp import web
from multidict import CIMultiDictProxy

from gateway.errors import REQUEST_ID

# Request ids made here: a random prefix per process and a counter, unique without a syscall per request.
_ID_PREFIX = uuid.uuid4().hex[:16] + "-"
_ids = itertools.count(1)
# A client's request id is kept when it is short and plain (it goes into logs and the engine's ids)
_SAFE_ID = re.compile(r"[A-Za-z0-9._:+=@/-]{1,200}")

# RFC 9110 §7.6.1, plus what each hop sets itself, and the request id the gateway sets
HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
     "trailer", "transfer-encoding", "upgrade", "host", "content-length", "expect", REQUEST_ID.lower())
)  # fmt: skip
# towards the engine also: the forwarding header the gateway rewrites, the encoding of a body it inflated,
# and the client's cookies, which are no business of an engine
NOT_FORWARDED = HOP_BY_HOP | {"x-forwarded-for", "content-encoding", "cookie"}
_IDENTITY = ("Accept-Encoding", "identity")  # the relay reads SSE events and usage counts: no compression
_NOT_FORWARDED_AND_ENCODING = NOT_FORWARDED | {"accept-encoding"}
# with API keys the client's key is the gateway's business, never the engine's
_CREDENTIALS = frozenset(("authorization", "x-api-key"))
_DROPPED = {  # (generation, keyed) -> what the engine does not get
    (False, False): NOT_FORWARDED,
    (True, False): _NOT_FORWARDED_AND_ENCODING,
    (False, True): NOT_FORWARDED | _CREDENTIALS,
    (True, True): _NOT_FORWARDED_AND_ENCODING | _CREDENTIALS,
}


def request_id(request: web.Request) -> str:
    """The client's X-Request-Id when it is safe to log and pass on, else a new one."""
    given = request.headers.get(REQUEST_ID)
    if given is not None and _SAFE_ID.fullmatch(given):
        return given
    return f"{_ID_PREFIX}{next(_ids):x}"


def filter_headers(
    headers: CIMultiDictProxy[str], rid: str, *extra: tuple[str, str], drop: frozenset[str] = HOP_BY_HOP
) -> list[tuple[str, str]]:
    """Drop hop-by-hop headers (``drop``), those named in any Connection header too, and set the request id."""
    if "Connection" in headers:
        drop = drop | {name.strip().lower() for value in headers.getall("Connection") for name in value.split(",")}
    out = [(name, value) for name, value in headers.items() if name.lower() not in drop]
    out.append((REQUEST_ID, rid))
    out.extend(extra)
    return out


def to_engine(request: web.Request, rid: str, *, generation: bool, keyed: bool) -> list[tuple[str, str]]:
    """The headers the engine gets: without the client's key when the gateway checks keys (``keyed``); a
    generation's answer uncompressed (the relay reads its events)."""
    peer = request.remote or "unknown"
    prior = ", ".join(request.headers.getall("X-Forwarded-For", ()))
    forwarded = ("X-Forwarded-For", f"{prior}, {peer}" if prior else peer)  # as nginx's $proxy_add_x_forwarded_for
    drop = _DROPPED[generation, keyed]
    if generation:
        return filter_headers(request.headers, rid, _IDENTITY, forwarded, drop=drop)
    return filter_headers(request.headers, rid, forwarded, drop=drop)
