"""The admin API (CONTRACT.md): aiohttp on the control plane's own event loop. A request never
runs on a worker, and what waits on the data plane (stats, reload, weights) waits in a thread,
so `/healthz` answers while a scrape or a reload is under way.

Errors are JSON objects, `{"error": "..."}`: 404 for unknown pools, backends, listeners, routes
(or a route without a canary) and paths, 400 for bad bodies, unknown canary actions and refused
reloads (with `errors`, one line per problem), 405 for a wrong method, 409 for a canary action
its state does not allow (resume a promoted canary).
Who may ask what (Host, CSRF, tokens) is fastlb.admin_guard's; the audit trail is at
`GET /api/events`.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from fastlb.admin_guard import Guard
from fastlb.canary import ACTIONS, CanaryConflict
from fastlb.config import Admin, AdminTls, Config, split_host_port
from fastlb.control import ControlPlane, ReloadError
from fastlb.metrics import render

log = logging.getLogger("fastlb.admin")

CONTROL: web.AppKey[ControlPlane] = web.AppKey("control", ControlPlane)
STATIC = Path(__file__).parent / "static"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_INDENT_2), status=status, content_type="application/json"
    )


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return _json({"error": message, **extra}, status)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 404/405 pages become JSON like every other error."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        messages = {
            404: f"no such path: {request.path}",
            405: f"{request.method} not allowed on {request.path}",
        }
        return _error(exc.status, messages.get(exc.status, exc.reason))


async def healthz(request: web.Request) -> web.Response:
    """200 only while the data plane serves every listener (keepalived's track_script and
    Kubernetes probes act on it)."""
    control = request.app[CONTROL]
    if control.stopping:
        return web.Response(text="stopping\n", status=503)
    if not control.engine.serving():
        return web.Response(text="data plane not serving every listener\n", status=503)
    return web.Response(text="ok\n")


async def status(request: web.Request) -> web.Response:
    return _json(await request.app[CONTROL].status())


def _backend_action(action: str) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        control = request.app[CONTROL]
        pool, address = request.match_info["pool"], request.match_info["address"]
        try:
            getattr(control, action)(pool, address)
        except KeyError as err:
            return _error(404, str(err.args[0]))
        return _json({"ok": True, "backend": f"{pool}/{address}", "action": action})

    return handle


async def weight(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    pool, address = request.match_info["pool"], request.match_info["address"]
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as err:
        return _error(400, f"body: not JSON ({err.msg})")
    if not isinstance(body, dict) or "weight" not in body:
        return _error(400, 'body: expected {"weight": N}')
    if set(body) - {"weight"}:
        return _error(400, f"body: unknown field {sorted(set(body) - {'weight'})[0]!r}")
    try:
        await control.set_weight(pool, address, body["weight"])
    except KeyError as err:
        return _error(404, str(err.args[0]))
    except ValueError as err:
        return _error(400, str(err))
    return _json({"ok": True, "backend": f"{pool}/{address}", "weight": body["weight"]})


async def _body(request: web.Request, shape: str) -> dict[str, Any] | web.Response:
    """The request's JSON object, or the 400 to answer."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as err:
        return _error(400, f"body: not JSON ({err.msg})")
    if not isinstance(body, dict):
        return _error(400, f"body: expected {shape}")
    return body


async def split(request: web.Request) -> web.Response:
    """PUT .../routes/{route}/split {"weights": {"v1": 50, "v2": 50}}: live split weights."""
    control = request.app[CONTROL]
    listener, route = request.match_info["listener"], request.match_info["route"]
    body = await _body(request, '{"weights": {"POOL": N, ...}}')
    if isinstance(body, web.Response):
        return body
    if "weights" not in body:
        return _error(400, 'weights: required, e.g. {"weights": {"v1": 50, "v2": 50}}')
    if set(body) - {"weights"}:
        return _error(400, f"body: unknown field {sorted(set(body) - {'weights'})[0]!r}")
    try:
        paused = await control.set_split(listener, route, body["weights"])
    except KeyError as err:
        return _error(404, str(err.args[0]))
    except ValueError as err:
        return _error(400, str(err))
    answer: dict[str, Any] = {"ok": True, "route": f"{listener}/{route}", "weights": body["weights"]}
    answer["canary_paused"] = paused
    if paused:
        answer["note"] = "the route's canary is paused (resume it to let it drive the weights again)"
    return _json(answer)


async def canary(request: web.Request) -> web.Response:
    """POST .../routes/{route}/canary/{action}: pause, resume, promote, rollback."""
    control = request.app[CONTROL]
    listener, route, action = (request.match_info[k] for k in ("listener", "route", "action"))
    if action not in ACTIONS:
        return _error(400, f"action: one of {', '.join(ACTIONS)}, not {action!r}")
    try:
        release = await control.canary(listener, route, action)
    except KeyError as err:
        return _error(404, str(err.args[0]))
    except CanaryConflict as err:
        return _error(409, str(err))
    except ValueError as err:
        return _error(400, str(err))
    return _json({"ok": True, "route": f"{listener}/{route}", "action": action, "canary": release.as_json()})


async def alerts(request: web.Request) -> web.Response:
    return _json(request.app[CONTROL].alerts.as_json())


