"""DNS discovery: each address of an ``--upstream`` given by a DNS name is an engine, re-resolved every interval."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

from gateway.metrics.gateway import GatewayMetrics
from gateway.settings import Settings, UpstreamSpec, parse_dns_server, parse_upstream, redact

log = logging.getLogger("gateway.discovery")

TIMEOUT = 5.0  # seconds one resolution of one name may take (dnspython's own default lifetime)
OK, NO_ADDRESS, ERROR = "ok", "no_address", "error"  # gateway_dns_resolutions_total{result}
ADDED, REMOVED = "added", "removed"  # gateway_upstream_changes_total{change}
_NO_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}

Resolve = Callable[[str], Awaitable[list[str]]]  # a host name -> its addresses; raises Unresolved


class Unresolved(Exception):
    """The resolver gave no answer (timeout, server failure): not the same as a name without addresses."""


def _literal(spec: UpstreamSpec) -> bool:
    """Whether the upstream's host is an IP address."""
    try:
        ipaddress.ip_address(urlsplit(spec.url).hostname or "")
    except ValueError:
        return False
    return True


def named(spec: UpstreamSpec) -> bool:
    """An ``http://`` upstream whose host is a DNS name.  An ``https://`` one stays one engine: its certificate
    names the host, not each address."""
    return urlsplit(spec.url).scheme == "http" and not _literal(spec)


def expand(spec: UpstreamSpec, addresses: Sequence[str]) -> list[UpstreamSpec]:
    """One engine per address: the URL with the address for the host, named ``NAME@ADDRESS:PORT`` (NAME: the
    upstream's given name, else its host), with the upstream's weight."""
    parts = urlsplit(spec.url)
    base = spec.name if spec.name != redact(spec.url) else str(parts.hostname)
    userinfo = parts.netloc.rpartition("@")[0]
    port = parts.port or 80
    out = []
    for address in addresses:
        host = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        netloc = f"{userinfo}@{host}" if userinfo else host
        url = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        out.append(UpstreamSpec(url, f"{base}@{host}", spec.weight))
    return out


def one_family(addresses: Sequence[str]) -> list[str]:
    """The IPv4 addresses, else the IPv6 ones, each once, in order: a dual-stack engine is one engine."""
    ips = sorted({ipaddress.ip_address(a) for a in addresses}, key=lambda ip: (ip.version, ip))
    v4 = [str(ip) for ip in ips if ip.version == 4]
    return v4 or [str(ip) for ip in ips]


async def system_resolve(host: str) -> list[str]:
    """The system resolver's addresses (``getaddrinfo``: /etc/hosts, resolv.conf's servers and search list)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in _NO_NAME:
            return []
        raise Unresolved(exc.strerror or str(exc)) from None
    return one_family([str(info[4][0]) for info in infos])


def server_resolve(address: str, port: int) -> Resolve:
    """Ask the DNS server at ``address:port`` for A records, else AAAA (dnspython, ``glm-gateway[dns]``); the
    name is taken as absolute: give it whole (``vllm.ns.svc.cluster.local``)."""
    import dns.asyncresolver
    import dns.exception
    import dns.resolver

    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [address]
    resolver.port = port
    resolver.lifetime = TIMEOUT

    async def resolve(host: str) -> list[str]:
        for rdtype in ("A", "AAAA"):
            try:
                answer = await resolver.resolve(host, rdtype, search=False)
            except dns.resolver.NoAnswer:
                continue
            except dns.resolver.NXDOMAIN:
                return []
            except dns.exception.DNSException as exc:
                raise Unresolved(str(exc)) from None
            return one_family([rdata.address for rdata in answer])
        return []

    return resolve


class Discovery:
    """Resolves the ``--upstream`` DNS names every ``--dns-interval`` seconds and hands the whole engine list to
    ``apply`` when it changed.  Until a name's first good resolution the name itself is its engine (resolved per
    connection); a failed resolution, or one without addresses, keeps the name's last engines."""

    def __init__(
        self,
        specs: list[UpstreamSpec],
        interval: float,
        resolve: Resolve,
        apply: Callable[[list[UpstreamSpec]], None],
        metrics: GatewayMetrics,
    ) -> None:
        self.specs = specs
        self.interval = interval
        self.resolve = resolve
        self.apply = apply
        self.metrics = metrics
        self.known = [[spec] for spec in specs]  # each upstream's engines as last resolved
        self.applied = list(specs)
        self._failing: dict[int, str] = {}  # upstream index -> its last resolution's failed result (logged once)
        for result in (OK, NO_ADDRESS, ERROR):
            metrics.child(metrics.dns_resolutions, result)
        for change in (ADDED, REMOVED):
            metrics.child(metrics.upstream_changes, change)

    @classmethod
    def of(
        cls, settings: Settings, apply: Callable[[list[UpstreamSpec]], None], metrics: GatewayMetrics
    ) -> Discovery | None:
        """The discovery the settings ask for; None with --dns-interval 0 or when no upstream is a DNS name."""
        specs = [parse_upstream(text) for text in settings.upstream]
        if not settings.dns_interval or not any(map(named, specs)):
            return None
        for spec in specs:
            if urlsplit(spec.url).scheme == "https" and not _literal(spec):
                log.info("upstream %s is https: one engine, resolved per connection (not expanded)", spec.name)
        resolve = server_resolve(*parse_dns_server(settings.dns_server)) if settings.dns_server else system_resolve
        return cls(specs, settings.dns_interval, resolve, apply, metrics)

    async def run(self) -> None:
        """Resolve again every interval (the first resolution, before serving, is the caller's ``refresh``)."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception:  # a bug here must not stop discovery for good
                log.exception("DNS discovery round failed")

    async def refresh(self) -> None:
        """Resolve every name once, together; apply the engines when they changed."""
        indexes = [i for i, spec in enumerate(self.specs) if named(spec)]
        found = await asyncio.gather(*(self._resolve(i) for i in indexes))
        for i, engines in zip(indexes, found, strict=True):
            if engines is not None:
                self.known[i] = engines
        engines = [spec for known in self.known for spec in known]
        if engines == self.applied:
            return
        before, after = {s.url for s in self.applied}, {s.url for s in engines}
        m = self.metrics
        m.child(m.upstream_changes, ADDED).inc(len(after - before))
        m.child(m.upstream_changes, REMOVED).inc(len(before - after))
        self.applied = engines
        self.apply(engines)

    async def _resolve(self, i: int) -> list[UpstreamSpec] | None:
        """The upstream's engines from a fresh resolution; None when it failed (counted, logged once)."""
        spec, host = self.specs[i], str(urlsplit(self.specs[i].url).hostname)
        try:
            async with asyncio.timeout(TIMEOUT):
                addresses = await self.resolve(host)
            result, why = (OK, "") if addresses else (NO_ADDRESS, "no A or AAAA record")
        except Unresolved as exc:
            result, why = ERROR, str(exc)
        except TimeoutError:
            result, why = ERROR, f"no answer within {TIMEOUT:g} s"
        self.metrics.child(self.metrics.dns_resolutions, result).inc()
        if result != OK:
            if self._failing.get(i) != result:
                kept = ", ".join(s.name for s in self.known[i])
                log.warning("DNS name %s did not resolve (%s): its engines stay %s", host, why, kept)
            self._failing[i] = result
            return None
        if self._failing.pop(i, None) is not None:
            log.info("DNS name %s resolves again", host)
        engines = expand(spec, addresses)
        if [s.url for s in engines] != [s.url for s in self.known[i]]:
            log.info("DNS name %s: %d engines, at %s", host, len(addresses), ", ".join(addresses))
        return engines
