"""A real HTTP/2-only backend for the h2 pool tests: asyncio + the `h2` library, in its own thread.

It speaks nothing but HTTP/2 (h2c prior knowledge, or TLS with ALPN h2): an HTTP/1.1 request
fails the connection preface and is counted in `bad`, so a test that gets an answer from it knows
fastlb spoke HTTP/2 upstream. Flow control is honoured both ways (bodies of any size), and only
requests that arrived whole are recorded.

Answers per path, like tests/httpbackend.py (every response carries `x-backend: <name>`):
    /headers      200, JSON list of [name, value] as received, pseudo-headers included
    /echo         200, the request body
    /big/N        200, N bytes of `payload(N)`
    /sleep/MS     waits MS milliseconds, then like default
    /status/NNN   status NNN, body name
    /trailers     200, body name, then trailers `x-trailer: done`
    /reset        200 and the first bytes of a body, then RST_STREAM INTERNAL_ERROR
    anything else 200, body name
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from backends import payload

__all__ = ["H2Backend", "H2Request"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
WINDOW = 1 << 24  # stream and connection receive windows: no throttle on uploads


@dataclass
class H2Request:
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]

    @property
    def method(self) -> str:
        return self.header(":method") or ""

    @property
    def path(self) -> str:
        return self.header(":path") or ""


@dataclass
class _Stream:
    headers: list[tuple[str, str]]
    body: bytearray = field(default_factory=bytearray)
    task: asyncio.Task[None] | None = None


class H2Backend:
    """An HTTP/2 server on 127.0.0.1 (ephemeral port unless `port`), every connection a task."""

    def __init__(self, name: str = "", tls: ssl.SSLContext | None = None, port: int = 0) -> None:
        if tls is not None:
            tls.set_alpn_protocols(["h2"])
        self.lock = threading.Lock()
        self.connections = 0
        self.bad = 0  # connections that did not open with the HTTP/2 preface
        self.resets = 0  # streams the client (fastlb) reset
        self.errors: list[str] = []
        self._received: list[H2Request] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._writers: set[asyncio.StreamWriter] = set()
        start = asyncio.start_server(self._serve, "127.0.0.1", port, ssl=tls, reuse_address=True)
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result(10)
        self.port: int = self.server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.name = name or self.address

    @property
    def received(self) -> list[H2Request]:
        with self.lock:
            return list(self._received)

    def paths(self) -> list[str]:
        return [r.path for r in self.received]

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for w in list(self._writers):
                w.close()
            await asyncio.sleep(0)

        if self.loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()

    # --- one connection ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.lock:
            self.connections += 1
        self._writers.add(writer)
        try:
            try:
                first = await reader.readexactly(len(PREFACE))
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if first != PREFACE:
                with self.lock:
                    self.bad += 1
                return
            await _Connection(self, reader, writer).run(first)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except Exception as exc:  # recorded, so the test fails instead of a warning from the loop
            with self.lock:
                self.errors.append(repr(exc))
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _Connection:
    def __init__(self, backend: H2Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.b, self.reader, self.writer = backend, reader, writer
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config)
        self.streams: dict[int, _Stream] = {}
        self.window_open = asyncio.Event()  # set at every WINDOW_UPDATE or SETTINGS change

    async def run(self, preface: bytes) -> None:
        self.h2.initiate_connection()
        self.h2.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000,
            }
        )
        self.h2.increment_flow_control_window(WINDOW - 65535)
        self.feed(preface)
        await self.flush()
        while True:
            data = await self.reader.read(1 << 16)
            if not data:
                return
            if not self.feed(data):
                await self.flush()
                return
            await self.flush()

    async def flush(self) -> None:
        if out := self.h2.data_to_send():
            self.writer.write(out)
            await self.writer.drain()

    def feed(self, data: bytes) -> bool:
        """Hands bytes to h2 and acts on its events; False once the connection is over."""
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            with self.b.lock:
                self.b.errors.append(f"protocol error from the client: {exc!r}")
            return False
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                self.streams[ev.stream_id] = _Stream(list(ev.headers))
            elif isinstance(ev, h2.events.DataReceived):
                if s := self.streams.get(ev.stream_id):
                    s.body += ev.data
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                if s := self.streams.get(ev.stream_id):
                    s.task = asyncio.ensure_future(self.respond(ev.stream_id, s))
            elif isinstance(ev, h2.events.StreamReset):
                with self.b.lock:
                    self.b.resets += 1
                if (s := self.streams.pop(ev.stream_id, None)) and s.task:
                    s.task.cancel()
                self.window_open.set()
            elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self.window_open.set()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                return False
        return True

    async def respond(self, stream_id: int, s: _Stream) -> None:
        req = H2Request(s.headers, bytes(s.body))
        with self.b.lock:
            self.b._received.append(req)
        name = self.b.name.encode()
        path = req.path.split("?", 1)[0]
        status, body, trailers = 200, name, None
        extra: list[tuple[str, str]] = []
        if path == "/headers":
            body = json.dumps([[n, v] for n, v in req.headers]).encode()
            extra.append(("content-type", "application/json"))
        elif path == "/echo":
            body = req.body
        elif path.startswith("/big/"):
            body = payload(int(path.split("/")[2]))
        elif path.startswith("/sleep/"):
            await asyncio.sleep(int(path.split("/")[2]) / 1000)
        elif path.startswith("/status/"):
            status = int(path.split("/")[2])
        elif path == "/trailers":
            trailers = [("x-trailer", "done")]
        elif path == "/reset":
            await self.reset_midway(stream_id)
            return
        headers = [(":status", str(status)), ("x-backend", self.b.name), *extra]
        headers.append(("content-length", str(len(body))))
        try:
            self.h2.send_headers(stream_id, headers, end_stream=not body and trailers is None)
            await self.flush()
            await self.send_body(stream_id, body, end=trailers is None)
            if trailers is not None:
                self.h2.send_headers(stream_id, trailers, end_stream=True)
                await self.flush()
        except (h2.exceptions.StreamClosedError, KeyError):
            pass  # reset by the client meanwhile
        finally:
            self.streams.pop(stream_id, None)

    async def reset_midway(self, stream_id: int) -> None:
        self.h2.send_headers(stream_id, [(":status", "200"), ("x-backend", self.b.name)])
        self.h2.send_data(stream_id, b"partial")
        await self.flush()
        await asyncio.sleep(0.05)
        self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        self.streams.pop(stream_id, None)
        await self.flush()

    async def send_body(self, stream_id: int, body: bytes, end: bool) -> None:
        view, sent = memoryview(body), 0
        while sent < len(body):
            room = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
            if room <= 0:
                self.window_open.clear()
                await self.window_open.wait()
                continue
            chunk = view[sent : sent + room]
            sent += len(chunk)
            self.h2.send_data(stream_id, bytes(chunk), end_stream=end and sent == len(body))
            await self.flush()
