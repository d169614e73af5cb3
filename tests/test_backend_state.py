"""One owner of backend runtime state, through a real process: a backend out of rotation (disabled,
draining, drained, down by health, ejected) stays out across reloads that change its
max_connections, backup flag, weight or check, or nothing, and `/api/status` says why; a runtime
weight stays until the file's weight for that backend changes."""

from __future__ import annotations

from admin import api, backend_status
from httpbackend import HttpBackend
from httputil import get, toml_value

from conftest import free_port, wait_until
from l4util import name_then_echo, tcp_connect

# pool -> (http path prefix, or None for the tcp pool; expected state; words of the reason)
OUT = {
    "disabled": ("/disabled/", "disabled", "disabled"),
    "draining": (None, "draining", "draining"),
    "drained": ("/drained/", "drained", "drained"),
    "health": ("/health/", "down", "health checks failing: status 503"),
    "ejected": ("/ejected/", "down", "ejected by passive detection"),
    # ejected in a pool whose checks it passes: held down by the ejection, not by the checks
    "ejected-checked": ("/ejected-checked/", "down", "and 2 passing checks"),
}
EJECTED = ("ejected", "ejected-checked")
CHECKS = {"type": "http", "path": "/", "interval": "200ms", "timeout": "150ms", "rise": 2, "fall": 2}
# what each reload changes of every pool's target backend (and "check": the health pool's check)
CHANGES: list[dict[str, object]] = [
    {"max_connections": 50},
    {"backup": True},
    {"weight": 3},
    {"check": "300ms"},
    {},  # the same file again
    {"weight": 3, "max_connections": 7, "backup": True},
]


def config(
    http_port: int,
    tcp_port: int,
    admin: int,
    targets: dict[str, str],
    spares: tuple[str, str],
    change: dict[str, object],
) -> str:
    http_spare, tcp_spare = spares
    target = {k: v for k, v in change.items() if k != "check"}
    out = [
        '[runtime]\nworkers = 2\ncpu_affinity = "off"',
        f'[admin]\nbind = "127.0.0.1:{admin}"',
        f'[[listeners]]\nname = "web"\nbind = "127.0.0.1:{http_port}"\nprotocol = "http"\npool = "disabled"',
    ]
    for pool, (prefix, _, _) in OUT.items():
        if prefix is not None:
            out.append(f'  [[listeners.routes]]\n  path_prefix = "{prefix}"\n  pool = "{pool}"')
    out.append(
        f'[[listeners]]\nname = "tcp"\nbind = "127.0.0.1:{tcp_port}"\nprotocol = "tcp"\npool = "draining"'
    )
    for pool in OUT:
        spare = tcp_spare if pool == "draining" else http_spare
        backends = [{"address": targets[pool], **target}, {"address": spare}]
        lines = [
            f'[[pools]]\nname = "{pool}"',
            f"backends = {toml_value(backends)}",
            'drain_timeout = "60s"\nretries = 0\ntimeouts = { connect = "1s", read = "5s" }',
        ]
        interval = change.get("check", CHECKS["interval"])
        if pool == "health":
            lines.append(f"health = {toml_value(dict(CHECKS, interval=interval))}")
        elif pool == "ejected-checked":
            checks = dict(CHECKS, interval=interval, expect_status=[200, 500])
            lines.append(f"health = {toml_value(checks)}")
        else:
            lines.append('health = { type = "none" }')
        if pool in EJECTED:
            lines.append('passive = { consecutive_failures = 2, eject = "60s" }')
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def requests_to(b: HttpBackend) -> int:
    return sum(1 for r in b.received if r.header("user-agent") != "fastlb-health")


