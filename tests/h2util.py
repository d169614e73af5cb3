"""HTTP/2 clients for the h2 tests, both over plain sockets so every frame is the test's choice.

`H2Client`: a well-behaved client on the `h2` library (h2c prior knowledge, or TLS with ALPN h2):
many streams on one connection, responses with trailers and resets, GOAWAY seen as an event.

`RawH2`: frames built by hand (RFC 9113 section 4) with `hpack` for header blocks, for what the
`h2` library refuses to send (CONTINUATION floods, DATA on a closed stream, window overflow). A
reader thread takes everything the server sends: GOAWAY, RST_STREAM, response heads, DATA bytes
and the socket's end, each with the time it arrived.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types and flags
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# settings
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = range(1, 6)
# error codes
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, CANCEL, ENHANCE_YOUR_CALM = 0, 1, 3, 5, 8, 11
REFUSED_STREAM = 7


@dataclass
class H2Response:
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None  # the RST_STREAM error code, if the server reset the stream

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)

    def trailer(self, name: str) -> str | None:
        return next((v for n, v in self.trailers if n == name), None)


def connect(port: int, tls: ssl.SSLContext | None = None, sni: str = "site.test") -> socket.socket:
    """A TCP (or TLS with ALPN h2, checked) connection to 127.0.0.1:port."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is None:
        return sock
    tls.set_alpn_protocols(["h2"])
    wrapped = tls.wrap_socket(sock, server_hostname=sni)
    assert wrapped.selected_alpn_protocol() == "h2", wrapped.selected_alpn_protocol()
    return wrapped


class H2Client:
    """One HTTP/2 connection driven by the test thread (`pump` reads and handles what arrived)."""

    def __init__(
        self,
        port: int,
        tls: ssl.SSLContext | None = None,
        authority: str = "test.local",
        settings: dict[int, int] | None = None,
    ) -> None:
        self.scheme = "https" if tls is not None else "http"
        self.authority = authority
        self.sock = connect(port, tls, authority.split(":")[0])
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config)
        self.h2.initiate_connection()
        if settings:
            self.h2.update_settings(settings)
        self.responses: dict[int, H2Response] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.goaway_at: float | None = None
        self.closed = False
        self.flush()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def flush(self) -> None:
        if out := self.h2.data_to_send():
            self.sock.sendall(out)

    def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        end_stream: bool = True,
    ) -> int:
        """Opens a stream; the body (small: within the initial windows) is sent at once."""
        sid = self.h2.get_next_available_stream_id()
        head = [(":method", method), (":scheme", self.scheme), (":authority", self.authority)]
        head += [(":path", path), *(headers or [])]
        self.h2.send_headers(sid, head, end_stream=end_stream and not body)
        if body:
            self.h2.send_data(sid, body, end_stream=end_stream)
        self.responses[sid] = H2Response()
        self.flush()
        return sid

    def reset(self, sid: int, code: int = CANCEL) -> None:
        self.h2.reset_stream(sid, code)
        self.flush()

    def pump(self, timeout: float = 0.1) -> bool:
        """Reads what arrived within `timeout` and handles it; False once the socket closed."""
        if self.closed:
            return False
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready and not (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
            return True
        try:
            data = self.sock.recv(1 << 20)
        except (ConnectionError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            return False
        for ev in self.h2.receive_data(data):
            self._event(ev)
        with contextlib.suppress(OSError):
            self.flush()
        return True

    def _event(self, ev: h2.events.Event) -> None:
        r = self.responses.get(getattr(ev, "stream_id", 0) or 0)
        if isinstance(ev, h2.events.ResponseReceived) and r is not None:
            r.headers = list(ev.headers)
            r.status = int(dict(r.headers)[":status"])
        elif isinstance(ev, h2.events.TrailersReceived) and r is not None:
            r.trailers = list(ev.headers)
        elif isinstance(ev, h2.events.DataReceived):
            if r is not None:
                r.body += ev.data
            self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded) and r is not None:
            r.ended = True
        elif isinstance(ev, h2.events.StreamReset) and r is not None:
            r.reset = int(ev.error_code)
            r.ended = True
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway, self.goaway_at = ev, time.monotonic()

    def wait(self, sids: list[int] | int, timeout: float = 10) -> list[H2Response]:
        """The responses of `sids`, once each has ended (or fails after `timeout`)."""
        ids = [sids] if isinstance(sids, int) else sids
        end = time.monotonic() + timeout
        while not all(self.responses[s].ended for s in ids):
            assert time.monotonic() < end, f"streams {ids} not ended within {timeout}s"
            assert self.pump(), f"connection closed with streams {ids} open"
        return [self.responses[s] for s in ids]

    def get(self, path: str = "/", headers: list[tuple[str, str]] | None = None) -> H2Response:
        return self.wait(self.request("GET", path, headers))[0]

    def wait_goaway(self, timeout: float = 10) -> h2.events.ConnectionTerminated | None:
        end = time.monotonic() + timeout
        while self.goaway is None and time.monotonic() < end and self.pump():
            pass
        return self.goaway

    def wait_closed(self, timeout: float = 10) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.pump():
                return True
        return False


# --- frames by hand --------------------------------------------------------------------------


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def settings_frame(values: dict[int, int] | None = None, ack: bool = False) -> bytes:
    body = b"".join(struct.pack(">HI", k, v) for k, v in (values or {}).items())
    return frame(SETTINGS, ACK if ack else 0, 0, body)


def ping_frame(data: bytes = b"12345678", ack: bool = False) -> bytes:
    return frame(PING, ACK if ack else 0, 0, data)


def window_update_frame(stream: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream, struct.pack(">I", increment))


def rst_stream_frame(stream: int, code: int = CANCEL) -> bytes:
    return frame(RST_STREAM, 0, stream, struct.pack(">I", code))


def priority_frame(stream: int, depends_on: int = 0, weight: int = 15) -> bytes:
    return frame(PRIORITY, 0, stream, struct.pack(">IB", depends_on, weight))


def data_frame(stream: int, data: bytes = b"", end_stream: bool = False) -> bytes:
    return frame(DATA, END_STREAM if end_stream else 0, stream, data)


def goaway_frame(last_stream: int = 0, code: int = NO_ERROR) -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">II", last_stream, code))


