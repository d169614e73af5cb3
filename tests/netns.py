"""Network namespaces for tests that need several hosts (tests/test_ha.py): a bridge in a namespace of
its own, hosts wired to it by veth pairs, and ways to act inside a host.

Nothing touches the root namespace's interfaces: every veth is created inside the namespaces it
joins. Inside a host:
- `host.popen(cmd)` runs a process there (`ip netns exec`, which execs: the pid is the command's);
- `host.call(fn, ...)` runs a Python function on a thread that entered the namespace (`setns` acts
  on the calling thread only), so sockets it makes live there, and threads it starts stay there.
`Lab.close()` kills what is left in its namespaces (by pid, `ip netns pids`) and deletes them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["SBIN_PATH", "Host", "Lab", "enter_netns", "unavailable"]

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
_libc = ctypes.CDLL(None, use_errno=True)


def unavailable(*tools: str) -> str | None:
    """Why namespace tests cannot run here (not root, no `ip netns`, a tool missing), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs, a bridge)"
    ip = shutil.which("ip", path=SBIN_PATH)
    if ip is None or subprocess.run([ip, "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` is unavailable"
    for tool in tools:
        if shutil.which(tool, path=SBIN_PATH) is None:
            return f"{tool} is not installed"
    return None


def enter_netns(name: str) -> None:
    """Moves the calling thread (only it) into network namespace `name`."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, env={"PATH": SBIN_PATH})
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


class Host:
    """One namespace on the lab's bridge, with `address` on interface `dev`."""

    def __init__(self, ns: str, dev: str, address: str) -> None:
        self.ns, self.dev, self.address = ns, dev, address

    def popen(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Runs `cmd` in this namespace, stdout and stderr to `log`."""
        with log.open("ab") as out:  # the child keeps its own descriptor
            return subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *cmd],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env or os.environ, PATH=SBIN_PATH),
            )

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a thread inside this namespace; its result, or its exception raised here."""
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                enter_netns(self.ns)
                box["value"] = fn(*args)
            except BaseException as exc:
                box["error"] = exc

        t = threading.Thread(target=run, name=f"in {self.ns}")
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    def has_address(self, address: str) -> bool:
        out = _ip("-n", self.ns, "-o", "-4", "addr", "show", "dev", self.dev)
        return any(f" {address}/" in line for line in out.splitlines())


class Lab:
    """Namespaces named `<prefix>-<random>-<role>`, unique per run; a bridge `br0` in `...-br`."""

    def __init__(self, prefix: str = "fastlb-test") -> None:
        self.tag = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self.namespaces: list[str] = []
        try:
            self.bridge = self._netns("br")
            _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge, "link", "set", "br0", "up")
        except RuntimeError:
            self.close()
            raise

    def _netns(self, role: str) -> str:
        name = f"{self.tag}-{role}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def host(self, role: str, address: str, prefix_len: int = 24, dev: str = "eth0") -> Host:
        """A namespace whose `dev` (a veth) is on the bridge, with `address/prefix_len`."""
        ns = self._netns(role)
        port = f"p{len(self.namespaces)}"  # the bridge side, named inside the bridge's namespace
        _ip("-n", self.bridge, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", ns)
        _ip("-n", self.bridge, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{address}/{prefix_len}", "dev", dev)
        _ip("-n", ns, "link", "set", dev, "up")
        return Host(ns, dev, address)

    def close(self) -> None:
        """Kills every process still in the lab's namespaces, then deletes them."""
        for ns in self.namespaces:
            done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in done.stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()
