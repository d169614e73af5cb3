"""Binary upgrade through real processes (docs/upgrade.md): SIGUSR2 or `fastlb upgrade` makes
the running `fastlb serve` start a new one and hand it every listening socket (http, https, tcp,
udp, the admin API) and the TLS ticket keys; the new one writes the pid file, the old one drains
and exits. Load runs throughout: fresh HTTP connections, keep-alive HTTP, TCP echo streams and
UDP datagrams, and every refused, reset or unanswered one is counted.

FASTLB_UPGRADE_ROUNDS (default 20, the issue's figure) sets how many upgrades in a row.
"""

from __future__ import annotations

import configparser
import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from h2util import NO_ERROR, RawH2

from backends import Backend
from conftest import free_port, wait_port, wait_until
from l4util import name_then_echo, tcp_connect
from udputil import EchoBackend, free_udp_port

ROUNDS = int(os.environ.get("FASTLB_UPGRADE_ROUNDS", "20"))
LOAD_LIMIT_S = 300.0  # every load loop ends by then whatever happens


def running(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: processes of earlier upgrades are re-parented,
    and who reaps them is not this test's business)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Upgradable:
    """`fastlb serve` of a config in `folder`, whatever its pid is now. Output goes to a file:
    each process an upgrade starts inherits it (a pipe would outlive the first one)."""

    def __init__(self, folder: Path, config: str, port: int, env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.config_path = folder / "fastlb.toml"
        self.config_path.write_text(config)
        self.pid_file = folder / "fastlb.pid"
        self.log_path = folder / "fastlb.log"
        self.pids: list[int] = []
        with self.log_path.open("ab") as log:
            self.first = subprocess.Popen(
                [sys.executable, "-m", "fastlb", "serve", "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
            )
        alive = lambda: self.first.poll() is None  # noqa: E731
        try:
            wait_port(port, alive=alive)
            assert wait_until(lambda: self._pid() == self.first.pid, 15), "no pid file"
        except (TimeoutError, AssertionError):
            self.stop()
            raise AssertionError(f"fastlb did not start: {self.log()}") from None
        self.pids.append(self.first.pid)

    def _pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.pid_file.read_text())
        return None

    def pid(self) -> int:
        pid = self._pid()
        assert pid is not None, f"no pid in {self.pid_file}: {self.log()}"
        return pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def upgrade(self, via: str = "signal") -> tuple[int, int]:
        """One upgrade, by SIGUSR2 or by `fastlb upgrade`; returns (old pid, new pid) once the
        pid file names a new running process."""
        old = self.pid()
        if via == "cli":
            done = fastlb_cli("upgrade", "--pid-file", str(self.pid_file))
            assert done.returncode == 0, done.stderr + self.log()
            match = re.fullmatch(r"upgraded: pid (\d+) -> (\d+) .*\n", done.stdout)
            assert match, done.stdout
            assert int(match[1]) == old
        else:
            os.kill(old, signal.SIGUSR2)
            assert wait_until(lambda: self._pid() not in (None, old), 40), self.log()
        new = self.pid()
        assert new != old and running(new), self.log()
        self.pids.append(new)
        return old, new

    def stop(self) -> None:
        """SIGTERM to every process this config ran that still runs."""
        for pid in {*self.pids, self.first.pid, self._pid() or self.first.pid}:
            with contextlib.suppress(ProcessLookupError):
                if running(pid):
                    os.kill(pid, signal.SIGTERM)
        if not wait_until(lambda: not any(running(p) for p in self.pids), 30):
            for pid in self.pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.first.wait(10)


def fastlb_cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastlb", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def upgradable(tmp_path: Path) -> Iterator[Callable[..., Upgradable]]:
    started: list[Upgradable] = []

    def start(config: str, port: int, env: dict[str, str] | None = None) -> Upgradable:
        lb = Upgradable(tmp_path, config, port, env)
        started.append(lb)
        return lb

    yield start
    for lb in started:
        lb.stop()


# --- the load ------------------------------------------------------------------------------------


@dataclass
class Load:
    """Clients in threads until `stop()`; `ok` counts what was answered, `failures` what was
    refused, reset, cut or wrong, `clean_closes` keep-alive connections the server closed
    cleanly between requests (the request was retried, as clients do: RFC 9112 section 9.3.1)."""

    ok: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    clean_closes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)
    _cleanups: list[Callable[[], None]] = field(default_factory=list)

    def run(self, name: str, client: Callable[[], None]) -> None:
        def loop() -> None:
            end = time.monotonic() + LOAD_LIMIT_S
            while not self._stop.is_set() and time.monotonic() < end:
                client()

        t = threading.Thread(target=loop, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def count(self, kind: str) -> None:
        with self._lock:
            self.ok[kind] = self.ok.get(kind, 0) + 1

    def fail(self, what: str) -> None:
        with self._lock:
            self.failures.append(what)

    def at_stop(self, cleanup: Callable[[], None]) -> None:
        self._cleanups.append(cleanup)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        for cleanup in self._cleanups:
            cleanup()


def http_new_connections(load: Load, port: int) -> Callable[[], None]:
    """A new connection per request."""

    def one() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/", headers={"Connection": "close"})
            r = conn.getresponse()
            r.read()
            if r.status == 200:
                load.count("http new connection")
            else:
                load.fail(f"http new connection: status {r.status}")
        except (OSError, http.client.HTTPException) as err:
            load.fail(f"http new connection: {err!r}")
        finally:
            conn.close()

    return one


def http_keep_alive(load: Load, port: int) -> Callable[[], None]:
    """Requests on one keep-alive connection while it lasts, then a new one."""
    state: dict[str, http.client.HTTPConnection | int | None] = {"conn": None, "used": 0}

    def close() -> None:
        if isinstance(state["conn"], http.client.HTTPConnection):
            state["conn"].close()

    load.at_stop(close)

    def one() -> None:
        conn = state["conn"]
        if not isinstance(conn, http.client.HTTPConnection):
            conn = state["conn"] = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            state["used"] = 0
        try:
            conn.request("GET", "/")
            r = conn.getresponse()
            r.read()
        except http.client.RemoteDisconnected as err:
            # closed without an answer: clean (a FIN) only on a connection that served before
            conn.close()
            state["conn"] = None
            if state["used"]:
                with load._lock:
                    load.clean_closes += 1
            else:
                load.fail(f"keep-alive: first request unanswered: {err!r}")
            return
        except (OSError, http.client.HTTPException) as err:
            load.fail(f"keep-alive: {err!r}")
            conn.close()
            state["conn"] = None
            return
        state["used"] = int(state["used"] or 0) + 1
        if r.status != 200:
            load.fail(f"keep-alive: status {r.status}")
        else:
            load.count("http keep-alive")
        if r.getheader("connection", "").lower() == "close":
            conn.close()
            state["conn"] = None

    return one


def tcp_echo_stream(load: Load, port: int) -> Callable[[], None]:
    """A TCP connection that exchanges 20 messages over about half a second, then closes: open
    across upgrades, so the old process must carry it to its end."""

    def one() -> None:
        try:
            s, _ = tcp_connect(port)
        except OSError as err:
            load.fail(f"tcp connect: {err!r}")
            return
        with s:
            try:
                for i in range(20):
                    message = f"message {i:04d} ".encode() * 8
                    s.sendall(message)
                    got = b""
                    while len(got) < len(message):
                        chunk = s.recv(len(message) - len(got))
                        if not chunk:
                            raise ConnectionError("closed mid-stream")
                        got += chunk
                    if got != message:
                        raise ValueError("echo differs")
                    time.sleep(0.025)
                load.count("tcp stream")
            except (OSError, ValueError) as err:
                load.fail(f"tcp stream: {err!r}")

    return one


def udp_exchange(load: Load, port: int) -> Callable[[], None]:
    """A datagram, and its echo within 2 s; a new client port every 10 datagrams."""
    state: dict[str, socket.socket | int | None] = {"sock": None, "n": 0}

    def close() -> None:
        if isinstance(state["sock"], socket.socket):
            state["sock"].close()

    load.at_stop(close)

    def one() -> None:
        sock = state["sock"]
        n = int(state["n"] or 0)
        if not isinstance(sock, socket.socket) or n % 10 == 0:
            if isinstance(sock, socket.socket):
                sock.close()
            sock = state["sock"] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.settimeout(2)
        state["n"] = n + 1
        payload = f"x{n:06d}".encode()
        try:
            sock.sendto(payload, ("127.0.0.1", port))
            while True:
                got = sock.recv(2048)
                if got == payload:  # an earlier late echo is not this one's
                    break
            load.count("udp")
        except OSError as err:
            load.fail(f"udp {payload!r}: {err!r}")
        time.sleep(0.01)

    return one


# --- configs ---------------------------------------------------------------------------------------


@dataclass
class Site:
    port: int
    tls_port: int
    tcp_port: int
    udp_port: int
    admin: int
    config: str
    ca: trustme.CA
    udp: EchoBackend


def site_config(folder: Path, hb: Callable[..., object], backends: Callable[..., Backend]) -> Site:
    """http, https, tcp and udp listeners over real backends, the admin API, a pid file."""
    ca = trustme.CA()
    cert = ca.issue_cert("site.test")
    (folder / "site.pem").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(folder / "site.key"))
    web = [hb("b1"), hb("b2")]
    echo = backends(name_then_echo, "echo")
    udp = EchoBackend("u1")
    port, tls_port, tcp_port, admin = free_port(), free_port(), free_port(), free_port()
    udp_port = free_udp_port()
    web_backends = ", ".join(f'{{ address = "{b.address}" }}' for b in web)  # type: ignore[attr-defined]
    config = f"""
[runtime]
workers = 2
cpu_affinity = "off"
pid_file = "fastlb.pid"

[admin]
bind = "127.0.0.1:{admin}"

[[listeners]]
name = "web"
bind = "127.0.0.1:{port}"
protocol = "http"
pool = "app"

[[listeners]]
name = "secure"
bind = "127.0.0.1:{tls_port}"
protocol = "https"
pool = "app"
  [listeners.tls]
  certificates = [{{ cert = "site.pem", key = "site.key" }}]

[[listeners]]
name = "echo"
bind = "127.0.0.1:{tcp_port}"
protocol = "tcp"
pool = "echo"

[[listeners]]
name = "dns"
bind = "127.0.0.1:{udp_port}"
protocol = "udp"
pool = "udp"

[[pools]]
name = "app"
backends = [{web_backends}]
drain_timeout = "10s"

[[pools]]
name = "echo"
backends = [{{ address = "{echo.address}" }}]
drain_timeout = "10s"

[[pools]]
name = "udp"
backends = [{{ address = "{udp.address}" }}]
health = {{ type = "none" }}
drain_timeout = "10s"
"""
    return Site(port, tls_port, tcp_port, udp_port, admin, config, ca, udp)


@pytest.fixture
def site(tmp_path: Path, hb, backends) -> Iterator[Site]:  # type: ignore[no-untyped-def]
    s = site_config(tmp_path, hb, backends)
    yield s
    s.udp.close()


# --- the tests -------------------------------------------------------------------------------------


def test_upgrades_in_a_row_under_load_lose_nothing(site, upgradable):
    lb = upgradable(site.config, site.port)
    load = Load()
    for i in range(2):
        load.run(f"http-new-{i}", http_new_connections(load, site.port))
    load.run("http-keep-alive", http_keep_alive(load, site.port))
    for i in range(2):
        load.run(f"tcp-{i}", tcp_echo_stream(load, site.tcp_port))
    load.run("udp", udp_exchange(load, site.udp_port))
    try:
        assert wait_until(lambda: len(load.ok) == 4, 15), load.ok
        for round_ in range(ROUNDS):
            old, _ = lb.upgrade("cli" if round_ % 2 else "signal")
            # the old one drains what it holds and exits well inside its 10 s drain_timeout
            assert wait_until(lambda old=old: not running(old), 15), f"pid {old} still runs"
            before = dict(load.ok)
            # the new one serves every kind of traffic before the next round starts
            assert wait_until(lambda b=before: all(load.ok[k] > b[k] for k in b), 15), (load.ok, before)
    finally:
        load.stop()
    assert load.failures == [], load.failures[:20]
    served = sum(load.ok.values())
    assert load.ok.keys() == {"http new connection", "http keep-alive", "tcp stream", "udp"}
    print(f"{ROUNDS} upgrades: {load.ok}; {served} served, {load.clean_closes} clean keep-alive closes")
    # clean closes are the idle keep-alive connections the old processes closed, a few a round
    assert load.clean_closes <= 3 * ROUNDS
    assert len(set(lb.pids)) == ROUNDS + 1
    log = lb.log()
    assert log.count("upgrade: serving in place of pid") == ROUNDS
    assert "Traceback" not in log


def tls_session(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[bool, ssl.SSLSession]:
    """One HTTPS request; returns whether the session was resumed, and the session (its TLS 1.3
    ticket arrives after the handshake, so it is taken once the answer is read)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="site.test", session=session) as s,
    ):
        s.sendall(b"GET / HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
        assert s.session is not None
        return s.session_reused, s.session


def test_tls_sessions_resume_across_an_upgrade_and_not_across_a_restart(site, upgradable, tmp_path):
    lb = upgradable(site.config, site.port)
    ctx = ssl.create_default_context()  # one context: Python resumes only within it
    site.ca.configure_trust(ctx)
    reused, session = tls_session(site.tls_port, ctx)
    assert not reused
    assert tls_session(site.tls_port, ctx, session)[0], "no resumption before any upgrade"
    lb.upgrade()
    # the new process decrypts the old one's tickets: the ticket keys were handed over
    for _ in range(4):  # over both workers
        assert tls_session(site.tls_port, ctx, session)[0], "not resumed after the upgrade"
    # the control: a restarted fastlb has fresh keys, and the same ticket is refused
    lb.stop()
    restarted = upgradable(site.config, site.port)
    assert restarted.pid() not in lb.pids
    assert not tls_session(site.tls_port, ctx, session)[0]


def test_a_failed_upgrade_keeps_the_old_process_serving(site, upgradable):
    lb = upgradable(site.config, site.port)
    good = lb.config_path.read_text()
    lb.config_path.write_text(good.replace('protocol = "udp"', 'protocol = "udpp"'))
    old = lb.pid()
    done = fastlb_cli("upgrade", "--pid-file", str(lb.pid_file))
    assert done.returncode == 1, done
    assert "the upgrade failed and pid" in done.stderr and "still serves" in done.stderr, done.stderr
    assert lb.pid() == old and running(old)
    assert "upgrade failed, still serving" in lb.log()
    assert "listeners[3].protocol" in lb.log()  # the new process said what was wrong
    # every listener still answers, from the same process
    conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=10)
    with contextlib.closing(conn):
        conn.request("GET", "/")
        assert conn.getresponse().status == 200
    s, name = tcp_connect(site.tcp_port)
    s.close()
    assert name == "echo"
    # fixed, the next upgrade goes through
    lb.config_path.write_text(good)
    old2, _ = lb.upgrade("cli")
    assert old2 == old and wait_until(lambda: not running(old), 15)


def test_upgrade_command_needs_a_pid_file(tmp_path, site):
    config = tmp_path / "no-pid.toml"
    config.write_text(site.config.replace('pid_file = "fastlb.pid"\n', ""))
    done = fastlb_cli("upgrade", "-c", str(config))
    assert done.returncode == 2
    assert "runtime.pid_file is not set" in done.stderr
    missing = fastlb_cli("upgrade", "--pid-file", str(tmp_path / "none.pid"))
    assert missing.returncode == 1
    assert "no pid in" in missing.stderr
    dead = tmp_path / "dead.pid"
    proc = subprocess.Popen(["true"])
    proc.wait()
    dead.write_text(f"{proc.pid}\n")
    stale = fastlb_cli("upgrade", "--pid-file", str(dead))
    assert stale.returncode == 1 and "is not running" in stale.stderr


def test_upgrade_by_config_path_and_the_pid_file_at_exit(site, upgradable):
    lb = upgradable(site.config, site.port)
    done = fastlb_cli("upgrade", "-c", str(lb.config_path))
    assert done.returncode == 0, done.stderr
    new = lb.pid()
    assert new != lb.first.pid
    os.kill(new, signal.SIGTERM)
    assert wait_until(lambda: not running(new), 15)
    assert not lb.pid_file.exists(), "a stop removes the pid file it wrote"


def test_http2_connections_get_goaway_and_finish_their_streams(site, upgradable):
    lb = upgradable(site.config, site.port)
    with RawH2(site.port) as raw:  # h2c by prior knowledge on the http listener
        first = raw.new_stream()
        raw.send(raw.headers_frame(first, path="/"))
        assert raw.wait_stream(first, 5) and raw.status(first) == 200
        slow = raw.new_stream()
        raw.send(raw.headers_frame(slow, path="/sleep/1500"))
        old, _ = lb.upgrade()
        assert raw.wait_ended(5), "no GOAWAY from the old process"
        assert raw.goaway is not None, "closed without a GOAWAY"
        last, code = raw.goaway
        assert code == NO_ERROR and last >= slow, raw.goaway
        assert raw.wait_stream(slow, 10) and raw.status(slow) == 200
        assert raw.wait_closed(10)
    assert wait_until(lambda: not running(old), 15)
    with RawH2(site.port) as fresh:
        again = fresh.new_stream()
        fresh.send(fresh.headers_frame(again, path="/"))
        assert fresh.wait_stream(again, 5) and fresh.status(again) == 200


# --- systemd ---------------------------------------------------------------------------------------

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "fastlb.service"


def test_the_systemd_unit_reloads_and_documents_the_upgrade(tmp_path):
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "all"  # MAINPID= after an upgrade
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["ExecStart"].endswith("fastlb serve -c /etc/fastlb/fastlb.toml")
    assert service["RuntimeDirectory"] == "fastlb"
    comments = "\n".join(line for line in UNIT.read_text().splitlines() if line.startswith("#"))
    assert "fastlb upgrade -c /etc/fastlb/fastlb.toml" in comments
    assert "systemctl kill -s USR2 --kill-whom=main fastlb" in comments
    assert 'pid_file = "/run/fastlb/fastlb.pid"' in comments
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the unit's syntax is not verified")
    local = tmp_path / "fastlb.service"
    fastlb_bin = Path(sys.executable).parent / "fastlb"
    local.write_text(UNIT.read_text().replace("/opt/fastlb/bin/fastlb", str(fastlb_bin)))
    done = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_systemd_hears_ready_the_new_main_pid_and_stopping(site, upgradable, tmp_path):
    """What Type=notify with NotifyAccess=all relies on, told over a real NOTIFY_SOCKET."""
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(address)
        notify.settimeout(15)
        lb = upgradable(site.config, site.port, {"NOTIFY_SOCKET": address})
        assert notify.recv(4096) == b"READY=1"
        old, new = lb.upgrade()
        heard = {notify.recv(4096), notify.recv(4096)}  # the new one's and the old one's, any order
        assert heard == {f"MAINPID={new}\nREADY=1".encode(), b"STOPPING=1"}, heard
        assert wait_until(lambda: not running(old), 15)
        os.kill(new, signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1"
