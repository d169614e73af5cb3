"""The `fastlb` command: serve, check, demo, ctl.

Exit codes: 0 ok, 1 runtime failure (e.g. a port already taken), 2 bad config or bad usage.
Errors are one line per problem on stderr, naming the field.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from fastlb.admin import start_admin
from fastlb.config import Config, ConfigError, load_config
from fastlb.control import ControlPlane, ReloadError
from fastlb.ctl import add_ctl_parser, run_ctl
from fastlb.engine import Engine

log = logging.getLogger("fastlb")

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"fastlb: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastlb", description="A fast L4/L7 load balancer.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = sub.add_parser("serve", help="run until SIGTERM/SIGINT; SIGHUP reloads the config")
    serve.add_argument("-c", "--config", required=True, type=Path, help="the TOML config file")
    check = sub.add_parser("check", help="validate a config file; prints ok or the errors")
    check.add_argument("-c", "--config", required=True, type=Path)
    demo = sub.add_parser("demo", help="three demo backends behind a listener on 127.0.0.1:8080")
    demo.add_argument("--listen", default="127.0.0.1:8080", help="listener address (default %(default)s)")
    demo.add_argument(
        "--admin", default="127.0.0.1:9901", help='admin API address or "off" (default %(default)s)'
    )
    add_ctl_parser(sub)
    return parser


def _print_errors(err: ConfigError) -> None:
    for line in err.errors:
        print(line, file=sys.stderr)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s fastlb %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def cmd_check(path: Path) -> int:
    try:
        load_config(path)
    except ConfigError as err:
        _print_errors(err)
        return EXIT_USAGE
    print("ok")
    return EXIT_OK


def cmd_serve(path: Path) -> int:
    try:
        config = load_config(path)
    except ConfigError as err:
        _print_errors(err)
        return EXIT_USAGE
    _setup_logging(config.log.level)

    def reload() -> Config:
        return load_config(path)

    return serve_config(config, reload, exit_when_stopped=True)


HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}


def serve_config(
    config: Config,
    reload: Callable[[], Config] | None = None,
    before: Callable[[], Awaitable[None]] | None = None,
    exit_when_stopped: bool = False,
) -> int:
    """Starts the engine for `config` and runs the control loop until SIGTERM/SIGINT.

    `exit_when_stopped` ends the process as soon as the drain is over, with the signal handlers
    still installed: returning would first tear the event loop down, which puts SIGTERM back
    to its default action, and a second SIGTERM sent by a supervisor at that moment would turn
    a clean exit 0 into a kill."""
    # Signals stay blocked until the control loop's handlers are installed: a SIGHUP or SIGTERM
    # sent as soon as the port opens is then handled (reload, drain) rather than killing the
    # process. The data plane's threads inherit the mask, so signals always reach this thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        engine = Engine(config)
    except (OSError, RuntimeError, ValueError) as err:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        print(f"fastlb: {err}", file=sys.stderr)
        return EXIT_RUNTIME
    for listener in config.listeners:
        log.info("listening on %s (%s, listener %r)", listener.bind, listener.protocol, listener.name)
    return _run_loop(_control_loop(engine, reload, before, exit_when_stopped))


def _run_loop(main: Awaitable[int]) -> int:
    try:
        import uvloop

        return uvloop.run(main)  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - uvloop is a dependency; this only guards odd installs
        return asyncio.run(main)  # type: ignore[arg-type]


async def _control_loop(
    engine: Engine,
    reload: Callable[[], Config] | None,
    before: Callable[[], Awaitable[None]] | None,
    exit_when_stopped: bool = False,
) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    control = ControlPlane(engine, reload)
    stopped = False

    def on_stop(signame: str) -> None:
        if stopped:
            return  # already drained; the process is on its way out
        if stopping.is_set():
            log.warning("second %s: exiting now", signame)
            os._exit(EXIT_RUNTIME)
        log.info("%s: stopping (draining up to %.1fs)", signame, engine.drain_timeout_s())
        control.stopping = True
        stopping.set()

    def on_hup() -> None:
        try:
            control.reload()
        except ReloadError as err:
            for line in err.errors:
                log.error("reload refused, keeping the running config: %s", line)

    control.start()
    admin = None
    if engine.config.admin.bind != "off":
        try:
            admin = await start_admin(control, engine.config.admin.bind)
        except OSError as err:
            log.error("admin.bind: cannot listen on %s: %s", engine.config.admin.bind, err)
            await control.stop()
            await loop.run_in_executor(None, engine.stop, 0.0)
            return EXIT_RUNTIME
    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGUSR1, engine.reopen_access_log)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    if before is not None:
        await before()
    await stopping.wait()
    await control.stop()
    await loop.run_in_executor(None, engine.stop, engine.drain_timeout_s())
    stopped = True
    if admin is not None:
        await admin.cleanup()
    log.info("stopped")
    if exit_when_stopped:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_OK)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return cmd_check(args.config)
    if args.command == "serve":
        return cmd_serve(args.config)
    if args.command == "ctl":
        return run_ctl(args)
    if args.command == "demo":
        from fastlb.demo import run_demo

        return run_demo(args.listen, args.admin)
    return EXIT_USAGE  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":
    raise SystemExit(main())
