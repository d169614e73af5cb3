"""The admin API (CONTRACT.md): aiohttp on the control plane's own event loop. A request never
runs on a worker, and what waits on the data plane (stats, reload, weights) waits in a thread,
so `/healthz` answers while a scrape or a reload is under way.

Errors are JSON objects, `{"error": "..."}`: 404 for unknown pools, backends and paths, 400 for
bad bodies and refused reloads (with `errors`, one line per problem), 405 for a wrong method.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from fastlb.config import split_host_port
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
    if request.app[CONTROL].stopping:
        return web.Response(text="stopping\n", status=503)
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


async def alerts(request: web.Request) -> web.Response:
    return _json(request.app[CONTROL].alerts.as_json())


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


def build_app(control: ControlPlane) -> web.Application:
    app = web.Application(middlewares=[_json_errors])
    app[CONTROL] = control
    backend = "/api/pools/{pool}/backends/{address}"
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/status", status)
    for action in ("drain", "enable", "disable"):
        app.router.add_post(f"{backend}/{action}", _backend_action(action))
    app.router.add_put(f"{backend}/weight", weight)
    app.router.add_post("/api/reload", reload)
    app.router.add_get("/api/alerts", alerts)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", dashboard)
    app.router.add_static("/static/", STATIC)
    return app


async def start_admin(control: ControlPlane, bind: str) -> web.AppRunner:
    """Serves the admin API on `bind` (host:port) until the runner is cleaned up."""
    host, port = split_host_port(bind, bind=True)
    runner = web.AppRunner(build_app(control), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    log.info("admin API on http://%s/", bind)
    return runner