def test_out_of_rotation_stays_out_across_every_kind_of_reload(hb, backends, fastlb):
    http_spare = hb("spare")
    tcp_spare = backends(name_then_echo, "tcp-spare")
    targets_http = {
        "disabled": hb("disabled"),
        "drained": hb("drained"),
        "health": hb("health", status_override=503),
        "ejected": hb("ejected", status_override=500),
        "ejected-checked": hb("ejected-checked", status_override=500),
    }
    tcp_target = backends(name_then_echo, "tcp-target")
    targets = {p: b.address for p, b in targets_http.items()} | {"draining": tcp_target.address}
    http_port, tcp_port, admin = free_port(), free_port(), free_port()
    spares = (http_spare.address, tcp_spare.address)
    proc = fastlb(config(http_port, tcp_port, admin, targets, spares, {}), http_port)

    # one connection held open to the tcp target keeps its drain going
    held = []
    while not any(name == "tcp-target" for _, name in held):
        held.append(tcp_connect(tcp_port))
    for pool, action in (("disabled", "disable"), ("draining", "drain"), ("drained", "drain")):
        assert api(admin, "POST", f"/api/pools/{pool}/backends/{targets[pool]}/{action}")[0] == 200
    assert wait_until(lambda: backend_status(admin, "health", targets["health"])["state"] == "down")
    for pool in EJECTED:
        for _ in range(4):  # two 500s in a row eject it
            get(http_port, f"/{pool}/x")
        assert wait_until(lambda p=pool: backend_status(admin, p, targets[p])["ejected"], 3)

    def out_of_rotation(when: str) -> None:
        before = {p: requests_to(b) for p, b in targets_http.items()}
        for pool, (prefix, state, reason) in OUT.items():
            s = backend_status(admin, pool, targets[pool])
            assert s["state"] == state and reason in s["reason"], (when, pool, s)
            if prefix is not None:
                for _ in range(6):
                    assert get(http_port, prefix + "x")[0] == 200, (when, pool)
        for _ in range(4):
            conn, name = tcp_connect(tcp_port)
            conn.close()
            assert name == "tcp-spare", when
        assert {p: requests_to(b) for p, b in targets_http.items()} == before, when
        assert all(backend_status(admin, p, targets[p])["ejected"] for p in EJECTED), when

    out_of_rotation("before any reload")
    for change in CHANGES:
        proc.config_path.write_text(config(http_port, tcp_port, admin, targets, spares, change))
        status, body = api(admin, "POST", "/api/reload")
        assert status == 200, body
        out_of_rotation(f"after a reload changing {change or 'nothing'}")
        s = backend_status(admin, "disabled", targets["disabled"])
        assert (s["backup"], s["weight"]) == (change.get("backup", False), change.get("weight", 1)), s

    # the held connection ends: the draining backend is drained
    for conn, _ in held:
        conn.close()
    assert wait_until(lambda: backend_status(admin, "draining", targets["draining"])["state"] == "drained")


def test_a_runtime_weight_stays_until_the_files_weight_changes(hb, fastlb):
    a, b = hb("a"), hb("b")
    http_port, admin = free_port(), free_port()

    def cfg(weight_a: int) -> str:
        backends = [{"address": a.address, "weight": weight_a}, {"address": b.address}]
        return (
            f'[runtime]\nworkers = 1\n[admin]\nbind = "127.0.0.1:{admin}"\n'
            f'[[listeners]]\nname = "web"\nbind = "127.0.0.1:{http_port}"\nprotocol = "http"\npool = "app"\n'
            f'[[pools]]\nname = "app"\nhealth = {{ type = "none" }}\nbackends = {toml_value(backends)}\n'
        )

    proc = fastlb(cfg(1), http_port)
    assert api(admin, "PUT", f"/api/pools/app/backends/{a.address}/weight", {"weight": 9})[0] == 200

    def reload_with(weight_a: int) -> int:
        proc.config_path.write_text(cfg(weight_a))
        assert api(admin, "POST", "/api/reload")[0] == 200
        return int(backend_status(admin, "app", a.address)["weight"])

    assert reload_with(1) == 9, "the file's weight is unchanged: the runtime weight stays"
    assert reload_with(4) == 4, "the file's weight changed: the file wins"
    assert api(admin, "PUT", f"/api/pools/app/backends/{a.address}/weight", {"weight": 0})[0] == 200
    assert reload_with(4) == 0
    names = [get(http_port, "/")[2].decode() for _ in range(6)]
    assert set(names) == {"b"}, "weight 0: no new requests"


def test_a_pool_that_loses_its_checks_gets_its_down_backends_back(hb, fastlb):
    sick, fine = hb("sick", status_override=503), hb("fine")
    http_port, admin = free_port(), free_port()

    def cfg(health: dict[str, object]) -> str:
        backends = [{"address": sick.address}, {"address": fine.address}]
        return (
            f'[runtime]\nworkers = 1\n[admin]\nbind = "127.0.0.1:{admin}"\n'
            f'[[listeners]]\nname = "web"\nbind = "127.0.0.1:{http_port}"\nprotocol = "http"\npool = "app"\n'
            f'[[pools]]\nname = "app"\nretries = 0\nhealth = {toml_value(health)}\n'
            f"backends = {toml_value(backends)}\n"
        )

    proc = fastlb(cfg(CHECKS), http_port)
    assert wait_until(lambda: backend_status(admin, "app", sick.address)["state"] == "down")
    proc.config_path.write_text(cfg({"type": "none"}))
    assert api(admin, "POST", "/api/reload")[0] == 200
    s = backend_status(admin, "app", sick.address)
    assert s["state"] == "up" and s["reason"] == "", s
    statuses = [get(http_port, "/")[0] for _ in range(6)]
    assert statuses.count(503) == 3, "nothing checks it any more: it takes its turns again"
