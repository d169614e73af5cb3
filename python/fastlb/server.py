"""The serve lifecycle, for `fastlb serve` and `fastlb demo` alike: start the engine, run the
control plane and the admin API, act on signals (reload, reopen the log, upgrade, stop), drain
and exit. The binary upgrade's handover itself is fastlb.upgrade's.

Signal handlers only record what was asked (uvicorn's rule); the main loop acts on it. A second
SIGTERM/SIGINT while draining exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastlb import discovery, upgrade
from fastlb.admin import AdminServer, start_admin
from fastlb.config import Config
from fastlb.control import ControlPlane, ReloadError
from fastlb.engine import Engine
from fastlb.kernel_path import KernelPathError

log = logging.getLogger("fastlb")

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2

HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}


class Server:
    """One running `fastlb serve`: `run()` blocks until the process was asked to stop.

    `reload` re-reads the config (None: reloads are refused); `before` runs once the admin API
    is up (the demo starts its backends there); `argv` is the `fastlb` command line a binary
    upgrade starts the next process with (None: SIGUSR2 is refused)."""

    def __init__(
        self,
        config: Config,
        reload: Callable[[], Config] | None = None,
        before: Callable[[], Awaitable[None]] | None = None,
        argv: list[str] | None = None,
    ) -> None:
        self.config = config
        self.reload = reload
        self.before = before
        self.argv = argv
        self.engine: Engine | None = None
        self._admin: AdminServer | None = None
        self._upgrading = False
        self._handed_over = False
        self._discovered: tuple[Config, dict[str, list[discovery.Found]]] | None = None
        self._stop_asked: asyncio.Event | None = None
        self._stopped = False
        self._tasks: set[asyncio.Task[None]] = set()

    def run(self, exit_when_stopped: bool = False) -> int:
        """Starts the engine and runs the control loop until SIGTERM/SIGINT.

        `exit_when_stopped` ends the process as soon as the drain is over, with the signal
        handlers still installed: returning would first tear the event loop down, which puts
        SIGTERM back to its default action, and a second SIGTERM sent by a supervisor at that
        moment would turn a clean exit 0 into a kill."""
        # Signals stay blocked until the loop's handlers are installed: a SIGHUP or SIGTERM sent
        # as soon as the port opens is then handled (reload, drain) rather than killing the
        # process. The data plane's threads inherit the mask, so signals always reach this one.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        raise_open_file_limit(self.config)
        try:
            handover = upgrade.receive_handover()
        except (OSError, ValueError, KeyError) as err:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            print(f"fastlb: upgrade: no handover from the old process: {err}", file=sys.stderr)
            return EXIT_RUNTIME
        # backends from DNS: the engine starts with every address already
        found = discovery.first_lookups(self.config)
        self._discovered = (self.config, found)
        config = discovery.expand(self.config, found, {})
        try:
            if handover is None:
                self.engine = Engine(config)
            else:
                self.engine = Engine(config, handover.listeners, handover.ticket_keys)
        except (OSError, RuntimeError, ValueError) as err:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            print(f"fastlb: {err}", file=sys.stderr)
            return EXIT_RUNTIME
        for listener in self.config.listeners:
            log.info("listening on %s (%s, listener %r)", listener.bind, listener.protocol, listener.name)
        return _run_loop(self._main(self.engine, handover, exit_when_stopped))

    async def _main(self, engine: Engine, handover: upgrade.Handover | None, exit_when_stopped: bool) -> int:
        control = ControlPlane(engine, self.reload, self._discovered)
        try:
            control.start()
        except KernelPathError as err:
            print(f"fastlb: {err}", file=sys.stderr)
            await control.stop()
            await asyncio.to_thread(engine.stop, 0.0)
            return EXIT_RUNTIME
        await control.start_discovery()
        admin_cfg = engine.config.admin
        inherited = handover.admin_sockets(admin_cfg.bind) if handover is not None else []
        if admin_cfg.bind != "off":
            try:
                self._admin = await start_admin(control, admin_cfg, inherited)
            except OSError as err:
                log.error("admin.bind: cannot listen on %s: %s", admin_cfg.bind, err)
                await control.stop()
                await asyncio.to_thread(engine.stop, 0.0)
                return EXIT_RUNTIME
        self._install_signals(engine, control)
        if self.before is not None:
            await self.before()
        self._announce(handover)
        assert self._stop_asked is not None
        await self._stop_asked.wait()
        upgrade.sd_notify("STOPPING=1")
        if self._admin is not None and self._handed_over:
            await self._admin.stop_listening()  # the new process answers /healthz from now on
        await control.stop()
        grace = engine.drain_timeout_s()
        await asyncio.gather(
            asyncio.to_thread(engine.stop, grace), control.kernel.stop(grace, handed_over=self._handed_over)
        )
        self._stopped = True
        if self._admin is not None:
            await self._admin.cleanup()
        if self.config.pid_path is not None:
            upgrade.remove_pid_file(self.config.pid_path)
        log.info("stopped")
        if exit_when_stopped:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_OK)
        return EXIT_OK

    def _announce(self, handover: upgrade.Handover | None) -> None:
        """Serving: the pid file, systemd, and the old process at an upgrade (which then
        drains) hear it, in that order, so the pid file names this process once it returns."""
        self._write_pid_file()
        if handover is None:
            upgrade.sd_notify("READY=1")
            return
        upgrade.sd_notify(f"MAINPID={os.getpid()}\nREADY=1")
        handover.ready()
        log.info("upgrade: serving in place of pid %d, which now drains", handover.from_pid)

    def _write_pid_file(self) -> None:
        if self.config.pid_path is not None:
            try:
                upgrade.write_pid_file(self.config.pid_path)
            except OSError as err:
                log.error("runtime.pid_file: cannot write %s: %s", self.config.pid_path, err)

    async def _upgrade(self, engine: Engine, control: ControlPlane) -> None:
        """SIGUSR2: hand every socket to a new process; once it serves, drain and exit. If it
        fails, this process carries on serving as if nothing had been asked."""
        if self.argv is None or self._upgrading or self._handed_over or control.stopping:
            log.warning("SIGUSR2: no upgrade (%s)", self._why_no_upgrade(control))
            return
        self._upgrading = True
        log.info("SIGUSR2: upgrading: starting %s", " ".join(upgrade.serve_command(self.argv)))
        fds, ticket_keys = engine.handover()
        admin_socks = self._admin.sockets if self._admin is not None else []
        try:
            pid = await upgrade.hand_over(self.argv, fds, ticket_keys, admin_socks, engine.config.admin.bind)
        except OSError as err:
            log.error("upgrade failed, still serving: %s", err)
            control.audit.record("signal", "SIGUSR2", "upgrade", "", 0, f"failed: {err}")
            self._write_pid_file()  # a new inode with our pid: `fastlb upgrade` reads it as failed
            return
        finally:
            self._upgrading = False
        control.audit.record("signal", "SIGUSR2", "upgrade", "", 0, f"ok: pid {pid}")
        log.info("upgrade: pid %d serves; draining up to %.1fs", pid, engine.drain_timeout_s())
        self._handed_over = True
        control.stopping = True
        assert self._stop_asked is not None
        self._stop_asked.set()

    def _why_no_upgrade(self, control: ControlPlane) -> str:
        if self.argv is None:
            return "only `fastlb serve` upgrades"
        if self._upgrading:
            return "one is already under way"
        return "this process is stopping"

    def _install_signals(self, engine: Engine, control: ControlPlane) -> None:
        loop = asyncio.get_running_loop()
        stop_asked = self._stop_asked = asyncio.Event()

        def on_stop(signame: str) -> None:
            if self._stopped:
                return  # already drained; the process is on its way out
            if stop_asked.is_set():
                log.warning("second %s: exiting now", signame)
                os._exit(EXIT_RUNTIME)
            log.info("%s: stopping (draining up to %.1fs)", signame, engine.drain_timeout_s())
            control.stopping = True
            stop_asked.set()

        def spawn(job: Coroutine[Any, Any, None], name: str) -> None:
            task = loop.create_task(job, name=name)
            self._tasks.add(task)  # held until done: the loop keeps only a weak reference
            task.add_done_callback(self._tasks.discard)

        loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, lambda: spawn(_reload(control), "SIGHUP reload"))
        loop.add_signal_handler(signal.SIGUSR2, lambda: spawn(self._upgrade(engine, control), "upgrade"))
        loop.add_signal_handler(signal.SIGUSR1, engine.reopen_access_log)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)


def raise_open_file_limit(config: Config) -> int:
    """Lifts the soft open-file limit to the hard one, as HAProxy does for itself: every client
    connection, backend connection and udp session is a descriptor, and the usual soft limit
    (1024) would cap a udp listener at about a thousand flows. Warns when even the hard limit is
    below what the udp listeners' `max_sessions` ask for. Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as err:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, err)
    sessions = sum(x.udp.max_sessions for x in config.listeners if x.protocol == "udp" and x.udp)
    if sessions > soft:
        log.warning(
            "the open-file limit (%d) is below the udp listeners' max_sessions (%d in all): flows"
            " beyond it are dropped (send_error); raise it (systemd LimitNOFILE=, ulimit -n)",
            soft,
            sessions,
        )
    return soft


async def _reload(control: ControlPlane) -> None:
    """A SIGHUP: reload, and put it in the audit trail as the admin API's reloads are."""
    try:
        await control.reload()
    except ReloadError as err:
        for line in err.errors:
            log.error("reload refused, keeping the running config: %s", line)
        control.audit.record("signal", "SIGHUP", "reload", "", 0, "; ".join(err.errors))
    else:
        control.audit.record("signal", "SIGHUP", "reload", "", 0, "ok")


def _run_loop(main: Awaitable[int]) -> int:
    try:
        import uvloop

        return uvloop.run(main)  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - uvloop is a dependency; this only guards odd installs
        return asyncio.run(main)  # type: ignore[arg-type]
