"""Real backends for tests: small threaded TCP servers on loopback.

Each server records what it saw (connections accepted, bytes received) so tests can assert what
did or did not reach a backend.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
from collections.abc import Callable

Handler = Callable[[socket.socket, "Backend"], None]


class Backend:
    """A TCP server on 127.0.0.1 with a handler run per connection in its own thread."""

    def __init__(self, handler: Handler, name: str = "") -> None:
        self.handler = handler
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port: int = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.name = name or self.address
        self.accepted = 0
        self.lock = threading.Lock()
        self._closed = False
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self._conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn, self)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        """Stop listening and close every open connection."""
        if self._closed:
            return
        self._closed = True
        # shutdown wakes the accept() blocked in the serving thread; close alone would leave
        # the socket listening until that accept returns
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self.lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()


def says_name(conn: socket.socket, backend: Backend) -> None:
    """Sends the backend's name and closes: one connection = one vote."""
    conn.sendall(backend.name.encode())


def echo(conn: socket.socket, backend: Backend) -> None:
    """Echoes everything until EOF, then half-closes."""
    while True:
        data = conn.recv(1 << 16)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def digest_after_eof(conn: socket.socket, backend: Backend) -> None:
    """Reads until the client half-closes, then replies with the sha256 of what it got plus a
    large deterministic payload: only works if the proxy forwards the half-close."""
    h = hashlib.sha256()
    while True:
        data = conn.recv(1 << 16)
        if not data:
            break
        h.update(data)
    conn.sendall(h.hexdigest().encode() + b"\n" + payload(1 << 20))


def holds_open(conn: socket.socket, backend: Backend) -> None:
    """Keeps the connection open until the peer closes it."""
    while conn.recv(1024):
        pass


def payload(n: int, seed: int = 7) -> bytes:
    """n deterministic pseudo-random bytes."""
    out = bytearray()
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:n])
