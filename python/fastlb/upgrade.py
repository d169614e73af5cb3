"""Binary upgrade (CONTRACT.md, docs/upgrade.md): on SIGUSR2 the running process starts a new
`fastlb serve` with the same arguments from the installed package and hands it, over a Unix
socket pair (SCM_RIGHTS), every listening socket (data plane and admin API) and the TLS ticket
keys. The new process adopts them, serves, writes the pid file and says so; only then does the
old one stop accepting and drain. Both accept from the very same sockets meanwhile, so no
connection finds a port closed or a queue dropped.

The channel, one SOCK_SEQPACKET pair (messages keep their bounds):
  old -> new  a JSON header: {"from_pid", "admin_bind", "ticket_keys" (hex),
              "fds": [["listener", NAME] | ["admin", ""], ...]}, then the fds in that order,
              in batches (the kernel takes at most 253 per message)
  new -> old  {"ready": PID} once it serves; a closed channel without it means it failed
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

log = logging.getLogger("fastlb")

CHANNEL_ENV = "FASTLB_UPGRADE_FD"
# How long the old process waits for the new one to serve: starting Python, reading the config,
# reading certificates and binding take well under this even on a loaded machine.
READY_TIMEOUT_S = 30.0
_FDS_PER_MESSAGE = 250  # under the kernel's SCM_MAX_FD (253)
_MAX_MESSAGE = 1 << 20


@dataclass
class Handover:
    """What the new process received from the old one."""

    from_pid: int
    listeners: dict[str, list[int]]  # fds, owned until given to the engine
    admin: list[socket.socket]
    admin_bind: str
    ticket_keys: bytes
    channel: socket.socket = field(repr=False)

    def ready(self) -> None:
        """Tells the old process this one serves: it stops accepting and drains."""
        with contextlib.suppress(OSError):
            self.channel.send(orjson.dumps({"ready": os.getpid()}))
        self.channel.close()

    def admin_sockets(self, bind: str) -> list[socket.socket]:
        """The admin API's sockets if the new config binds the same address, else none (the
        old ones are closed: the admin API moves as a reload would move it)."""
        if bind == self.admin_bind:
            return self.admin
        for s in self.admin:
            s.close()
        return []


def receive_handover() -> Handover | None:
    """The handover, when this process was started by an upgrade (else None). Blocking: called
    once at start, before the engine exists."""
    fd_text = os.environ.pop(CHANNEL_ENV, None)
    if fd_text is None:
        return None
    channel = socket.socket(fileno=int(fd_text))
    channel.settimeout(READY_TIMEOUT_S)
    header = orjson.loads(channel.recv(_MAX_MESSAGE))
    kinds: list[list[str]] = header["fds"]
    fds: list[int] = []
    while len(fds) < len(kinds):
        _, got, _, _ = socket.recv_fds(channel, 16, _FDS_PER_MESSAGE)
        if not got:
            raise OSError("upgrade: the old process closed the channel before every socket came")
        fds.extend(got)
    listeners: dict[str, list[int]] = {}
    admin: list[socket.socket] = []
    for (kind, name), fd in zip(kinds, fds, strict=True):
        if kind == "admin":
            admin.append(socket.socket(fileno=fd))
        else:
            listeners.setdefault(name, []).append(fd)
    return Handover(
        from_pid=int(header["from_pid"]),
        listeners=listeners,
        admin=admin,
        admin_bind=str(header["admin_bind"]),
        ticket_keys=bytes.fromhex(header["ticket_keys"]),
        channel=channel,
    )


def _send_handover(
    channel: socket.socket,
    listeners: dict[str, list[int]],
    ticket_keys: bytes,
    admin: list[socket.socket],
    admin_bind: str,
) -> None:
    kinds: list[tuple[str, str]] = []
    fds: list[int] = []
    for name, listener_fds in listeners.items():
        kinds += [("listener", name)] * len(listener_fds)
        fds += listener_fds
    kinds += [("admin", "")] * len(admin)
    fds += [s.fileno() for s in admin]
    header = {
        "from_pid": os.getpid(),
        "admin_bind": admin_bind,
        "ticket_keys": ticket_keys.hex(),
        "fds": kinds,
    }
    channel.send(orjson.dumps(header))
    for start in range(0, len(fds), _FDS_PER_MESSAGE):
        socket.send_fds(channel, [b"fds"], fds[start : start + _FDS_PER_MESSAGE])


def _wait_ready(channel: socket.socket, timeout_s: float) -> int:
    """The new process's pid once it says it serves; OSError if it fails or takes too long."""
    channel.settimeout(timeout_s)
    try:
        message = channel.recv(_MAX_MESSAGE)
    except TimeoutError:
        raise OSError(f"the new process did not serve within {timeout_s:.0f}s") from None
    if not message:
        raise OSError("the new process ended before it served (its errors are in the log above)")
    return int(orjson.loads(message)["ready"])


