"""The packet-level data path (`data_path = "kernel"`, docs/l4-kernel.md): nftables NAT programmed
from the same config and backend state as the proxy, so new flows to a listener's address are
rewritten to a backend in the kernel and never reach user space.

- One table of fastlb's own (`ip fastlb`), changed only by atomic `nft -j -f -` transactions
  (the JSON interface). No other table is read or written.
- Chains: `prerouting` (remote clients) and `output` (local ones), NAT hooks at dstnat
  priority, both jump to `services`, which matches each listener's address and port and goes
  to its chain `l<k>`. That chain picks a slot (numgen inc: round_robin; numgen random:
  random; jhash of the client address: ip_hash, and the maglev table for consistent_hash and
  maglev) and goes to the backend's chain `b<slot>`, which marks the flow (ct mark), counts
  it, and DNATs it. Conntrack keeps every packet after the first on that backend, so drain
  and reload never move an established flow.
- `count_in` / `count_out` (filter, prerouting and output) add each packet's bytes to its backend's counter
  by the ct mark, in both directions; `masquerade` (nat postrouting) rewrites the source of
  flows of `source = "masquerade"` listeners.
- A listener with no backend to give (all down, drained or disabled) has an empty chain: its
  packets go on to the local stack, where nothing listens, so new TCP flows are refused (RST)
  as at stop. At stop, `services` is flushed first (new flows refused), established flows
  are left to finish up to the drain timeout, then the table is deleted (which ends what is
  left: the NAT bindings go with the hooks).
- Counters and conntrack are read on demand (status, /metrics, a drain's wait).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import math
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastlb.config import Config, Listener, split_host_port
from fastlb.engine import Engine

log = logging.getLogger("fastlb.kernel")

FAMILY, TABLE = "ip", "fastlb"
MARK_BASE, MARK_MASK = 0x0FB1_0000, 0xFFFF_0000  # ct marks fastlb sets: MARK_BASE | slot
MAX_SLOTS = 0xFFFF
# Turns of the round-robin and random sequences at most (weights are scaled down past it).
MAX_TURNS = 4096
HASH_SEED = 0xFA57  # jhash seed: fixed, so a client keeps its backend across restarts
SYNC_POLL_S = 0.1
NFT_TIMEOUT_S = 10.0
CLOSING_TCP = {"TIME_WAIT", "CLOSE", "LAST_ACK", "CLOSE_WAIT", "FIN_WAIT"}


class KernelPathError(RuntimeError):
    """nft is missing, refused (no CAP_NET_ADMIN), or failed a transaction."""


# --- what the kernel should do: pure, from config and state ---------------------------------


@dataclass(frozen=True)
class Target:
    """A backend of a kernel listener: `slot` names its chain, counters and ct mark."""

    slot: int
    pool: str
    address: str  # as configured: the backend's id within its pool
    ip: str
    port: int


@dataclass(frozen=True)
class Plan:
    """One kernel listener as the kernel should serve it now."""

    name: str
    bind: str  # as configured
    pool: str
    protocol: str  # "tcp" | "udp"
    ip: str | None  # None: every local address (0.0.0.0)
    port: int
    algorithm: str
    masquerade: bool
    targets: tuple[Target, ...]  # every backend of the pool, in pool order
    weights: tuple[int, ...]  # per target: its weight now, in thousandths (0: no new flows)


def primes_from(n: int) -> int:
    """The smallest prime >= n."""
    while any(n % d == 0 for d in range(2, math.isqrt(n) + 1)) or n < 2:
        n += 1
    return n


def maglev_size(backends: int) -> int:
    """Table slots: about 100 per backend (Maglev's M >> N), at least 1021, prime."""
    return primes_from(max(1021, 100 * backends))


def _hash(text: str, salt: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, salt=salt).digest(), "big")