async def events(request: web.Request) -> web.Response:
    since = request.query.get("since", "0")
    if not since.isdigit():
        return _error(400, "since: the id of the last event seen (an integer)")
    return _json(request.app[CONTROL].audit.as_json(int(since)))


async def metrics(request: web.Request) -> web.Response:
    body = render(await request.app[CONTROL].status())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def dashboard(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "dashboard.html", headers={"Cache-Control": "no-cache"})


async def reload(request: web.Request) -> web.Response:
    try:
        config = await request.app[CONTROL].reload()
    except ReloadError as err:
        for line in err.errors:
            log.error("reload refused, keeping the running config: %s", line)
        return _error(400, "reload refused; the running config is unchanged", errors=err.errors)
    return _json(
        {
            "ok": True,
            "listeners": len(config.listeners),
            "pools": len(config.pools),
            "warnings": config.warnings,
        }
    )


def build_app(control: ControlPlane, scheme: str = "http") -> web.Application:
    app = web.Application(middlewares=[Guard(control, scheme).middleware, _json_errors])
    app[CONTROL] = control
    backend = "/api/pools/{pool}/backends/{address}"
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/status", status)
    for action in ("drain", "enable", "disable"):
        app.router.add_post(f"{backend}/{action}", _backend_action(action))
    app.router.add_put(f"{backend}/weight", weight)
    route = "/api/listeners/{listener}/routes/{route}"
    app.router.add_put(f"{route}/split", split)
    app.router.add_post(f"{route}/canary/{{action}}", canary)
    app.router.add_post("/api/reload", reload)
    app.router.add_get("/api/alerts", alerts)
    app.router.add_get("/api/events", events)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", dashboard)
    app.router.add_static("/static/", STATIC)
    return app


def _load_chain(ctx: ssl.SSLContext, tls: AdminTls) -> None:
    """The certificate and key as read and checked at load (fastlb.certs), through a memfd:
    what was validated is what is served, even if the files change in between."""
    pem = tls._pem
    assert pem is not None, "parse_config reads admin.tls"
    fd = os.memfd_create("fastlb-admin-cert")
    try:
        os.write(fd, (pem.chain_pem.rstrip() + "\n" + pem.key_pem).encode())
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def tls_context(tls: AdminTls) -> ssl.SSLContext:
    """HTTPS for the admin API: TLS 1.2+ (or 1.3), HTTP/1.1; with `client_ca`, a client
    certificate signed by it is required (mTLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    _load_chain(ctx, tls)
    if tls._client_ca_pem is not None:
        ctx.load_verify_locations(cadata=tls._client_ca_pem)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _follow_reloads(control: ControlPlane, running: Admin, ctx: ssl.SSLContext | None) -> None:
    """After a reload: a new admin certificate is served to the next handshakes; what cannot
    change without a restart (bind, TLS on or off, the client CA) is logged."""

    def follow(config: Config) -> None:
        new = config.admin
        if new.bind != running.bind:
            log.warning("admin.bind: the admin API stays on %s until a restart", running.bind)
        if (new.tls is None) != (running.tls is None) or (
            new.tls is not None and running.tls is not None and new.tls.client_ca != running.tls.client_ca
        ):
            log.warning("admin.tls: turning TLS on or off, or a new client_ca, takes effect at restart")
        elif ctx is not None and new.tls is not None:
            _load_chain(ctx, new.tls)

    control.reload_hooks.append(follow)


class AdminServer:
    """The running admin API: its runner and listening sockets (which a binary upgrade hands
    to the next process)."""

    def __init__(self, runner: web.AppRunner, sockets: list[socket.socket]) -> None:
        self.runner = runner
        self.sockets = sockets

    async def stop_listening(self) -> None:
        """Stops accepting (the next process serves the address); open requests finish."""
        for site in list(self.runner.sites):
            await site.stop()

    async def cleanup(self) -> None:
        await self.runner.cleanup()


def bind_admin(bind: str) -> list[socket.socket]:
    """Listening sockets for `admin.bind`: one per address the host resolves to, as asyncio
    would bind them, but made here so that an upgrade can hand them over."""
    host, port = split_host_port(bind, bind=True)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _, addr in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            s = socket.socket(family, kind, proto)
            sockets.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(addr)
            s.listen(128)
    except OSError:
        for s in sockets:
            s.close()
        raise
    return sockets


async def start_admin(
    control: ControlPlane, admin: Admin, inherited: list[socket.socket] | None = None
) -> AdminServer:
    """Serves the admin API on `admin.bind` (host:port), on the sockets a binary upgrade
    handed over if any, until cleaned up. OSError if the address cannot be bound."""
    sockets = inherited or bind_admin(admin.bind)
    ctx = tls_context(admin.tls) if admin.tls is not None else None
    scheme = "https" if ctx is not None else "http"
    runner = web.AppRunner(build_app(control, scheme), access_log=None, handle_signals=False)
    await runner.setup()
    for s in sockets:
        await web.SockSite(runner, s, ssl_context=ctx).start()
    _follow_reloads(control, admin, ctx)
    guarded = "tokens" if admin.tokens is not None else "no tokens"
    log.info("admin API on %s://%s/ (%s)", scheme, admin.bind, guarded)
    return AdminServer(runner, sockets)
