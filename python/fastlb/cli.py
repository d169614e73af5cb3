"""The `fastlb` command: serve, check, demo, ctl, upgrade, admin-token. Argument parsing only:
the serve lifecycle is `fastlb.server`, the upgrade's handover `fastlb.upgrade`.

Exit codes: 0 ok, 1 runtime failure (e.g. a port already taken), 2 bad config or bad usage.
Errors are one line per problem on stderr, naming the field.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fastlb import __version__
from fastlb._native import BUILD
from fastlb.admin_auth import ROLES, TOKEN_NAME, digest, new_token
from fastlb.config import Config, ConfigError, load_config
from fastlb.ctl import add_ctl_parser, run_ctl
from fastlb.server import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, Server
from fastlb.upgrade import UpgradeError, request_upgrade


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"fastlb: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    # raw: `--version` stays on one line whatever the terminal's width (scripts parse it)
    parser = _Parser(
        prog="fastlb",
        description="A fast L4/L7 load balancer.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fastlb {__version__} (data plane: {BUILD})")
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
    up = sub.add_parser(
        "upgrade", help="binary upgrade: the running fastlb hands its sockets to a new process, then drains"
    )
    where = up.add_mutually_exclusive_group(required=True)
    where.add_argument("--pid-file", type=Path, help="the running process's [runtime].pid_file")
    where.add_argument("-c", "--config", type=Path, help="its config file (for [runtime].pid_file)")
    up.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the new process (default %(default)s)",
    )
    add_ctl_parser(sub)
    token = sub.add_parser(
        "admin-token", help="make an admin API token: prints it and the line for admin.tokens_file"
    )
    token.add_argument("name", help="who holds it (shown in the audit trail)")
    token.add_argument("role", choices=ROLES, help="read: status and metrics; operate: also changes")
    return parser


def cmd_admin_token(name: str, role: str) -> int:
    """The token goes to stdout's first line (for `| head -1 > file`); the tokens-file line,
    which holds only its SHA-256, to the second."""
    if not TOKEN_NAME.fullmatch(name):
        print(f"fastlb: name {name!r}: 1..64 letters, digits, '_', '.', '@' or '-'", file=sys.stderr)
        return EXIT_USAGE
    token = new_token()
    print(token)
    print(f"{name} {role} {digest(token).hex()}")
    print(
        "first line: the token (give it to its holder, shown once); second: add it to the file"
        " admin.tokens_file names, then reload",
        file=sys.stderr,
    )
    return EXIT_OK


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
    """Errors: exit 2; warnings (`warning: ...` on stderr) do not change the verdict `ok`."""
    try:
        config = load_config(path)
    except ConfigError as err:
        _print_errors(err)
        return EXIT_USAGE
    for line in config.warnings:
        print(f"warning: {line}", file=sys.stderr)
    print("ok")
    return EXIT_OK


def cmd_serve(path: Path) -> int:
    try:
        config = load_config(path)
    except ConfigError as err:
        _print_errors(err)
        return EXIT_USAGE
    _setup_logging(config.log.level)
    for line in config.warnings:
        logging.getLogger("fastlb").warning("config: %s", line)

    def reload() -> Config:
        return load_config(path)

    # absolute: the new process of an upgrade must find the same file whatever happens to cwd
    argv = ["serve", "-c", str(path.resolve())]
    return Server(config, reload, argv=argv).run(exit_when_stopped=True)


def cmd_upgrade(pid_file: Path | None, config_path: Path | None, timeout_s: float) -> int:
    """Exit 0 once the new process serves (the old one then drains and exits on its own), 1 if
    the upgrade failed (the old one still serves), 2 if there is no pid file to go by."""
    if pid_file is None:
        assert config_path is not None
        try:
            pid_file = load_config(config_path).pid_path
        except ConfigError as err:
            _print_errors(err)
            return EXIT_USAGE
        if pid_file is None:
            print(
                f"fastlb: {config_path}: runtime.pid_file is not set, so there is no pid to upgrade "
                "(set it, or send SIGUSR2 to the process yourself)",
                file=sys.stderr,
            )
            return EXIT_USAGE
    try:
        old, new = request_upgrade(pid_file, timeout_s)
    except UpgradeError as err:
        print(f"fastlb: upgrade: {err}", file=sys.stderr)
        return EXIT_RUNTIME
    print(f"upgraded: pid {old} -> {new} (pid {old} drains and exits)")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return cmd_check(args.config)
    if args.command == "serve":
        return cmd_serve(args.config)
    if args.command == "ctl":
        return run_ctl(args)
    if args.command == "upgrade":
        return cmd_upgrade(args.pid_file, args.config, args.timeout)
    if args.command == "admin-token":
        return cmd_admin_token(args.name, args.role)
    if args.command == "demo":
        from fastlb.demo import run_demo

        return run_demo(args.listen, args.admin)
    return EXIT_USAGE  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":
    raise SystemExit(main())
