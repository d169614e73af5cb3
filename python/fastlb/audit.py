"""The audit trail: every state change asked of a running fastlb (drain, enable, disable,
weight, reload, split and canary actions, through the admin API or a signal), with who asked,
from where, and what came of it. Each is logged (logger `fastlb.audit`) and kept in a bounded
ring served at `GET /api/events`."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("fastlb.audit")

RING = 1000  # events kept for /api/events; older ones are only in the log


@dataclass(frozen=True)
class Event:
    id: int  # 1, 2, ... in the order they happened (`?since=ID` asks for the later ones)
    time: str  # ISO 8601, UTC
    actor: str  # the token's NAME, "cert:CN" (mTLS without tokens), "anonymous", or "signal"
    client: str  # the client's address, or the signal's name
    action: str  # drain, enable, disable, weight, reload, split, canary/pause, ...
    target: str  # pool/address, listener/route, or "" for reload
    status: int  # the HTTP status answered (0 for a signal)
    result: str  # "ok", or why it was refused or failed


class AuditLog:
    def __init__(self, size: int = RING) -> None:
        self._events: deque[Event] = deque(maxlen=size)
        self._next = 1

    def record(self, actor: str, client: str, action: str, target: str, status: int, result: str) -> Event:
        at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        event = Event(self._next, at, actor, client, action, target, status, result)
        self._next += 1
        self._events.append(event)
        what = f"{action} {target}".rstrip()
        level = logging.INFO if result == "ok" else logging.WARNING
        log.log(level, "audit: %s from %s: %s: %s (%d)", actor, client, what, result, status)
        return event

    def as_json(self, since: int = 0) -> dict[str, Any]:
        events = [asdict(e) for e in self._events if e.id > since]
        return {"events": events, "last_id": self._next - 1}
