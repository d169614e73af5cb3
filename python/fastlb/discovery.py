"""Backends from DNS (CONTRACT.md `resolve`, `srv`, `[runtime].resolvers`; docs/discovery.md).

A pool backend whose address is a host name stands for every A and AAAA address the name has;
a pool with `srv = "_http._tcp.name"` for every SRV target (its port, its weight; targets of a
lower-priority record are backups). Each such pool is looked up again every `resolve.interval`,
sooner when the answer's TTL is shorter, through `[runtime].resolvers` (dnspython: UDP, and TCP
when an answer comes truncated).

What changes reaches the engine as a new config in which those backends are IP literals, the
way a reload does: unchanged backends keep their state (by id `pool/IP:port`), new ones
slow-start, and one that is gone is drained first (no new requests; dropped from the config
once idle or at `drain_timeout`). A failed lookup (SERVFAIL, timeout, NXDOMAIN, an empty
answer) changes nothing: the last good set stays.

Lookups run on the event loop without blocking it; the engine update runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from fastlb.config import Backend, Config, Pool, resolver_address, split_host_port

log = logging.getLogger("fastlb")

# A lookup's whole budget (both families, retries, TCP after truncation included).
LOOKUP_TIMEOUT_S = 2.0
# However short a TTL, no pool is looked up more often than this.
MIN_WAIT_S = 1.0
# SRV weights are 0..65535; fastlb's 0..1000. 0 still gets a little traffic (RFC 2782).
MAX_WEIGHT = 1000


@dataclass(frozen=True, order=True)
class Found:
    """One backend a lookup found."""

    address: str  # "IP:port" ([v6]:port)
    weight: int
    backup: bool
    max_connections: int


def discovered_pools(config: Config) -> list[Pool]:
    """The pools whose backends come from DNS: `srv`, or a backend named by a host name
    ("localhost" aside: that is the hosts file's)."""
    return [p for p in config.pools if p.srv is not None or any(_host_of(b) for b in p.backends)]


def _host_of(backend: Backend) -> str | None:
    host, _ = split_host_port(backend.address)
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return None
    return None if host.lower().rstrip(".") == "localhost" else host


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def make_resolver(config: Config) -> dns.asyncresolver.Resolver:
    servers = config.runtime.resolvers
    try:
        resolver = dns.asyncresolver.Resolver(configure=not servers)
    except dns.resolver.NoResolverConfiguration:
        log.warning(
            "discovery: no [runtime].resolvers and no nameserver in /etc/resolv.conf: asking 127.0.0.1"
        )
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
    if servers:
        nameservers: list[str | dns.nameserver.Nameserver] = []
        for text in servers:
            nameservers.append(dns.nameserver.Do53Nameserver(*resolver_address(text)))
        resolver.nameservers = nameservers
    resolver.lifetime = LOOKUP_TIMEOUT_S
    resolver.timeout = LOOKUP_TIMEOUT_S / 2
    resolver.cache = None  # the TTL decides when to ask again, not a cache in between
    return resolver


async def _addresses(resolver: dns.asyncresolver.Resolver, name: str) -> tuple[list[str], float]:
    """Every A and AAAA address of `name` and the shortest TTL; ([], inf) when it has none.
    Raises dns.exception.DNSException when the servers fail (SERVFAIL, timeout)."""
    found: list[str] = []
    ttl = float("inf")
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(name, rdtype, search=False)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            continue
        found += [r.address for r in answer]
        if answer.rrset is not None:
            ttl = min(ttl, float(answer.rrset.ttl))
    return found, ttl


Say = Callable[[str], None]


def _warn(message: str) -> None:
    log.warning("%s: keeping the last good set", message)


async def lookup_pool(
    resolver: dns.asyncresolver.Resolver, pool: Pool, say: Say = _warn
) -> tuple[list[Found], float] | None:
    """What DNS says the pool's backends are now, and how soon to ask again; None when a
    lookup failed or came back empty (the last good set then stays), and `say` hears why."""
    try:
        if pool.srv is not None:
            return await _lookup_srv(resolver, pool, say)
        found: list[Found] = []
        ttl = float("inf")
        for b in pool.backends:
            host = _host_of(b)
            _, port = split_host_port(b.address)
            if host is None:
                found.append(Found(b.address, b.weight, b.backup, b.max_connections))
                continue
            ips, name_ttl = await _addresses(resolver, host)
            if not ips:
                say(f"pool {pool.name}: {host} has no A or AAAA record")
                return None
            ttl = min(ttl, name_ttl)
            found += [Found(_address(ip, port), b.weight, b.backup, b.max_connections) for ip in ips]
        return sorted(set(found)), ttl
    except dns.exception.DNSException as err:
        say(f"pool {pool.name}: lookup failed ({err or type(err).__name__})")
        return None


async def _lookup_srv(
    resolver: dns.asyncresolver.Resolver, pool: Pool, say: Say
) -> tuple[list[Found], float] | None:
    assert pool.srv is not None
    try:
        answer = await resolver.resolve(pool.srv, "SRV", search=False)
    except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
        say(f"pool {pool.name}: {pool.srv} has no SRV record")
        return None
    records = list(answer)
    ttl = float(answer.rrset.ttl) if answer.rrset is not None else float("inf")
    best = min(r.priority for r in records)
    found: list[Found] = []
    for r in records:
        ips, name_ttl = await _addresses(resolver, r.target.to_text())
        ttl = min(ttl, name_ttl)
        weight = max(1, min(int(r.weight), MAX_WEIGHT))
        found += [Found(_address(ip, int(r.port)), weight, r.priority > best, 0) for ip in ips]
    if not found:
        say(f"pool {pool.name}: no SRV target of {pool.srv} has an address")
        return None
    return sorted(set(found)), ttl


def expand(config: Config, found: dict[str, list[Found]], leaving: dict[str, list[Found]]) -> Config:
    """`config` with each discovered pool's backends as found (and those still draining out);
    pools not looked up yet keep their backends as written."""
    pools = []
    for p in config.pools:
        if p.name not in found:
            pools.append(p)
            continue
        taken = {f.address for f in found[p.name]}
        now = found[p.name] + [f for f in leaving.get(p.name, []) if f.address not in taken]
        backends = [
            Backend(address=f.address, weight=f.weight, backup=f.backup, max_connections=f.max_connections)
            for f in now
        ]
        pools.append(p.model_copy(update={"backends": backends}))
    return config.model_copy(update={"pools": pools})  # private attributes (files read) go along


def first_lookups(config: Config) -> dict[str, list[Found]]:
    """The discovered pools' backends before the engine starts (blocking: called once, before
    any event loop runs); a pool whose lookup fails is left out (its backends as written)."""
    pools = discovered_pools(config)
    if not pools:
        return {}

    async def lookups() -> dict[str, list[Found]]:
        resolver = make_resolver(config)
        results = await asyncio.gather(*(lookup_pool(resolver, p) for p in pools))
        return {p.name: r[0] for p, r in zip(pools, results, strict=True) if r is not None}

    return asyncio.run(lookups())


class Discovery:
    """The lookup loops of one running fastlb. `apply` pushes a config to the engine (the
    control plane's, under its reload lock); `drain(pool, address)` drains a backend and
    returns once it is drained or timed out; `enable(pool, address)` takes one back that DNS
    gives again while it drains."""

    def __init__(
        self,
        config: Config,
        apply: Callable[[Config], Awaitable[None]],
        drain: Callable[[str, str], Awaitable[None]],
        enable: Callable[[str, str], None],
        found: dict[str, list[Found]] | None = None,
    ) -> None:
        self.file_config = config  # as written: host names, srv
        self.found: dict[str, list[Found]] = dict(found or {})  # what the engine has now
        self.leaving: dict[str, list[Found]] = {}
        self._apply = apply
        self._drain = drain
        self._enable = enable
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._drains: set[asyncio.Task[None]] = set()

    def counts(self) -> dict[str, int]:
        """Backends each discovered pool has from DNS now (the metric)."""
        return {name: len(found) for name, found in self.found.items()}

    def current(self) -> Config:
        return expand(self.file_config, self.found, self.leaving)

    async def start(self) -> bool:
        """Looks every discovered pool up once, then keeps looking; returns whether that first
        round found other backends than the engine started with."""
        before = dict(self.found)
        await self._restart(self.file_config)
        return self.found != before

    async def update(self, config: Config) -> Config:
        """A reload: the new file's pools are looked up again; returns the config to apply."""
        self.file_config = config
        await self._restart(config)
        return self.current()

    async def stop(self) -> None:
        tasks = [*self._tasks.values(), *self._drains]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    async def _restart(self, config: Config) -> None:
        for t in self._tasks.values():
            t.cancel()
        self._tasks.clear()
        pools = {p.name: p for p in discovered_pools(config)}
        for name in list(self.found):
            if name not in pools:
                self.found.pop(name)
                self.leaving.pop(name, None)
        if not pools:
            return
        resolver = make_resolver(config)
        firsts = await asyncio.gather(*(lookup_pool(resolver, p) for p in pools.values()))
        waits = {}
        for pool, first in zip(pools.values(), firsts, strict=True):
            if first is not None:
                self.found[pool.name] = first[0]
            waits[pool.name] = _wait(pool, first)
        loop = asyncio.get_running_loop()
        for name, pool in pools.items():
            watch = self._watch(resolver, pool, waits[name])
            self._tasks[name] = loop.create_task(watch, name=f"discovery {name}")

    async def _watch(self, resolver: dns.asyncresolver.Resolver, pool: Pool, wait: float) -> None:
        failing = ""  # said once, not at every interval (a name only the hosts file knows)

        def say(message: str) -> None:
            nonlocal failing
            if message != failing:
                _warn(message)
            failing = message

        while True:
            await asyncio.sleep(wait)
            result = await lookup_pool(resolver, pool, say)
            if result is not None and failing:
                log.info("pool %s: lookups answer again", pool.name)
                failing = ""
            wait = _wait(pool, result)
            if result is None or result[0] == self.found.get(pool.name):
                continue
            await self._change(pool, result[0])

    async def _change(self, pool: Pool, now: list[Found]) -> None:
        before = self.found.get(pool.name, [])
        gone = [f for f in before if f.address not in {n.address for n in now}]
        added = [f.address for f in now if f.address not in {b.address for b in before}]
        self.found[pool.name] = now
        leaving = self.leaving.setdefault(pool.name, [])
        back = [f for f in leaving if f.address in {n.address for n in now}]
        leaving[:] = [f for f in leaving if f not in back] + gone
        for f in back:  # DNS gives it again before it drained out: back into rotation
            with contextlib.suppress(KeyError):
                self._enable(pool.name, f.address)
        log.info(
            "pool %s: DNS now gives %d backends (added %s; draining %s)",
            pool.name,
            len(now),
            ", ".join(added) or "none",
            ", ".join(f.address for f in gone) or "none",
        )
        await self._apply(self.current())
        for f in gone:
            task = asyncio.get_running_loop().create_task(self._drain_out(pool.name, f))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)

    async def _drain_out(self, pool: str, found: Found) -> None:
        """A backend DNS no longer gives: drained, then dropped from the config."""
        started = time.monotonic()
        with contextlib.suppress(KeyError):
            await self._drain(pool, found.address)
        leaving = self.leaving.get(pool, [])
        if found in leaving and found not in self.found.get(pool, []):
            leaving.remove(found)
            log.info(
                "pool %s: %s drained after %.1fs, removed", pool, found.address, time.monotonic() - started
            )
            await self._apply(self.current())


def _wait(pool: Pool, result: tuple[list[Found], float] | None) -> float:
    interval = pool.resolve.interval.seconds
    if result is None:
        return interval
    return max(MIN_WAIT_S, min(interval, result[1]))
