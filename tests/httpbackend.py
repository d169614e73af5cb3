"""A real HTTP/1.1 backend for L7 tests: a threaded raw-socket server that records what it got.

Not http.server: request framing (Content-Length, chunked, keep-alive) and response framing
(Content-Length, chunked, until-close, no body) are under the test's control. Only requests that
arrived whole (head and body) are recorded in `received`; anything the backend could not parse
is counted in `bad` and answered 400 + close, so a framing error that a proxy let through is
visible to the test.

Answers per path (every response carries `X-Backend: <name>`):
    /headers        200, JSON list of [name, value] as received (order and case kept)
    /echo           200, the request body
    /chunked        200, chunked: "part1", "part2", name
    /until-close    200, no Content-Length nor chunked: the body, then close
    /sleep/MS       waits MS milliseconds, then like default
    /status/NNN     status NNN, body name (1xx/204/304: no body)
    /die            records the request, then closes without answering
    /ws             with `Upgrade: websocket`: 101, then echoes raw bytes until EOF; else 200
                    "no-upgrade"
    /big/N          200, N bytes of `payload(N)`
    anything else   200, body name
HEAD gets the headers a GET would get and no body. `status_override` answers every request
(except /die) with that status and body name. `fail_every = N` answers every Nth request (1st,
N+1th, ...) with 500 instead (a canary that fails some of its requests); `delay_ms` waits that
long before every answer (a slow backend). `mode="reset"` resets every accepted connection
at once (SO_LINGER 0).
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
import threading
from dataclasses import dataclass, field
from http import HTTPStatus

from backends import payload

__all__ = ["HttpBackend", "Request", "payload"]

_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The first value of `name` (case-insensitive), or None."""
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


class _BadRequest(Exception):
    pass


class _Closed(Exception):
    pass


@dataclass
class _Conn:
    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)

    def fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise _Closed
        self.buf += data

    def read_until(self, sep: bytes, limit: int) -> bytes:
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + len(sep)]
                return out
            if len(self.buf) > limit:
                raise _BadRequest("line too long")
            self.fill()

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


def _status_line(code: int) -> bytes:
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = "Status"
    return f"HTTP/1.1 {code} {phrase}\r\n".encode()


