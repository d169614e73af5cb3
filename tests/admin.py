"""Helpers for control-plane tests: admin API calls and a steady stream of keep-alive requests."""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def api(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One admin API call: (status, decoded JSON, or the text for non-JSON answers). It is sent
    as `fastlb ctl` sends it (`X-Fastlb-Admin: 1`, a JSON body, the token if any); `headers`
    add to or replace those (a value of None removes one)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        sent = {"X-Fastlb-Admin": "1"}
        if data is not None:
            sent["Content-Type"] = "application/json"
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        sent.update(headers or {})
        c.request(method, path, body=data, headers={k: v for k, v in sent.items() if v is not None})
        r = c.getresponse()
        raw = r.read()
        if (r.getheader("content-type") or "").startswith("application/json"):
            return r.status, json.loads(raw)
        return r.status, raw.decode()
    finally:
        c.close()


def backend_status(port: int, pool: str, address: str) -> dict[str, Any]:
    status, body = api(port, "GET", "/api/status")
    assert status == 200, body
    for p in body["pools"]:
        if p["name"] == pool:
            for b in p["backends"]:
                if b["address"] == address:
                    return dict(b)
    raise AssertionError(f"{pool}/{address} not in /api/status")


def state_of(port: int, pool: str, address: str) -> str:
    return str(backend_status(port, pool, address)["state"])


@dataclass
class Outcome:
    at: float  # time.monotonic() when the response (or failure) arrived
    status: int  # 0 for a failure (exception)
    backend: str  # X-Backend, or the error
    path: str


@dataclass
class Stream:
    """`threads` clients, each sending GETs on one keep-alive connection until `stop()` (or
    `limit_s`, whichever is first); a failure (exception) is recorded and the client reconnects."""

    port: int
    threads: int = 4
    paths: tuple[str, ...] = ("/",)
    limit_s: float = 30.0
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Stream:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            self._workers.append(t)
            t.start()
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._workers:
            t.join(20)
        return self.results()

    def results(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def failures(self) -> list[Outcome]:
        return [o for o in self.results() if o.status != 200]

    def _run(self, index: int) -> None:
        end = time.monotonic() + self.limit_s
        conn: http.client.HTTPConnection | None = None
        n = index
        while not self._stop.is_set() and time.monotonic() < end:
            path = self.paths[n % len(self.paths)]
            n += 1
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                conn.request("GET", path)
                r = conn.getresponse()
                r.read()
                o = Outcome(time.monotonic(), r.status, r.getheader("x-backend") or "", path)
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                o = Outcome(time.monotonic(), 0, repr(exc), path)
                conn.close()
                conn = None
            with self._lock:
                self.outcomes.append(o)
        if conn is not None:
            conn.close()


def scrape(admin: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    status, text = api(admin, "GET", "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


DASHBOARD = Path(__file__).resolve().parent.parent / "python" / "fastlb" / "static" / "dashboard.html"


class FakeAdmin:
    """Serves the dashboard and a fixed /api/status on loopback (for dashboard tests in a real browser)."""

    def __init__(self, status: dict[str, Any]) -> None:
        body = json.dumps(status).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/":
                    data, kind = DASHBOARD.read_bytes(), "text/html"
                else:
                    data, kind = (body if self.path == "/api/status" else b"[]"), "application/json"
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