def maglev_table(names: Sequence[str], weights: Sequence[int], size: int) -> list[int]:
    """Maglev's lookup table (the paper's section 3.4, weighted as Envoy does): `size` entries
    of backend indexes; a backend of weight w takes a turn on w/max(w) of the rounds. Empty
    when no weight is above 0."""
    live = [i for i, w in enumerate(weights) if w > 0]
    if not live:
        return []
    offset = {i: _hash(names[i], b"offset") % size for i in live}
    skip = {i: _hash(names[i], b"skip") % (size - 1) + 1 for i in live}
    nxt = dict.fromkeys(live, 0)
    claimed = dict.fromkeys(live, 0)
    top = max(weights[i] for i in live)
    table = [-1] * size
    filled, rounds = 0, 0
    while filled < size:
        rounds += 1
        for i in live:
            if claimed[i] * top >= rounds * weights[i]:
                continue  # a lighter backend skips rounds: w/top of them are its turns
            while True:
                c = (offset[i] + nxt[i] * skip[i]) % size
                nxt[i] += 1
                if table[c] < 0:
                    break
            table[c], claimed[i] = i, claimed[i] + 1
            filled += 1
            if filled == size:
                break
    return table


def scaled(weights: Sequence[int], limit: int = MAX_TURNS) -> list[int]:
    """Weights divided by their gcd, then scaled down (each above 0 stays >= 1) so that they sum
    to at most `limit`: the length of the round-robin and random sequences."""
    g = math.gcd(*[w for w in weights if w > 0]) or 1
    out = [w // g for w in weights]
    total = sum(out)
    if total > limit:
        out = [max(1, w * limit // total) if w > 0 else 0 for w in out]
    return out


def smooth_sequence(weights: Sequence[int]) -> list[int]:
    """Indexes in nginx's smooth weighted round-robin order: weights 5,1,1 give
    a a b a c a a, not a a a a a b c (one period, sum(weights) long)."""
    current = [0] * len(weights)
    total = sum(weights)
    order: list[int] = []
    for _ in range(total):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=lambda i: current[i])
        current[best] -= total
        order.append(best)
    return order


def ranges(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first, last, value) runs of equal values in `slots`."""
    out: list[tuple[int, int, int]] = []
    for n, v in enumerate(slots):
        if out and out[-1][2] == v and out[-1][1] == n - 1:
            out[-1] = (out[-1][0], n, v)
        else:
            out.append((n, n, v))
    return out


def _selection(plan: Plan) -> tuple[dict[str, Any], list[int]] | None:
    """The expression that picks a slot number, and slot number -> target index; None when no
    target has a weight above 0."""
    if not any(plan.weights):
        return None
    if plan.algorithm in ("consistent_hash", "maglev"):
        size = maglev_size(len(plan.targets))
        slots = maglev_table([f"{t.pool}/{t.address}" for t in plan.targets], plan.weights, size)
        key: dict[str, Any] = {"jhash": {"mod": size, "seed": HASH_SEED, "expr": _saddr()}}
        return key, slots
    weights = scaled(plan.weights)
    if plan.algorithm == "round_robin":
        slots = smooth_sequence(weights)
        return {"numgen": {"mode": "inc", "mod": len(slots), "offset": 0}}, slots
    slots = [i for i, w in enumerate(weights) for _ in range(w)]
    if plan.algorithm == "random":
        return {"numgen": {"mode": "random", "mod": len(slots), "offset": 0}}, slots
    return {"jhash": {"mod": len(slots), "seed": HASH_SEED, "expr": _saddr()}}, slots  # ip_hash


def _saddr() -> dict[str, Any]:
    return {"payload": {"protocol": "ip", "field": "saddr"}}


def _ct_mark() -> dict[str, Any]:
    return {"ct": {"key": "mark"}}


def _ours() -> dict[str, Any]:
    """Matches flows fastlb marked."""
    mask = {"&": [_ct_mark(), MARK_MASK]}
    return {"match": {"op": "==", "left": mask, "right": MARK_BASE}}


def _obj(kind: str, name: str, **extra: Any) -> dict[str, Any]:
    return {kind: {"family": FAMILY, "table": TABLE, "name": name, **extra}}


def _rule(chain: str, *expr: dict[str, Any], comment: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"family": FAMILY, "table": TABLE, "chain": chain, "expr": list(expr)}
    if comment is not None:
        body["comment"] = comment
    return {"add": {"rule": body}}


def _base_chains(masquerade: bool) -> list[dict[str, Any]]:
    nat = {"type": "nat", "prio": -100, "policy": "accept"}
    chains = [
        _obj("chain", "prerouting", hook="prerouting", **nat),
        _obj("chain", "output", hook="output", **nat),
        _obj("chain", "count_in", type="filter", hook="prerouting", prio=-90, policy="accept"),
        _obj("chain", "count_out", type="filter", hook="output", prio=-90, policy="accept"),
        _obj("chain", "services"),
    ]
    if masquerade:
        chains.append(_obj("chain", "masquerade", type="nat", hook="postrouting", prio=100, policy="accept"))
    return chains


def counter_names(slot: int) -> tuple[str, str, str]:
    """(new flows, bytes client to backend, bytes backend to client) of one slot."""
    return f"flows{slot}", f"in{slot}", f"out{slot}"


def ruleset(plans: Sequence[Plan]) -> tuple[list[dict[str, Any]], set[str], set[str]]:
    """The `add` commands of the whole table (after a flush), and the chain and counter names
    they use (the rest of the table is deleted in the same transaction)."""
    masq = [t.slot for p in plans if p.masquerade for t in p.targets]
    objects = [{"add": c} for c in _base_chains(bool(masq))]
    cmds: list[dict[str, Any]] = []
    counters: set[str] = set()
    chains = {next(iter(c["add"].values()))["name"] for c in objects}
    for k, plan in enumerate(plans):
        chain = f"l{k}"
        chains.add(chain)
        objects.append({"add": _obj("chain", chain, comment=f"listener {plan.name}")})
        cmds += _listener_rules(chain, plan)
        for t in plan.targets:
            names = counter_names(t.slot)
            counters.update(names)
            objects += [{"add": _obj("counter", n)} for n in names]
            bchain = f"b{t.slot}"
            chains.add(bchain)
            objects.append({"add": _obj("chain", bchain, comment=f"{plan.name} -> {t.pool}/{t.address}")})
            cmds.append(
                _rule(
                    bchain,
                    {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": plan.protocol}},
                    {"mangle": {"key": _ct_mark(), "value": MARK_BASE | t.slot}},
                    {"counter": names[0]},
                    {"dnat": {"addr": t.ip, "port": t.port}},
                )
            )
    for hook in ("prerouting", "output"):
        cmds.append(_rule(hook, {"jump": {"target": "services"}}))
    slots = [t.slot for p in plans for t in p.targets]
    for chain in ("count_in", "count_out") if slots else ():
        for direction, index in (("original", 1), ("reply", 2)):
            by_mark = [[MARK_BASE | s, counter_names(s)[index]] for s in slots]
            cmds.append(_count_rule(chain, direction, by_mark, skip_lo=chain == "count_in"))
    if masq:
        marks = {"set": [MARK_BASE | s for s in masq]}
        cmds.append(
            _rule(
                "masquerade",
                {"match": {"op": "==", "left": _ct_mark(), "right": marks}},
                {"masquerade": None},
            )
        )
    return objects + cmds, chains, counters


def _count_rule(chain: str, direction: str, by_mark: list[list[Any]], skip_lo: bool) -> dict[str, Any]:
    """Bytes of fastlb's flows in one direction to their slot's counter. Every packet enters
    once, from a device (prerouting) or a local socket (output); over loopback a packet passes
    both, so prerouting skips lo."""
    expr: list[dict[str, Any]] = [_ours()]
    if skip_lo:
        expr.append({"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "lo"}})
    expr.append({"match": {"op": "==", "left": {"ct": {"key": "direction"}}, "right": direction}})
    expr.append({"counter": {"map": {"key": _ct_mark(), "data": {"set": by_mark}}}})
    return _rule(chain, *expr)


def _listener_rules(chain: str, plan: Plan) -> list[dict[str, Any]]:
    proto = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": plan.protocol}}
    port = {
        "match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": plan.port}
    }
    if plan.ip is None:
        addr = {
            "match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}
        }
    else:
        addr = {
            "match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": plan.ip}
        }
    rules = [
        _rule("services", addr, proto, port, {"goto": {"target": chain}}, comment=f"listener {plan.name}")
    ]
    picked = _selection(plan)
    if picked is None:
        return rules  # nothing to give: on to the local stack, which refuses it
    key, slots = picked
    verdicts = [[{"range": [a, b]} if a != b else a, {"goto": {"target": f"b{plan.targets[v].slot}"}}]
                for a, b, v in ranges(slots)]  # fmt: skip
    rules.append(_rule(chain, {"vmap": {"key": key, "data": {"set": verdicts}}}))
    return rules


# --- plans from the running config and the engine's backend state ----------------------------


def kernel_listeners(config: Config) -> list[Listener]:
    return [x for x in config.listeners if x.data_path == "kernel"]


@dataclass
class Slots:
    """Stable slot numbers for (listener, pool/address): counters and ct marks keep meaning
    across syncs and reloads; a pair gone from the config gives its number back."""

    numbers: dict[tuple[str, str], int] = field(default_factory=dict)

    def assign(self, wanted: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
        wanted = list(dict.fromkeys(wanted))
        self.numbers = {k: v for k, v in self.numbers.items() if k in wanted}
        used = set(self.numbers.values())
        free = (n for n in range(MAX_SLOTS) if n not in used)
        for k in wanted:
            if k not in self.numbers:
                self.numbers[k] = next(free)
        return self.numbers


def plans(engine: Engine, slots: Slots) -> list[Plan]:
    """What each kernel listener should do now: its pool's backends (addresses as the engine
    resolved them) with the weight each gets (0 unless enabled and up; backups only when no
    primary has a weight; slow start scales round_robin and random, as in the proxy)."""
    config = engine.config
    pools = {p.name: p for p in config.pools}
    resolved = {p["name"]: p["backends"] for p in engine.spec["pools"]}
    listeners = kernel_listeners(config)
    pairs = [(x.name, f"{x.pool}/{b['address']}") for x in listeners for b in resolved.get(x.pool, [])]
    numbers = slots.assign(pairs)
    out: list[Plan] = []
    for x in listeners:
        host, port = split_host_port(x.bind, bind=True)
        pool = pools[x.pool]
        targets: list[Target] = []
        primary: list[int] = []
        backup: list[int] = []
        for b in resolved.get(x.pool, []):
            ip, bport = split_host_port(b["addr"])
            if not isinstance(ipaddress.ip_address(ip), ipaddress.IPv4Address):
                continue  # a name that resolved to IPv6: the kernel path is IPv4 only
            targets.append(
                Target(numbers[x.name, f"{x.pool}/{b['address']}"], x.pool, b["address"], ip, bport)
            )
            weight = _weight_now(engine, x.pool, b["address"], pool.algorithm)
            primary.append(0 if b["backup"] else weight)
            backup.append(weight if b["backup"] else 0)
        weights = primary if any(primary) else backup
        any_ip = None if ipaddress.ip_address(host).is_unspecified else host
        masquerade = x.source == "masquerade"
        out.append(Plan(x.name, x.bind, x.pool, x.protocol, any_ip, port, pool.algorithm, masquerade,
                        tuple(targets), tuple(weights)))  # fmt: skip
    return out


def _weight_now(engine: Engine, pool: str, address: str, algorithm: str) -> int:
    try:
        state = engine.backend_state(pool, address)
    except KeyError:
        return 0
    if state.admin != "enabled" or not state.up:
        return 0
    if algorithm in ("round_robin", "random"):
        return state.weight * state.scale  # `scaled` divides the common factor out
    return state.weight * 1000  # hashing does not ramp: a client would move back and forth


# --- nft --------------------------------------------------------------------------------------


def nft_binary() -> str:
    """$FASTLB_NFT, else `nft` on PATH or in /usr/sbin, /sbin."""
    given = os.environ.get("FASTLB_NFT")
    found = given if given is not None else shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if found is None or not os.access(found, os.X_OK):
        raise KernelPathError(f"{found or 'nft'} is not installed (Debian: apt install nftables)")
    return found


def nft(commands: list[dict[str, Any]] | None, *args: str) -> dict[str, Any]:
    """Runs `nft -j` with a JSON transaction on stdin (`-f -`) or `args`; its JSON output."""
    argv = [nft_binary(), "-j", *(["-f", "-"] if commands is not None else args)]
    stdin = json.dumps({"nftables": commands}) if commands is not None else None
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=NFT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise KernelPathError(f"nft: {err}") from None
    if done.returncode != 0:
        raise KernelPathError(f"nft: {done.stderr.strip() or f'exit {done.returncode}'}")
    out: dict[str, Any] = json.loads(done.stdout) if done.stdout.strip() else {}
    return out


def table_objects() -> tuple[set[str], set[str]] | None:
    """Chain and counter names of fastlb's table now; None when it does not exist."""
    try:
        listing = nft(None, "list", "table", FAMILY, TABLE)
    except KernelPathError as err:
        if "No such file or directory" in str(err):
            return None
        raise
    chains, counters = set(), set()
    for item in listing.get("nftables", []):
        if "chain" in item:
            chains.add(item["chain"]["name"])
        elif "counter" in item:
            counters.add(item["counter"]["name"])
    return chains, counters


def transaction(plans_now: Sequence[Plan]) -> list[dict[str, Any]]:
    """Replaces the table's contents with `plans_now`, atomically; counters that stay keep
    their counts, and the NAT hooks stay registered (so established flows keep their NAT)."""
    adds, chains, counters = ruleset(plans_now)
    table = {"table": {"family": FAMILY, "name": TABLE}}
    cmds: list[dict[str, Any]] = [{"add": table}, {"flush": table}, *adds]
    existing = table_objects() or (set(), set())
    cmds += [{"delete": _obj("chain", c)} for c in sorted(existing[0] - chains)]
    cmds += [{"delete": _obj("counter", c)} for c in sorted(existing[1] - counters)]
    return cmds


# --- visibility: counters and conntrack ------------------------------------------------------


def read_counters() -> dict[str, int]:
    """Every counter of the table: packets for flows*, bytes for in*/out*."""
    out: dict[str, int] = {}
    for item in nft(None, "list", "counters", "table", FAMILY, TABLE).get("nftables", []):
        c = item.get("counter")
        if c is not None:
            out[c["name"]] = c["packets"] if c["name"].startswith("flows") else c["bytes"]
    return out


def active_flows(lines: Iterable[str]) -> dict[int, int]:
    """Open flows per slot from /proc/net/nf_conntrack lines: fastlb's marks, TCP past its
    closing states left out (a TIME_WAIT entry carries nothing)."""
    counts: dict[int, int] = {}
    for line in lines:
        at = line.rfind(" mark=")
        if at < 0:
            continue
        mark = int(line[at + 6 :].split(" ", 1)[0])
        if mark & MARK_MASK != MARK_BASE:
            continue
        words = line.split()
        if words[2] == "tcp" and words[5] in CLOSING_TCP:
            continue
        slot = mark & ~MARK_MASK
        counts[slot] = counts.get(slot, 0) + 1
    return counts


def read_conntrack() -> dict[int, int] | None:
    try:
        with open("/proc/net/nf_conntrack") as f:
            return active_flows(f)
    except OSError:
        return None  # no procfs view of conntrack in this kernel: active flows unknown


# --- the control plane's side -----------------------------------------------------------------


class KernelPath:
    """Keeps fastlb's nftables table equal to what the running config and backend state ask for:
    a poll of `engine.writes` (every change the engine applies counts one) on the event loop,
    and the nft work in a thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.slots = Slots()
        self.applied: list[Plan] | None = None
        self._seen_writes = -1
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._flows: dict[int, int] | None = None  # open flows by slot at the last reading
        self._reading: asyncio.Future[tuple[dict[str, int], dict[int, int] | None]] | None = None
        self.owned = False  # whether this process programmed the table (and removes it)

    @property
    def enabled(self) -> bool:
        return bool(kernel_listeners(self.engine.config)) or self.owned

    def start(self) -> None:
        """The first transaction, synchronous: a start-up error names the listener."""
        if kernel_listeners(self.engine.config):
            names = ", ".join(repr(x.name) for x in kernel_listeners(self.engine.config))
            try:
                self._apply(plans(self.engine, self.slots))
            except KernelPathError as err:
                raise KernelPathError(f'listener {names} (data_path = "kernel"): {err}') from None
            if any(not ipaddress.ip_address(t.ip).is_loopback for p in self.applied or [] for t in p.targets):
                self._warn_forwarding()
        self._seen_writes = self.engine.writes
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="kernel-path")

    def _apply(self, wanted: list[Plan]) -> None:
        nft(transaction(wanted))
        self.applied, self.owned = wanted, True

    def _warn_forwarding(self) -> None:
        try:
            with open("/proc/sys/net/ipv4/ip_forward") as f:
                forwarding = f.read().strip() == "1"
        except OSError:
            return
        if not forwarding:
            log.warning(
                "kernel data path: net.ipv4.ip_forward is 0, so flows from other hosts to backends on"
                " other hosts are not forwarded (sysctl -w net.ipv4.ip_forward=1)"
            )

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(SYNC_POLL_S)
            if self.engine.writes == self._seen_writes:
                continue
            self._seen_writes = self.engine.writes
            await self.sync()

    async def sync(self) -> None:
        """Programs the table again if the plans changed (a reload, a health flip, a drain)."""
        async with self._lock:
            if not self.enabled:
                return
            wanted = plans(self.engine, self.slots)
            if wanted == self.applied:
                return
            try:
                await asyncio.to_thread(self._apply, wanted)
            except KernelPathError as err:
                log.error("kernel data path: the table keeps its rules: %s", err)
                return
            for plan in wanted:
                live = [f"{t.address}={w}" for t, w in zip(plan.targets, plan.weights, strict=True) if w]
                log.info(
                    "kernel data path: listener %s -> %s", plan.name, ", ".join(live) or "(none: refused)"
                )

    async def stop(self, grace_s: float, handed_over: bool) -> None:
        """New flows refused at once, established ones given up to `grace_s`, then the table
        removed. After a binary upgrade the new process owns the table: it is left alone."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if not self.owned or handed_over:
            return
        async with self._lock:
            try:
                await asyncio.to_thread(nft, [{"flush": _obj("chain", "services")}])
                deadline = time.monotonic() + grace_s
                while time.monotonic() < deadline:
                    left = await asyncio.to_thread(read_conntrack)
                    if not left:
                        break
                    await asyncio.sleep(0.2)
                else:
                    log.warning(
                        "kernel data path: closing %d flows at the drain timeout", sum((left or {}).values())
                    )
                await asyncio.to_thread(nft, [{"delete": {"table": {"family": FAMILY, "name": TABLE}}}])
            except KernelPathError as err:
                log.error("kernel data path: at stop: %s", err)
            self.owned = False

    # --- status ---------------------------------------------------------------------------

    async def figures(self) -> tuple[dict[str, int], dict[int, int] | None]:
        """(counters by name, active flows by slot or None), read now; callers who ask while a
        reading is under way share it (status, /metrics and a drain may ask at once)."""
        if self._reading is None:
            self._reading = asyncio.ensure_future(
                asyncio.to_thread(lambda: (read_counters(), read_conntrack()))
            )
            self._reading.add_done_callback(lambda _: setattr(self, "_reading", None))
        counters, self._flows = await asyncio.shield(self._reading)
        return counters, self._flows

    def active(self, pool: str, address: str) -> int:
        """Open kernel flows to the backend at the last reading (drain waits on it)."""
        if self._flows is None or self.applied is None:
            return 0
        flows = self._flows
        return sum(flows.get(t.slot, 0) for p in self.applied for t in p.targets
                   if t.pool == pool and t.address == address)  # fmt: skip

    async def status(self) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
        """Listener entries shaped as the engine's tcp/udp ones (with `data_path`), and per
        backend id `pool/address` its kernel figures."""
        if self.applied is None:
            return [], {}
        counters, flows = await self.figures()
        listeners: list[dict[str, Any]] = []
        backends: dict[str, dict[str, Any]] = {}
        for plan in self.applied:
            total = {"flows_total": 0, "flows_active": 0, "bytes_in": 0, "bytes_out": 0}
            for t, w in zip(plan.targets, plan.weights, strict=True):
                f, i, o = counter_names(t.slot)
                mine = {
                    "flows_total": counters.get(f, 0),
                    "flows_active": (flows or {}).get(t.slot, 0),
                    "bytes_in": counters.get(i, 0),
                    "bytes_out": counters.get(o, 0),
                }
                for k in total:
                    total[k] += mine[k]
                entry = backends.setdefault(f"{t.pool}/{t.address}", {"listeners": {}})
                entry["listeners"][plan.name] = {**mine, "weight": w / 1000}  # slow start included
            listeners.append(_listener_entry(plan, total, flows is not None))
        return listeners, backends


def _listener_entry(plan: Plan, total: dict[str, int], active_known: bool) -> dict[str, Any]:
    return {
        "name": plan.name,
        "bind": plan.bind,
        "pool": plan.pool,
        "protocol": plan.protocol,
        "data_path": "kernel",
        "algorithm": plan.algorithm,
        "source": "masquerade" if plan.masquerade else "keep",
        "connections_total": total["flows_total"],
        "connections_active": total["flows_active"] if active_known else 0,
        "bytes_in": total["bytes_in"],
        "bytes_out": total["bytes_out"],
        "dropped": {},
        "durations": [],
        "routes": None,
    }
