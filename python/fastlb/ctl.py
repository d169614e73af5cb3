"""`fastlb ctl`: the admin API from a shell, as readable tables (or `--json` for scripts).

Exit codes: 0 done, 1 the admin API cannot be reached or failed, 2 the request was refused
(unknown pool, backend, listener or route, bad weight, a canary action its state does not allow,
invalid config on reload, a missing or wrong token) or bad usage.

Every request carries `X-Fastlb-Admin: 1` (the API refuses state changes without it) and, with
`--token-file` or `$FASTLB_ADMIN_TOKEN`, `Authorization: Bearer TOKEN`. `--admin
https://HOST:PORT` speaks TLS (`--cacert` for a private CA, `--cert`/`--key` for mTLS).
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

DEFAULT_ADMIN = "127.0.0.1:9901"
CANARY_ACTIONS = ("pause", "resume", "promote", "rollback")
TIMEOUT_S = 10.0

STATE_STYLE = {
    "up": "green",
    "down": "bold red",
    "draining": "yellow",
    "drained": "yellow",
    "disabled": "dim",
}


class CtlError(Exception):
    def __init__(self, message: str, code: int, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.errors = errors or []


@dataclass(frozen=True)
class AdminClient:
    """Where the admin API is and how to be let in."""

    url: str  # http://HOST:PORT or https://HOST:PORT, no trailing slash
    token: str | None = None
    tls: ssl.SSLContext | None = None

    @property
    def where(self) -> str:
        return self.url.split("://", 1)[1]


def admin_client(args: argparse.Namespace) -> AdminClient:
    """From `--admin`, `--token-file` / $FASTLB_ADMIN_TOKEN and the TLS flags; CtlError (2)
    for a token file that cannot be read."""
    admin = args.admin.rstrip("/")
    url = admin if admin.startswith(("http://", "https://")) else f"http://{admin}"
    token = os.environ.get("FASTLB_ADMIN_TOKEN") or None
    if args.token_file is not None:
        try:
            token = Path(args.token_file).read_text().strip() or None
        except OSError as err:
            raise CtlError(f"--token-file: cannot read {args.token_file}: {err.strerror or err}", 2) from None
    tls = None
    if url.startswith("https://"):
        tls = ssl.create_default_context(cafile=args.cacert)
        if args.cert is not None:
            tls.load_cert_chain(args.cert, args.key)
    return AdminClient(url, token, tls)


def add_ctl_parser(sub: Any) -> None:
    ctl = sub.add_parser("ctl", help="talk to a running fastlb through its admin API")
    ctl.add_argument(
        "--admin",
        default=os.environ.get("FASTLB_ADMIN", DEFAULT_ADMIN),
        metavar="[https://]HOST:PORT",
        help="admin API address (default $FASTLB_ADMIN or %(default)s)",
    )
    ctl.add_argument(
        "--token-file",
        metavar="FILE",
        help="a file holding the admin token (default: $FASTLB_ADMIN_TOKEN, if set)",
    )
    ctl.add_argument("--cacert", metavar="FILE", help="CA of an https admin API (default: the system's)")
    ctl.add_argument("--cert", metavar="FILE", help="client certificate for an admin API that asks for one")
    ctl.add_argument("--key", metavar="FILE", help="the client certificate's key (default: in --cert)")
    ctl.add_argument("--json", action="store_true", help="print the API's JSON answer")
    # `--json` is accepted after the action too (`fastlb ctl status --json`)
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    actions = ctl.add_subparsers(dest="action", required=True)
    actions.add_parser("status", help="listeners, pools and backends", parents=[json_flag])
    for name, what in (
        ("drain", "no new connections; open ones finish (up to drain_timeout)"),
        ("enable", "back into rotation"),
        ("disable", "out of rotation at once"),
    ):
        p = actions.add_parser(name, help=what, parents=[json_flag])
        p.add_argument("pool")
        p.add_argument("address", help="the backend's address as in the config, e.g. 10.0.0.1:80")
    w = actions.add_parser("weight", help="set a backend's weight (0..1000) live", parents=[json_flag])
    w.add_argument("pool")
    w.add_argument("address")
    w.add_argument("weight", type=int)
    sp = actions.add_parser("split", help="set a split route's weights live", parents=[json_flag])
    sp.add_argument("listener")
    sp.add_argument("route", help="the route's name, or its index")
    sp.add_argument(
        "weights", nargs="+", metavar="POOL=W", help="one per pool of the split, e.g. v1=50 v2=50"
    )
    ca = actions.add_parser(
        "canary", help="pause, resume, promote or roll back a route's canary", parents=[json_flag]
    )
    ca.add_argument("listener")
    ca.add_argument("route", help="the route's name, or its index")
    ca.add_argument(
        "canary_action", metavar="ACTION", choices=CANARY_ACTIONS, help=" | ".join(CANARY_ACTIONS)
    )
    actions.add_parser("reload", help="re-read the config file (as SIGHUP does)", parents=[json_flag])
    ev = actions.add_parser("events", help="the audit trail: recent state changes", parents=[json_flag])
    ev.add_argument("--since", type=int, default=0, help="only events after this id")
    top = actions.add_parser("top", help="status, refreshed every second until Ctrl-C")
    top.add_argument("--count", type=int, default=0, help="stop after this many refreshes (0: never)")


def call(admin: AdminClient, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One admin API call; CtlError with the API's message when it refuses."""
    data = None if body is None else orjson.dumps(body)
    req = urllib.request.Request(f"{admin.url}{path}", data=data, method=method)
    req.add_header("X-Fastlb-Admin", "1")
    if admin.token is not None:
        req.add_header("Authorization", f"Bearer {admin.token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S, context=admin.tls) as resp:
            return orjson.loads(resp.read())
    except urllib.error.HTTPError as err:
        try:
            answer = orjson.loads(err.read())
        except orjson.JSONDecodeError:
            answer = {"error": f"HTTP {err.code}"}
        code = 2 if err.code in (400, 401, 403, 404, 409, 421, 429) else 1
        raise CtlError(str(answer.get("error", err.code)), code, answer.get("errors")) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise CtlError(f"cannot reach the admin API at {admin.where}: {reason}", 1) from None


def run_ctl(args: argparse.Namespace) -> int:
    # Wide enough for addresses and notes when piped (rich assumes 80 columns then).
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
    try:
        admin = admin_client(args)
        if args.action == "top":
            return run_top(admin, args.count, console)
        answer = _ask(admin, args)
    except CtlError as err:
        print(f"fastlb ctl: {err}", file=sys.stderr)
        for line in err.errors:
            print(f"  {line}", file=sys.stderr)
        return err.code
    if args.json:
        sys.stdout.write(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif args.action == "status":
        print_status(console, answer)
    elif args.action == "reload":
        console.print(f"reloaded: {answer['listeners']} listeners, {answer['pools']} pools")
        for line in answer.get("warnings", []):
            print(f"warning: {line}", file=sys.stderr)
    elif args.action == "weight":
        console.print(f"{answer['backend']}: weight {answer['weight']}")
    elif args.action == "events":
        print_events(console, answer["events"])
    elif args.action == "split":
        weights = " ".join(f"{pool}={w}" for pool, w in answer["weights"].items())
        note = "; its canary is paused" if answer.get("canary_paused") else ""
        console.print(f"{answer['route']}: split {weights}{note}")
    elif args.action == "canary":
        c = answer["canary"]
        console.print(f"{answer['route']}: canary {c['state']}, {c['pool']} at {c['weight']}%")
    else:
        console.print(f"{answer['backend']}: {args.action} done")
    return 0


def _ask(admin: AdminClient, args: argparse.Namespace) -> Any:
    if args.action == "status":
        return call(admin, "GET", "/api/status")
    if args.action == "reload":
        return call(admin, "POST", "/api/reload")
    if args.action == "events":
        return call(admin, "GET", f"/api/events?since={args.since}")
    if args.action in ("split", "canary"):
        route = f"/api/listeners/{_q(args.listener)}/routes/{_q(args.route)}"
        if args.action == "canary":
            return call(admin, "POST", f"{route}/canary/{args.canary_action}")
        return call(admin, "PUT", f"{route}/split", {"weights": _weights(args.weights)})
    quoted = f"/api/pools/{_q(args.pool)}/backends/{_q(args.address)}"
    if args.action == "weight":
        return call(admin, "PUT", f"{quoted}/weight", {"weight": args.weight})
    return call(admin, "POST", f"{quoted}/{args.action}")


def _weights(pairs: list[str]) -> dict[str, int]:
    """`v1=50 v2=50` as {"v1": 50, "v2": 50}; CtlError (2) for anything else."""
    weights: dict[str, int] = {}
    for pair in pairs:
        pool, sep, value = pair.partition("=")
        if not sep or not pool or not value.isdigit():
            raise CtlError(f"split: {pair!r} is not POOL=WEIGHT (e.g. v1=50)", 2)
        weights[pool] = int(value)
    return weights


def print_events(console: Console, events: list[dict[str, Any]]) -> None:
    table = Table(title="audit trail", title_justify="left")
    for col in ("id", "time", "actor", "client", "action", "target", "result"):
        table.add_column(col, justify="right" if col == "id" else "left")
    for e in events:
        cells = [str(e[k]) for k in ("id", "time", "actor", "client", "action", "target")]
        result = Text(e["result"], style="" if e["result"] == "ok" else "red")
        table.add_row(*(Text(c) for c in cells), result)  # Text: no markup from what clients sent
    console.print(table)


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe=":")


def run_top(admin: AdminClient, count: int, console: Console) -> int:
    """A live `status`: the table redrawn in place every second."""
    shown = 0
    try:
        with Live(console=console, auto_refresh=False) as live:
            while count == 0 or shown < count:
                try:
                    live.update(status_view(call(admin, "GET", "/api/status")), refresh=True)
                except CtlError as err:
                    live.update(Text(f"fastlb ctl: {err}", style="red"), refresh=True)
                shown += 1
                if count == 0 or shown < count:
                    time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    return 0


def print_status(console: Console, status: dict[str, Any]) -> None:
    console.print(status_view(status))


def status_view(status: dict[str, Any]) -> Group:
    parts: list[Any] = []
    parts.append(
        f"fastlb {status['version']}  up {_duration(status['uptime_s'])}  "
        f"{status['connections_active']} connections open  {status['reloads']} reloads"
        + ("  [yellow]stopping[/]" if status["stopping"] else "")
    )
    listeners = Table(title="listeners", title_justify="left")
    numbers = ("active", "connections", "requests", "h2 conns", "h2 streams")
    for col in ("name", "protocol", "bind", "pool", *numbers):
        listeners.add_column(col, justify="right" if col in numbers else "left")
    for li in status["listeners"]:
        udp = li.get("udp")  # udp listeners: sessions stand for connections
        h2 = li.get("http2")  # http/https listeners: HTTP/2 connections and streams open
        listeners.add_row(
            li["name"],
            li["protocol"] + (" (kernel)" if li.get("data_path") == "kernel" else ""),  # nftables NAT
            li["bind"],
            li["pool"],
            str(li["connections_active"] if udp is None else udp["sessions_active"]),
            str(li["connections_total"] if udp is None else udp["sessions_total"]),
            str(li["requests_total"]) if li["protocol"] in ("http", "https") else "-",
            "-" if h2 is None else str(h2["connections_active"]),
            "-" if h2 is None else str(h2["streams_active"]),
        )
    parts.append(listeners)
    routes = _routes_table(status["listeners"])
    if routes is not None:
        parts.append(routes)
    for pool in status["pools"]:
        total = len(pool["backends"])
        table = Table(
            title=f"pool {pool['name']} ({pool['algorithm']}): {pool['healthy_backends']}/{total} up",
            title_justify="left",
        )
        for col in (
            "backend",
            "state",
            "weight",
            "active",
            "requests",
            "failures",
            "p50 ms",
            "p99 ms",
            "note",
        ):
            table.add_column(col, justify="left" if col in ("backend", "state", "note") else "right")
        for b in pool["backends"]:
            state = b["state"]
            weight = str(b["weight"])
            notes = []
            if b["backup"]:
                notes.append("backup")
            if b["slow_start"]:
                notes.append(f"slow start {b['weight_scale'] / 10:.0f}%")
            if b["ejected"]:
                notes.append("ejected")
            if state == "down" and b["health"]["last_error"]:
                notes.append(b["health"]["last_error"])
            table.add_row(
                b["address"],
                f"[{STATE_STYLE.get(state, '')}]{state}[/]",
                weight,
                str(b["active_connections"]),
                str(b["requests_total"] or b["connections_total"]),
                str(b["failures_total"]),
                _ms(b["latency_p50_ms"]),
                _ms(b["latency_p99_ms"]),
                ", ".join(notes),
            )
        parts.append(table)
    return Group(*parts)


CANARY_STYLE = {"running": "cyan", "paused": "yellow", "promoted": "green", "rolled_back": "bold red"}


def _routes_table(listeners: list[dict[str, Any]]) -> Table | None:
    """Split routes (two pools or more, or a canary): live weights beside the file's, and the
    canary's state; None when there is none."""
    table = Table(title="split routes", title_justify="left")
    for col in ("listener", "route", "live", "configured", "canary", "last interval"):
        table.add_column(col)
    rows = 0
    for li in listeners:
        for r in li.get("routes") or []:
            split, canary = r["split"], r["canary"]
            if split is None or (len(split["live"]) < 2 and canary is None):
                continue
            state, figures = "-", "-"
            if canary is not None:
                style = CANARY_STYLE.get(canary["state"], "")
                step = f"step {canary['step'] + 1}/{len(canary['steps'])}"
                state = f"[{style}]{canary['state']}[/] {canary['pool']} {canary['weight']}% ({step})"
                last = canary["last"]
                if last is not None:
                    figures = f"canary {_figures(last['canary'])}; baseline {_figures(last['baseline'])}"
            table.add_row(
                li["name"], r["name"], _split(split["live"]), _split(split["configured"]), state, figures
            )
            rows += 1
    return table if rows else None


def _split(weights: dict[str, int]) -> str:
    return " ".join(f"{pool}={w}" for pool, w in weights.items())


def _figures(f: dict[str, Any]) -> str:
    p99 = "-" if f["p99_ms"] is None else f"{f['p99_ms']:.1f}ms"
    return f"{f['requests']} req {f['error_rate']:.1%} 5xx p99 {p99}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
