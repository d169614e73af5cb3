"""The native engine driven in-process through `fastlb.Engine`: real workers, real sockets,
and the engine's own counters."""

from __future__ import annotations

import socket
import time
import tomllib
from collections import Counter
from collections.abc import Iterator

import pytest

from fastlb import Engine
from fastlb.config import parse_config

from backends import echo, holds_open, says_name
from conftest import free_port
from l4util import ask_name, l4_config, read_all


def _engine(config_text: str) -> Engine:
    return Engine(parse_config(tomllib.loads(config_text)))


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    started: list[Engine] = []
    yield started
    for e in started:
        e.stop(0)


def _wait(predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_max_connections_refuses_the_excess_and_counts_it(backends, engines):
    b = backends(holds_open)
    port = free_port()
    engine = _engine(l4_config(port, [b.address], runtime="max_connections = 3"))
    engines.append(engine)
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    for s in held:
        s.sendall(b"x")
    assert _wait(lambda: b.accepted == 3)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
        assert read_all(extra) == b"", "the 4th connection is closed at once"
    listener = engine.stats()["listeners"][0]
    assert listener["dropped"]["max_connections"] == 1
    assert listener["connections_active"] == 3
    assert b.accepted == 3, "the refused connection never reached the backend"
    for s in held:
        s.close()
    assert _wait(lambda: engine.open_connections() == 0)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as again:
        again.sendall(b"x")
        assert _wait(lambda: b.accepted == 4), "capacity is back once connections close"


def test_no_backend_is_counted(engines):
    port = free_port()
    engine = _engine(l4_config(port, [f"127.0.0.1:{free_port()}"], pool="retries = 0"))
    engines.append(engine)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert read_all(s) == b""
    stats = engine.stats()
    assert stats["listeners"][0]["dropped"]["no_backend"] == 1
    assert stats["pools"][0]["backends"][0]["failures"]["connect"] == 1


def test_disabled_and_down_backends_get_no_new_connections(backends, engines):
    bs = [backends(says_name, f"b{i}") for i in range(3)]
    port = free_port()
    engine = _engine(l4_config(port, [b.address for b in bs]))
    engines.append(engine)
    engine.set_backend_admin("app", bs[0].address, "disabled")
    engine.set_backend_up("app", bs[1].address, False)
    assert {ask_name(port) for _ in range(30)} == {"b2"}
    state = {b["address"]: b["state"] for b in engine.stats()["pools"][0]["backends"]}
    assert state == {bs[0].address: "disabled", bs[1].address: "down", bs[2].address: "up"}
    engine.set_backend_admin("app", bs[0].address, "enabled")
    engine.set_backend_up("app", bs[1].address, True)
    assert {ask_name(port) for _ in range(30)} == {"b0", "b1", "b2"}


def test_live_weight_change_rebuilds_round_robin(backends, engines):
    bs = [backends(says_name, f"b{i}") for i in range(2)]
    port = free_port()
    engine = _engine(l4_config(port, [b.address for b in bs]))
    engines.append(engine)
    engine.set_backend_weight("app", bs[0].address, 3)
    counts = Counter(ask_name(port) for _ in range(400))
    assert counts == {"b0": 300, "b1": 100}
    with pytest.raises(KeyError, match="no backend"):
        engine.set_backend_weight("app", "127.0.0.1:1", 3)
    with pytest.raises(KeyError, match="unknown pool"):
        engine.set_backend_admin("nope", bs[0].address, "disabled")


def test_update_swaps_pools_and_keeps_open_connections(backends, engines):
    old, new = backends(echo, "old"), backends(says_name, "new")
    port = free_port()
    engine = _engine(l4_config(port, [old.address]))
    engines.append(engine)
    held = socket.create_connection(("127.0.0.1", port))
    held.sendall(b"x")
    assert _wait(lambda: old.accepted == 1)
    engine.update(parse_config(tomllib.loads(l4_config(port, [new.address]))))
    assert ask_name(port) == "new"
    held.settimeout(5)
    assert held.recv(10) == b"x"
    held.sendall(b"still here")
    assert held.recv(100) == b"still here", "the connection opened before the update still works"
    held.close()


def test_backend_state_survives_an_update(backends, engines):
    bs = [backends(says_name, f"b{i}") for i in range(2)]
    port = free_port()
    engine = _engine(l4_config(port, [b.address for b in bs]))
    engines.append(engine)
    engine.set_backend_admin("app", bs[0].address, "draining")
    engine.update(parse_config(tomllib.loads(l4_config(port, [b.address for b in bs], pool="retries = 1"))))
    states = {b["address"]: b["state"] for b in engine.stats()["pools"][0]["backends"]}
    assert states[bs[0].address] in ("draining", "drained")
    assert {ask_name(port) for _ in range(10)} == {"b1"}