@dataclass
class Frame:
    kind: int
    flags: int
    stream: int
    payload: bytes
    at: float


class RawH2:
    """A client connection that sends whatever bytes the test builds. `handshake` exchanges the
    prefaces and SETTINGS (the server's acknowledged) before the reader thread starts."""

    def __init__(self, port: int, settings: dict[int, int] | None = None, authority: str = "test.local"):
        self.authority = authority
        self.sock = connect(port)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.decoder.max_allowed_table_size = 1 << 16
        self.lock = threading.Lock()
        self.frames: list[Frame] = []
        self.heads: dict[int, list[tuple[str, str]]] = {}  # response heads by stream
        self.data_bytes: dict[int, int] = {}  # DATA payload bytes by stream
        self.bodies: dict[int, bytearray] = {}  # the first MiB of DATA by stream
        self.ended_streams: set[int] = set()  # streams the server ended (END_STREAM)
        self.resets: dict[int, int] = {}  # RST_STREAM code by stream
        self.goaway: tuple[int, int] | None = None  # (last stream id, error code)
        self.ended_at: float | None = None  # GOAWAY or the end of the socket, whichever first
        self.closed_at: float | None = None
        self.send_failed = False  # a write to the server failed: it closed or reset the connection
        self.next_stream = 1
        self._buf = bytearray()
        self._block: tuple[int, bytearray] | None = None  # a header block awaiting CONTINUATION
        self._stop = threading.Event()
        self._handshake(settings or {})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    # --- sending ----------------------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        """Writes all of `data`; False (and nothing more sent) once the server closed or reset."""
        if self.send_failed:
            return False
        try:
            with self.lock:
                self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            self.send_failed = True
            self._mark_closed()
            return False
        except TimeoutError:
            raise AssertionError("the server stopped reading for 10 s and kept the connection") from None

    def header_block(self, method: str = "GET", path: str = "/", extra: tuple[tuple[str, str], ...] = ()):
        head = [(":method", method), (":scheme", "http"), (":authority", self.authority), (":path", path)]
        return self.encoder.encode([*head, *extra])

    def headers_frame(
        self,
        stream: int,
        method: str = "GET",
        path: str = "/",
        end_stream: bool = True,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> bytes:
        flags = END_HEADERS | (END_STREAM if end_stream else 0)
        return frame(HEADERS, flags, stream, self.header_block(method, path, extra))

    def new_stream(self) -> int:
        sid, self.next_stream = self.next_stream, self.next_stream + 2
        return sid

    # --- what arrived -----------------------------------------------------------------------

    def ended(self) -> bool:
        return self.ended_at is not None

    def wait_ended(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not self.ended() and time.monotonic() < end:
            time.sleep(0.01)
        return self.ended()

    def wait_closed(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while self.closed_at is None and time.monotonic() < end:
            time.sleep(0.01)
        return self.closed_at is not None

    def wait_stream(self, stream: int, timeout: float) -> bool:
        """Whether the server ended (END_STREAM) or reset `stream` within `timeout`."""
        end = time.monotonic() + timeout
        while stream not in self.ended_streams and stream not in self.resets and time.monotonic() < end:
            time.sleep(0.01)
        return stream in self.ended_streams or stream in self.resets

    def status(self, stream: int) -> int | None:
        head = self.heads.get(stream)
        return int(dict(head)[":status"]) if head else None

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._reader.join(5)
        self.sock.close()

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals --------------------------------------------------------------------------

    def _handshake(self, settings: dict[int, int]) -> None:
        self.sock.sendall(PREFACE + settings_frame(settings))
        end = time.monotonic() + 10
        while time.monotonic() < end:
            f = self._next_frame()
            if f is None:
                raise AssertionError("the server closed during the HTTP/2 handshake")
            self.frames.append(f)  # the server's SETTINGS are what some tests look at
            if f.kind == SETTINGS and not f.flags & ACK:
                self.sock.sendall(settings_frame(ack=True))
                return
        raise AssertionError("no SETTINGS from the server")

    def _next_frame(self) -> Frame | None:
        while True:
            if len(self._buf) >= 9:
                length = int.from_bytes(self._buf[:3], "big")
                if len(self._buf) >= 9 + length:
                    kind, flags = self._buf[3], self._buf[4]
                    stream = int.from_bytes(self._buf[5:9], "big") & 0x7FFFFFFF
                    payload = bytes(self._buf[9 : 9 + length])
                    del self._buf[: 9 + length]
                    return Frame(kind, flags, stream, payload, time.monotonic())
            try:
                data = self.sock.recv(1 << 20)
            except (ConnectionError, OSError):
                data = b""
            if not data:
                return None
            self._buf += data

    def _buffered_frame(self) -> bool:
        return len(self._buf) >= 9 and len(self._buf) >= 9 + int.from_bytes(self._buf[:3], "big")

    def _read(self) -> None:
        while not self._stop.is_set():
            if not self._buffered_frame():
                ready, _, _ = select.select([self.sock], [], [], 0.1)
                if not ready:
                    continue
            f = self._next_frame()
            if f is None:
                self._mark_closed()
                return
            self._handle(f)

    def _mark_closed(self) -> None:
        now = time.monotonic()
        if self.closed_at is None:
            self.closed_at = now
        if self.ended_at is None:
            self.ended_at = now

    def _handle(self, f: Frame) -> None:
        self.frames.append(f)
        # What any client does: acknowledge the server's SETTINGS and answer its PINGs (a server
        # that shuts down gracefully may wait for a PING's answer before its last GOAWAY).
        if f.kind == SETTINGS and not f.flags & ACK:
            self.send(settings_frame(ack=True))
        elif f.kind == PING and not f.flags & ACK:
            self.send(ping_frame(f.payload, ack=True))
        if f.kind == GOAWAY and self.goaway is None:
            self.goaway = struct.unpack(">II", f.payload[:8])
            self.goaway = (self.goaway[0] & 0x7FFFFFFF, self.goaway[1])
            if self.ended_at is None:
                self.ended_at = f.at
        elif f.kind == RST_STREAM:
            self.resets[f.stream] = struct.unpack(">I", f.payload[:4])[0]
        elif f.kind == DATA:
            self.data_bytes[f.stream] = self.data_bytes.get(f.stream, 0) + len(f.payload)
            body = self.bodies.setdefault(f.stream, bytearray())
            body += f.payload[: max(0, (1 << 20) - len(body))]
        elif f.kind == HEADERS:
            payload = f.payload
            if f.flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if f.flags & PRIORITY_FLAG:
                payload = payload[5:]
            self._block = (f.stream, bytearray(payload))
        elif f.kind == CONTINUATION and self._block is not None:
            self._block[1].extend(f.payload)
        if f.kind in (DATA, HEADERS) and f.flags & END_STREAM:
            self.ended_streams.add(f.stream)
        if f.kind in (HEADERS, CONTINUATION) and f.flags & END_HEADERS and self._block is not None:
            stream, block = self._block
            self._block = None
            headers = [
                (str(n, "latin-1"), str(v, "latin-1")) for n, v in self.decoder.decode(bytes(block), raw=True)
            ]
            self.heads.setdefault(stream, headers)
