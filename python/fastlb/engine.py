"""The control plane's handle on the data plane: config in as JSON, decisions and stats across.

The engine owns every backend's runtime state (admin state, health verdict, weight), keyed by
its id `pool/address` and kept across reloads; the control plane reads it here rather than
keeping a copy. Calls that can wait (`update`, `stats`, `set_backend_weight`,
`set_split_weights`, `stop`) are for a thread, never the event loop: see `fastlb.control`.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, cast

import orjson

from fastlb import _native
from fastlb.config import Config

AdminState = Literal["enabled", "draining", "disabled"]


class BackendRuntime(NamedTuple):
    """A backend's runtime state as the engine holds it."""

    admin: AdminState
    up: bool  # the health verdict: active checks and passive ejection
    weight: int
    scale: int  # slow start: the share of `weight` it gets now, per mille (1000 = all)


class Engine:
    """Running workers and listeners for one `Config`. Every call returns quickly: the data plane
    applies changes by swapping tables, never by stopping workers."""

    def __init__(
        self,
        config: Config,
        inherited: dict[str, list[int]] | None = None,
        ticket_keys: bytes | None = None,
    ) -> None:
        """`inherited` and `ticket_keys`: what a binary upgrade handed over (the listening
        sockets' fds by listener name, which the engine then owns, and the TLS ticket keys)."""
        self.config = config
        self._spec = config.to_engine()
        self._native = _native.Engine(orjson.dumps(self._spec).decode(), inherited, ticket_keys)
        # Changes applied so far (a reload, a backend's state or weight, split weights), counted
        # once each returns: a stats snapshot begun before the count moved may predate one.
        self.writes = 0

    def handover(self) -> tuple[dict[str, list[int]], bytes]:
        """Every listening socket's fd by listener name (still the engine's) and the TLS ticket
        keys: what the next process needs at a binary upgrade."""
        return self._native.handover()

    def serving(self) -> bool:
        """Whether every worker runs and every listener listens; never waits."""
        return self._native.serving()

    def update(self, config: Config) -> None:
        """Swap in a new config; listeners that stay keep their sockets."""
        spec = config.to_engine()
        self._native.update(orjson.dumps(spec).decode())
        self.config, self._spec = config, spec
        self.writes += 1

    @property
    def spec(self) -> dict[str, Any]:
        """The engine JSON (as a dict) of the running config: resolved addresses included."""
        return self._spec

    def stop(self, grace_s: float) -> None:
        """Stop accepting, let open connections finish for up to `grace_s`, close the rest."""
        self._native.stop(grace_s)

    def stats(self) -> dict[str, Any]:
        """A snapshot of every counter; waits up to 250 ms for the workers (call it in a thread)."""
        result: dict[str, Any] = orjson.loads(self._native.stats())
        return result

    def backend_state(self, pool: str, address: str) -> BackendRuntime:
        """The backend's runtime state now; KeyError if the running config lacks it."""
        admin, up, weight, scale = self._native.backend_state(pool, address)
        return BackendRuntime(cast(AdminState, admin), up, weight, scale)

    def open_connections(self) -> int:
        return self._native.open_connections()

    def set_backend_up(self, pool: str, address: str, up: bool) -> None:
        self._native.set_backend_up(pool, address, up)
        self.writes += 1

    def set_backend_admin(self, pool: str, address: str, state: AdminState) -> None:
        self._native.set_backend_admin(pool, address, state)
        self.writes += 1

    def set_backend_weight(self, pool: str, address: str, weight: int) -> None:
        self._native.set_backend_weight(pool, address, weight)
        self.writes += 1

    def set_split_weights(self, listener: str, route: str, weights: dict[str, int]) -> None:
        """Live weights of a split route (`route`: its name, or its index as a string), one per
        pool of its split; they apply to the next request on every worker and stay across a
        reload that keeps the route's split as it was (else the file wins). KeyError for an
        unknown listener or route, ValueError for a redirect route, pools that are not exactly
        the split's, a weight above 1000, or all weights 0. Rebuilds tables: call it in a thread."""
        self._native.set_split_weights(listener, route, list(weights.items()))
        self.writes += 1

    def set_backend_scale(self, pool: str, address: str, per_mille: int) -> None:
        """Slow start: the share of its weight the backend gets now (1000 = all of it)."""
        self._native.set_backend_scale(pool, address, per_mille)
        self.writes += 1

    def backend_active(self, pool: str, address: str) -> int:
        """Connections (tcp) or requests (http) open to the backend now; KeyError if unknown."""
        return self._native.backend_active(pool, address)

    def close_backend(self, pool: str, address: str) -> None:
        """Closes every open connection to the backend (a drain that reached its timeout)."""
        self._native.close_backend(pool, address)

    def reopen_access_log(self) -> None:
        """Reopens the access log file (SIGUSR1, after logrotate moved it)."""
        self._native.reopen_access_log()

    def take_ejected(self) -> list[str]:
        """Ids (`pool/address`) of backends passive detection ejected since the last call."""
        return self._native.take_ejected()

    def drain_timeout_s(self) -> float:
        """The longest `drain_timeout` of any pool: how long a graceful stop may wait."""
        return max((p.drain_timeout.seconds for p in self.config.pools), default=0.0)
