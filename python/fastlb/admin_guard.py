"""The admin API's gate (aiohttp middleware), in order, for every request:

1. Host in `allowed_hosts`, else 421 (DNS rebinding);
2. a state change (POST, PUT, PATCH, DELETE): same-origin only (`Origin`, `Sec-Fetch-Site`),
   the header `X-Fastlb-Admin: 1`, and a JSON body or none, else 403 / 415 (CSRF: a form or a
   `no-cors` fetch on a foreign page can set neither the header nor a JSON type);
3. with `tokens_file`, every path but `open` and the dashboard's own page needs
   `Authorization: Bearer TOKEN`: 401 without or with a wrong one, 429 while the client has
   failed too often, 403 for a `read` token on a state change;
4. each state change, done or refused (but for throttled ones), goes to the audit trail.

The config is read per request (`control.engine.config.admin`), so a reload's tokens and
hosts apply to the next request.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from fastlb.admin_auth import STATE_CHANGING, FailedAttempts, check_token, cross_site, host_allowed
from fastlb.config import Admin
from fastlb.control import ControlPlane

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ADMIN_HEADER = "X-Fastlb-Admin"
_DASHBOARD_PATHS = ("/",)  # the page itself holds no data; what it fetches needs the token


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps({"error": message}, option=orjson.OPT_INDENT_2),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _public(path: str, admin: Admin) -> bool:
    return path in admin.open or path in _DASHBOARD_PATHS or path.startswith("/static/")


def _cert_actor(request: web.Request) -> str | None:
    """`cert:CN` of a verified client certificate (mTLS), or None."""
    transport = request.transport
    sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
    if not isinstance(sslobj, ssl.SSLObject):
        return None
    cert = sslobj.getpeercert()
    if not cert:
        return None
    subject: Any = cert.get("subject", ())
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return f"cert:{value}"
    return "cert:-"


def _what(request: web.Request) -> tuple[str, str]:
    """(action, target) of a state change, from its route: `drain`, `pool/address`; `reload`, ``;
    `split`, `listener/route`; `canary/pause`, `listener/route`."""
    info = request.match_info
    segments = request.path.rstrip("/").split("/")
    action = segments[-1] if segments else request.path
    if len(segments) >= 2 and segments[-2] == "canary":
        action = f"canary/{action}"
    if "pool" in info and "address" in info:
        return action, f"{info['pool']}/{info['address']}"
    if "listener" in info and "route" in info:
        return action, f"{info['listener']}/{info['route']}"
    if not info and request.path != "/api/reload":
        return request.path, ""
    return action, ""


class Guard:
    """The middleware and what it keeps between requests (failed attempts per client)."""

    def __init__(self, control: ControlPlane, scheme: str) -> None:
        self.control = control
        self.scheme = scheme
        self.attempts = FailedAttempts()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        admin = self.control.engine.config.admin
        changing = request.method.upper() in STATE_CHANGING
        host = request.headers.get("Host")
        if not host_allowed(host, admin.hosts()):
            return _error(421, f"Host {host!r} is not in admin.allowed_hosts (DNS rebinding guard)")
        actor = _cert_actor(request) or "anonymous"
        refused = self._browser_refusal(request) if changing else None
        if refused is None:
            refused, actor = self._token_refusal(request, admin, actor)
        if refused is not None:
            if changing and refused.status != 429:
                await self._audit(request, actor, refused)
            return refused
        response = await handler(request)
        if changing:
            await self._audit(request, actor, response)
        return response

    def _browser_refusal(self, request: web.Request) -> web.Response | None:
        h = request.headers
        why = cross_site(h.get("Origin"), h.get("Sec-Fetch-Site"), h.get("Host"), self.scheme)
        if why is not None:
            return _error(403, f"cross-site request refused ({why}): state changes come from this origin")
        if h.get(ADMIN_HEADER) != "1":
            return _error(403, f'state changes need the header "{ADMIN_HEADER}: 1" (fastlb ctl sends it)')
        if request.body_exists and request.content_type != "application/json":
            kind = request.content_type
            return _error(415, f"state changes take a JSON body (Content-Type: application/json), not {kind}")
        return None

    def _token_refusal(
        self, request: web.Request, admin: Admin, actor: str
    ) -> tuple[web.Response | None, str]:
        tokens = admin.tokens
        if tokens is None or _public(request.path, admin):
            return None, actor
        client = request.remote or "-"
        wait = self.attempts.blocked_for(client)
        if wait > 0:
            retry = str(math.ceil(wait))
            message = f"too many failed tokens from {client}; retry in {retry} s"
            return _error(429, message, {"Retry-After": retry}), actor
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="fastlb"'}
        if scheme.lower() != "bearer" or not presented.strip():
            return _error(401, "a token is needed: Authorization: Bearer TOKEN", challenge), actor
        token = check_token(presented.strip(), tokens)
        if token is None:
            self.attempts.failed(client)
            return _error(401, "unknown token", challenge), actor
        if not token.may(request.method):
            message = f"token {token.name!r} has role read; {request.method} {request.path} needs operate"
            return _error(403, message), token.name
        return None, token.name

    async def _audit(self, request: web.Request, actor: str, response: web.StreamResponse) -> None:
        action, target = _what(request)
        result = "ok"
        if response.status >= 400:
            result = _message(response)
        detail = await _detail(request)
        if detail:
            target = f"{target} {detail}".strip()
        self.control.audit.record(actor, request.remote or "-", action, target, response.status, result)


def _message(response: web.StreamResponse) -> str:
    body: Any = getattr(response, "body", None)
    try:
        data = orjson.loads(body) if isinstance(body, bytes) else None
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])
    return f"HTTP {response.status}"


async def _detail(request: web.Request) -> str:
    """A small JSON body (a weight, split weights) as sent, for the audit line."""
    if not request.body_exists or request.content_type != "application/json":
        return ""
    raw = await request.read()
    try:
        return orjson.dumps(orjson.loads(raw)).decode()[:200] if len(raw) <= 4096 else ""
    except orjson.JSONDecodeError:
        return ""
