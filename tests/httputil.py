"""Helpers for L7 tests: config text, raw HTTP/1.1 over sockets, http.client loops."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# --- config ---------------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """An inline TOML value (strings as basic strings, tables inline)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def pool(
    name: str,
    backends: Sequence[str | Mapping[str, Any]],
    *,
    algorithm: str = "round_robin",
    timeouts: Mapping[str, str] | None = None,
    retries: int = 2,
    health: Mapping[str, Any] | None = None,
    drain_timeout: str = "1s",
    **extra: Any,
) -> str:
    """A `[[pools]]` table; backends are addresses or backend tables; health checks off unless
    `health` is given."""
    entries = [{"address": b} if isinstance(b, str) else dict(b) for b in backends]
    lines = [
        "[[pools]]",
        f"name = {toml_value(name)}",
        f"algorithm = {toml_value(algorithm)}",
        f"health = {toml_value(health or {'type': 'none'})}",
        f"backends = {toml_value(entries)}",
        f"timeouts = {toml_value(timeouts or {'connect': '1s', 'read': '10s'})}",
        f"retries = {retries}",
        f"drain_timeout = {toml_value(drain_timeout)}",
    ]
    lines += [f"{k} = {toml_value(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def http_config(
    port: int,
    pools: Sequence[str],
    *,
    default_pool: str = "app",
    routes: Sequence[Mapping[str, Any]] = (),
    timeouts: Mapping[str, str] | None = None,
    workers: int = 2,
    admin: str = "off",
    **listener: Any,
) -> str:
    """One http listener on 127.0.0.1:port; `routes` are dicts of route keys; extra listener
    keys (rate_limit, max_headers, ...) as keyword arguments."""
    out = [
        "[runtime]",
        f"workers = {workers}",
        'cpu_affinity = "off"',
        "",
        "[admin]",
        f"bind = {toml_value(admin)}",
        "",
        "[[listeners]]",
        'name = "web"',
        f'bind = "127.0.0.1:{port}"',
        'protocol = "http"',
        f"pool = {toml_value(default_pool)}",
        f"timeouts = {toml_value(timeouts or {'client_idle': '60s', 'header_read': '10s'})}",
    ]
    out += [f"{k} = {toml_value(v)}" for k, v in listener.items()]
    for r in routes:
        out += ["", "  [[listeners.routes]]"] + [f"  {k} = {toml_value(v)}" for k, v in r.items()]
    out.append("")
    out += list(pools)
    return "\n".join(out)


# --- raw HTTP -------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    raw_head: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


class PeerClosed(Exception):
    """The peer closed (or reset) the connection before a whole response arrived."""


@dataclass
class RawConn:
    """A client socket with a read buffer: send raw bytes, parse responses one at a time."""

    port: int
    timeout: float = 10.0
    sock: socket.socket = field(init=False)
    buf: bytearray = field(default_factory=bytearray)
    reset: bool = False  # set when a read saw ECONNRESET

    def __post_init__(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        try:
            data = self.sock.recv(1 << 16)
        except ConnectionResetError:
            self.reset = True
            data = b""
        if not data:
            raise PeerClosed(bytes(self.buf))
        self.buf += data

    def read_until(self, sep: bytes) -> bytes:
        while (i := self.buf.find(sep)) < 0:
            self._fill()
        out = bytes(self.buf[:i])
        del self.buf[: i + len(sep)]
        return out

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_to_eof(self) -> bytes:
        """Everything until the peer closes (a reset counts as closed, see `.reset`)."""
        while True:
            try:
                self._fill()
            except PeerClosed:
                out = bytes(self.buf)
                self.buf.clear()
                return out

    def read_head(self) -> Response:
        head = self.read_until(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise AssertionError(f"not an HTTP/1.x status line: {lines[0]!r}")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
        return Response(int(code), reason, headers, raw_head=head)

    def read_response(self, method: str = "GET") -> Response:
        """One whole response (skipping interim 1xx other than 101), framed per RFC 9112 6.3."""
        while True:
            r = self.read_head()
            if r.status == 101 or r.status >= 200:
                break
        if method == "HEAD" or r.status < 200 or r.status in (204, 304):
            return r
        te = ",".join(r.header_all("transfer-encoding")).lower()
        if "chunked" in te:
            body = bytearray()
            while True:
                size = int(self.read_until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    while self.read_until(b"\r\n"):
                        pass
                    break
                body += self.read_exact(size)
                assert self.read_exact(2) == b"\r\n"
            r.body = bytes(body)
        elif (cl := r.header("content-length")) is not None:
            r.body = self.read_exact(int(cl))
        else:
            r.body = self.read_to_eof()
        return r

    def closed_by_peer(self) -> bool:
        """Whether the peer closed: a read gives EOF (or a reset) before the socket timeout."""
        if self.buf:
            return False
        try:
            self._fill()
        except PeerClosed:
            return True
        except TimeoutError:
            return False
        return False


def request_bytes(
    method: str = "GET",
    target: str = "/",
    headers: Sequence[tuple[str, str]] = (("Host", "test.local"),),
    body: bytes = b"",
    version: str = "HTTP/1.1",
) -> bytes:
    head = f"{method} {target} {version}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
    return head.encode("latin-1") + body


def exchange(port: int, data: bytes, *, method: str = "GET", timeout: float = 10.0) -> Response:
    """Sends raw bytes on a fresh connection and reads one response."""
    with RawConn(port, timeout) as c:
        c.send(data)
        return c.read_response(method)


# --- http.client ----------------------------------------------------------------------------


def get(
    port: int,
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    method: str = "GET",
    body: bytes | None = None,
    timeout: float = 15.0,
) -> tuple[int, dict[str, str], bytes, http.client.HTTPResponse]:
    """One request on a fresh http.client connection: (status, headers (lower-case), body, resp)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=dict(headers or {}))
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data, r
    finally:
        c.close()


def names_over(
    port: int,
    total: int,
    *,
    path: str = "/",
    threads: int = 4,
    headers: Mapping[str, str] | None = None,
) -> Counter[str]:
    """Sends `total` GETs over `threads` keep-alive connections; counts the response bodies.

    A non-200 counts as "<status>"; a failed connection raises in the caller."""
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    failures: list[BaseException] = []
    per = [total // threads + (1 if i < total % threads else 0) for i in range(threads)]

    def work(n: int) -> None:
        local: Counter[str] = Counter()
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        try:
            for _ in range(n):
                c.request("GET", path, headers=dict(headers or {}))
                r = c.getresponse()
                body = r.read()
                local[body.decode() if r.status == 200 else f"<{r.status}>"] += 1
        except BaseException as exc:
            failures.append(exc)
        finally:
            c.close()
            with lock:
                counts.update(local)

    ts = [threading.Thread(target=work, args=(n,)) for n in per]
    for t in ts:
        t.start()
    for t in ts:
        t.join(100)
    if failures:
        raise failures[0]
    return counts


class Background:
    """Runs `fn()` in a thread; `.result()` joins and returns its value or re-raises its error
    (so a failing client thread fails the test instead of warning from the thread)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:
            self._error = exc

    def result(self, timeout: float = 30.0) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("background request did not finish")
        if self._error is not None:
            raise self._error
        return self._value