class HttpBackend:
    """An HTTP/1.1 server on 127.0.0.1 (or `host`; ephemeral port), one thread per connection."""

    def __init__(
        self,
        name: str = "",
        mode: str = "normal",
        status_override: int | None = None,
        port: int = 0,
        tls: ssl.SSLContext | None = None,
        fail_every: int = 0,
        delay_ms: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        self.fail_every = fail_every
        self.delay_s = delay_ms / 1000
        self._answered = 0
        self.tls = tls  # serve HTTPS: each accepted socket is wrapped (its handshake in its thread)
        self.tls_resumed: list[bool] = []  # per TLS connection: whether its session was resumed
        if mode not in ("normal", "reset", "one-shot"):
            raise ValueError(f"mode must be 'normal', 'reset' or 'one-shot', not {mode!r}")
        self.mode = mode
        self.status_override = status_override
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # a fixed port restarts a closed backend
        self.sock.listen(1024)
        self.port: int = self.sock.getsockname()[1]
        self.address = f"{host}:{self.port}"
        self.name = name or self.address
        self.connections = 0
        self.bad = 0  # requests the backend could not parse (should stay 0 behind a proxy)
        self.errors: list[str] = []
        self._received: list[Request] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._serve, daemon=True)
        self._accept_thread.start()

    # --- what tests read ------------------------------------------------------------------

    @property
    def received(self) -> list[Request]:
        with self.lock:
            return list(self._received)

    def paths(self) -> list[str]:
        return [r.target for r in self.received]

    # --- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop listening (new connects are refused at once) and close every open connection."""
        self._shutdown(reset=False)

    def kill(self) -> None:
        """Like close, but open connections are reset (RST), requests in flight unanswered."""
        self._shutdown(reset=True)

    def _shutdown(self, reset: bool) -> None:
        first = not self._stop.is_set()
        self._stop.set()
        if first:
            # shutdown wakes the blocked accept() and takes the socket out of LISTEN at once
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
        with self.lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for c in conns:
            with contextlib.suppress(OSError):
                if reset:
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    c.shutdown(socket.SHUT_RD)  # wakes recv; the handler closes -> RST
                else:
                    c.shutdown(socket.SHUT_RDWR)
        self._accept_thread.join(5)
        for t in threads:
            t.join(5)

    # --- serving --------------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            if self.mode == "reset":
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                conn.close()
                continue
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            with self.lock:
                self._conns.add(conn)
                self._threads.append(t)
            t.start()

    def _run(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw = sock
        try:
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError):
                    sock.close()  # a client that refused our certificate: not a handler error
                    return
                with self.lock:
                    self.tls_resumed.append(sock.session_reused)
            conn = _Conn(sock)
            while not self._stop.is_set():
                # one-shot: close after each answer without saying so (a keep-alive timeout
                # racing the proxy's next request on the connection)
                if not self._one(conn) or self.mode == "one-shot":
                    break
        except (_Closed, OSError):
            pass
        except _BadRequest as exc:
            with self.lock:
                self.bad += 1
            with contextlib.suppress(OSError):
                body = f"backend: bad request: {exc}".encode()
                sock.sendall(
                    _status_line(400)
                    + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
        except Exception as exc:  # never let a thread die with an unhandled error under pytest
            with self.lock:
                self.errors.append(repr(exc))
        finally:
            with self.lock:
                self._conns.discard(raw)
            if self._stop.is_set():
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()

    def _read_request(self, conn: _Conn) -> Request:
        # tolerate empty lines before a request (RFC 9112 2.2)
        line = b""
        while not line:
            line = conn.read_until(b"\r\n", 1 << 20)
        parts = line.decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(f"request line {line!r}")
        method, target, version = parts
        headers: list[tuple[str, str]] = []
        while True:
            raw = conn.read_until(b"\r\n", 1 << 20)
            if not raw:
                break
            if raw[:1] in (b" ", b"\t") or b":" not in raw:
                raise _BadRequest(f"header line {raw!r}")
            name, _, value = raw.decode("latin-1").partition(":")
            if not name or name != name.strip():
                raise _BadRequest(f"header name {name!r}")
            headers.append((name, value.strip(" \t")))
        req = Request(method, target, version, headers)
        te = [v.strip().lower() for v in req.header_all("transfer-encoding")]
        cl = req.header_all("content-length")
        if te and cl:
            raise _BadRequest("both Content-Length and Transfer-Encoding")
        if te:
            if te != ["chunked"]:
                raise _BadRequest(f"transfer-encoding {te}")
            req.body = self._read_chunked(conn)
        elif cl:
            if len(cl) != 1 or not cl[0].isdigit():
                raise _BadRequest(f"content-length {cl}")
            req.body = conn.read_exact(int(cl[0]))
        return req

    @staticmethod
    def _read_chunked(conn: _Conn) -> bytes:
        body = bytearray()
        while True:
            size_line = conn.read_until(b"\r\n", 4096).split(b";", 1)[0].strip()
            if not size_line or len(size_line) > 16:
                raise _BadRequest(f"chunk size {size_line!r}")
            try:
                size = int(size_line, 16)
            except ValueError:
                raise _BadRequest(f"chunk size {size_line!r}") from None
            if size == 0:
                while conn.read_until(b"\r\n", 1 << 16):  # trailers
                    pass
                return bytes(body)
            body += conn.read_exact(size)
            if conn.read_exact(2) != b"\r\n":
                raise _BadRequest("chunk not followed by CRLF")

    def _one(self, conn: _Conn) -> bool:
        """Serves one request; returns whether the connection stays open."""
        req = self._read_request(conn)
        with self.lock:
            self._received.append(req)
        tokens = {t.strip().lower() for v in req.header_all("connection") for t in v.split(",")}
        keep = "keep-alive" in tokens if req.version == "HTTP/1.0" else "close" not in tokens
        head_only = req.method == "HEAD"
        path = req.path
        name = self.name.encode()
        extra: list[tuple[str, str]] = []

        if path == "/die":
            return False
        if self.delay_s and self._stop.wait(self.delay_s):
            return False
        if self.fail_every:
            with self.lock:
                self._answered += 1
                fail = self._answered % self.fail_every == 1 % self.fail_every
            if fail:
                return self._respond(conn, 500, name, keep, head_only)
        if self.status_override is not None:
            return self._respond(conn, self.status_override, name, keep, head_only)
        if path.startswith("/sleep/"):
            if self._stop.wait(int(path.split("/")[2]) / 1000):
                return False  # closed or killed while "working": no answer
            return self._respond(conn, 200, name, keep, head_only)
        if path == "/headers":
            body = json.dumps([[n, v] for n, v in req.headers]).encode()
            extra.append(("Content-Type", "application/json"))
            return self._respond(conn, 200, body, keep, head_only, extra)
        if path == "/echo":
            return self._respond(conn, 200, req.body, keep, head_only)
        if path.startswith("/status/"):
            return self._respond(conn, int(path.split("/")[2]), name, keep, head_only)
        if path.startswith("/big/"):
            return self._respond(conn, 200, payload(int(path.split("/")[2])), keep, head_only)
        if path == "/chunked":
            head = f"X-Backend: {self.name}\r\nTransfer-Encoding: chunked\r\n"
            if not keep:
                head += "Connection: close\r\n"
            out = _status_line(200) + head.encode() + b"\r\n"
            if not head_only:
                for part in (b"part1", b"part2", name):
                    out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
                out += b"0\r\n\r\n"
            conn.sock.sendall(out)
            return keep
        if path == "/until-close":
            head = _status_line(200) + f"X-Backend: {self.name}\r\nConnection: close\r\n\r\n".encode()
            conn.sock.sendall(head if head_only else head + b"until-close:" + name)
            return False
        if path == "/ws":
            upgrade = (req.header("upgrade") or "").lower() == "websocket"
            if not upgrade:
                return self._respond(conn, 200, b"no-upgrade", keep, head_only)
            conn.sock.sendall(
                _status_line(101)
                + f"X-Backend: {self.name}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".encode()
            )
            if conn.buf:
                conn.sock.sendall(bytes(conn.buf))
                conn.buf.clear()
            while data := conn.sock.recv(1 << 16):
                conn.sock.sendall(data)
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
            return False
        return self._respond(conn, 200, name, keep, head_only)

    def _respond(
        self,
        conn: _Conn,
        status: int,
        body: bytes,
        keep: bool,
        head_only: bool,
        extra: list[tuple[str, str]] | None = None,
    ) -> bool:
        headers = [("X-Backend", self.name), *(extra or [])]
        no_body = status < 200 or status in (204, 304)
        if not no_body:
            headers.append(("Content-Length", str(len(body))))
        headers.append(("Connection", "keep-alive" if keep else "close"))
        head = _status_line(status) + "".join(f"{n}: {v}\r\n" for n, v in headers).encode() + b"\r\n"
        conn.sock.sendall(head if (no_body or head_only) else head + body)
        return keep
