"""The release check (`make release-check`, run by CI): the wheel and the sdist in dist/ (from
`make dist`) install and run on every supported Python.

For each Python of SUPPORTED found here (pyenv's, or python3.X on PATH): a fresh venv, the
wheel installed from its file, `fastlb --version`, `fastlb check` on every file in examples/,
and a short `fastlb serve` through which one HTTP request reaches a loopback backend and one
TCP echo comes back. Then the sdist is built into a wheel from a clean unpack, installed into
one more venv and smoke-tested the same way. Exit 1 naming what failed; a supported Python
that is not installed fails too, unless FASTLB_RELEASE_ALLOW_MISSING=1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from example_certs import example_with_certificates

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "dist"
SUPPORTED = ("3.11", "3.12", "3.13")


def find_python(version: str) -> str | None:
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for candidate in sorted(pyenv.glob(f"{version}.*"), reverse=True):
        exe = candidate / "bin" / "python3"
        if exe.exists():
            return str(exe)
    return shutil.which(f"python{version}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"hello from the backend\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def echo_server() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def smoke(fastlb: Path, work: Path) -> None:
    """`fastlb serve` on one http and one tcp listener; a request and an echo through it."""
    http = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    echo, echo_port = echo_server()
    web, tcp = free_port(), free_port()
    config = work / "smoke.toml"
    config.write_text(
        f"""[runtime]
workers = 1
[admin]
bind = "off"
[[listeners]]
name = "web"
bind = "127.0.0.1:{web}"
protocol = "http"
pool = "web"
[[listeners]]
name = "tcp"
bind = "127.0.0.1:{tcp}"
protocol = "tcp"
pool = "echo"
[[pools]]
name = "web"
backends = [{{ address = "127.0.0.1:{http.server_address[1]}" }}]
[[pools]]
name = "echo"
backends = [{{ address = "127.0.0.1:{echo_port}" }}]
"""
    )
    proc = subprocess.Popen([str(fastlb), "serve", "-c", str(config)], stderr=subprocess.PIPE, text=True)
    try:
        wait_port(web)
        wait_port(tcp)
        with socket.create_connection(("127.0.0.1", web), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: smoke\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"hello from the backend\n"), answer
        with socket.create_connection(("127.0.0.1", tcp), timeout=10) as s:
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        http.shutdown()
        echo.close()
    assert proc.returncode == 0, f"fastlb serve exited {proc.returncode}: {err}"


def check_install(python: str, wheel: Path, work: Path) -> str:
    """A fresh venv of `python` with `wheel`; returns `fastlb --version`."""
    venv = work / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True)
    fastlb = venv / "bin" / "fastlb"
    version = subprocess.run([str(fastlb), "--version"], check=True, capture_output=True, text=True)
    for example in sorted((ROOT / "examples").glob("*.toml")):
        folder = work / "examples" / example.stem
        folder.mkdir(parents=True)
        config = example_with_certificates(example, folder)
        done = subprocess.run([str(fastlb), "check", "-c", str(config)], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.strip() == "ok", (example.name, done.stderr)
    smoke(fastlb, work)
    return version.stdout.strip()


def main() -> int:
    wheels = sorted(DIST.glob("fastlb-*manylinux*_x86_64.whl"))
    sdists = sorted(DIST.glob("fastlb-*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        print(
            f"release check: expected one x86_64 wheel and one sdist in {DIST} (make dist)", file=sys.stderr
        )
        return 1
    failures: list[str] = []
    allow_missing = os.environ.get("FASTLB_RELEASE_ALLOW_MISSING") == "1"
    for version in SUPPORTED:
        python = find_python(version)
        if python is None:
            print(f"Python {version}: not installed here", file=sys.stderr)
            if not allow_missing:
                failures.append(f"Python {version}: not installed")
            continue
        with tempfile.TemporaryDirectory(prefix=f"fastlb-release-{version}.") as tmp:
            try:
                got = check_install(python, wheels[0], Path(tmp))
                print(f"Python {version} ({python}), wheel: {got}", flush=True)
            except (AssertionError, subprocess.CalledProcessError, TimeoutError) as err:
                failures.append(f"Python {version}, wheel: {err}")
    with tempfile.TemporaryDirectory(prefix="fastlb-release-sdist.") as tmp:
        work = Path(tmp)
        try:
            shutil.unpack_archive(sdists[0], work / "src")
            (unpacked,) = (work / "src").iterdir()
            pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "out")]
            subprocess.run([*pip_wheel, str(unpacked)], check=True)
            (wheel,) = (work / "out").glob("fastlb-*.whl")
            got = check_install(sys.executable, wheel, work)
            print(f"sdist -> {wheel.name}: {got}", flush=True)
        except (AssertionError, subprocess.CalledProcessError, TimeoutError, ValueError) as err:
            failures.append(f"sdist: {err}")
    for line in failures:
        print(f"release check FAILED: {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