def serve_command(argv: list[str]) -> list[str]:
    """The new process's command line: this Python, the installed fastlb package, the same
    arguments (so a `pip install -U fastlb` is what the upgrade runs)."""
    return [sys.executable, "-m", "fastlb", *argv]


async def hand_over(
    argv: list[str],
    listeners: dict[str, list[int]],
    ticket_keys: bytes,
    admin: list[socket.socket],
    admin_bind: str,
    timeout_s: float = READY_TIMEOUT_S,
) -> int:
    """Starts the new process, hands it the sockets and waits until it serves; returns its pid.
    Raises OSError (the new process is stopped, and this one carries on serving)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        env = {**os.environ, CHANNEL_ENV: str(theirs.fileno())}
        proc = subprocess.Popen(serve_command(argv), pass_fds=[theirs.fileno()], env=env)
    except OSError:
        ours.close()
        raise
    finally:
        theirs.close()
    try:
        with ours:
            await asyncio.to_thread(_send_handover, ours, listeners, ticket_keys, admin, admin_bind)
            pid = await asyncio.to_thread(_wait_ready, ours, timeout_s)
    except (OSError, ValueError, KeyError) as err:
        await asyncio.to_thread(_reap, proc)
        raise OSError(str(err)) from err
    # The new process outlives this one: its exit status is its supervisor's to collect (it
    # is re-parented when this process exits), so no wait here.
    return pid


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Stops a new process that failed to take over, and collects its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_pid_file(path: Path) -> None:
    """Writes this process's pid atomically (a reader never sees a half-written file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(path)


def remove_pid_file(path: Path) -> None:
    """Removes the pid file at exit, unless it now names another process (after an upgrade,
    the new one's pid is there)."""
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()


def read_pid_file(path: Path) -> int:
    """The pid in `path`; OSError or ValueError if there is none."""
    return int(path.read_text().strip())


class UpgradeError(Exception):
    """`fastlb upgrade` could not upgrade; the message says why (the running process, if any,
    carries on serving)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, and the SIGUSR2 below will say so
    return True


def request_upgrade(pid_path: Path, timeout_s: float) -> tuple[int, int]:
    """`fastlb upgrade`: SIGUSR2 to the pid in `pid_path`, then waits until the pid file names
    the new process; returns (old pid, new pid). A failed upgrade rewrites the file with the
    old pid (a new inode, same text): that is how a failure is told from one still under way."""
    try:
        old = read_pid_file(pid_path)
        before = pid_path.stat().st_ino
    except (OSError, ValueError) as err:
        raise UpgradeError(
            f"no pid in {pid_path} ({err}): is fastlb serve running with this pid_file?"
        ) from None
    if not _alive(old):
        raise UpgradeError(f"pid {old} (from {pid_path}) is not running")
    try:
        os.kill(old, signal.SIGUSR2)
    except OSError as err:
        raise UpgradeError(f"cannot signal pid {old}: {err}") from None
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        time.sleep(0.1)
        try:
            now, inode = read_pid_file(pid_path), pid_path.stat().st_ino
        except (OSError, ValueError):
            if not _alive(old):
                raise UpgradeError(f"pid {old} exited without a successor (its log says why)") from None
            continue  # between the rename and the read
        if now != old and _alive(now):
            return old, now
        if now == old and inode != before:
            raise UpgradeError(f"the upgrade failed and pid {old} still serves (its log says why)")
    raise UpgradeError(f"no new process named in {pid_path} within {timeout_s:.0f}s; pid {old} still serves")


def sd_notify(message: str) -> None:
    """Tells systemd (Type=notify) about this process's state, when started by it: READY=1,
    STOPPING=1, and after an upgrade MAINPID= (the unit needs NotifyAccess=all for that)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), address)
