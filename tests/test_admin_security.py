"""The admin API lets no one in where they don't belong (CONTRACT.md "Admin API safety"): real
`fastlb serve` processes, real clients (http.client as a browser would send, curl, `fastlb ctl`,
headless chromium), real backends."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from admin import api, state_of
from httputil import get, http_config, pool

from fastlb.admin_auth import digest
from fastlb.config import load_config

from conftest import FastlbProcess, free_port, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OPERATE, READ = "fastlb_operate-token-for-tests", "fastlb_read-token-for-tests"


def tokens_text(**roles: tuple[str, str]) -> str:
    return "".join(f"{name} {role} {digest(token).hex()}\n" for name, (role, token) in roles.items())


def serve(
    fastlb: Callable[..., FastlbProcess], backends: list[str], admin_keys: str = "", **kw: Any
) -> tuple[int, int]:
    port, admin = free_port(), free_port()
    config = http_config(port, [pool("app", backends)], admin=f"127.0.0.1:{admin}", **kw)
    fastlb(config.replace("[admin]\n", f"[admin]\n{admin_keys}\n", 1), port)
    return port, admin


def raw(admin: int, method: str, path: str, headers: dict[str, str], body: bytes | None = None) -> int:
    """A request with exactly these headers (what a browser or a script sends), its status."""
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
    try:
        c.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers.items():
            c.putheader(k, v)
        if body is not None:
            c.putheader("Content-Length", str(len(body)))
        c.endheaders(body)
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def events(admin: int, token: str | None = None) -> list[dict[str, Any]]:
    status, body = api(admin, "GET", "/api/events", token=token)
    assert status == 200, body
    return list(body["events"])


# --- browser safety: CSRF -----------------------------------------------------------------------


def test_a_cross_site_form_post_does_not_drain(hb, fastlb):
    a, b = hb("a"), hb("b")
    _, admin = serve(fastlb, [a.address, b.address])
    drain = f"/api/pools/app/backends/{b.address}/drain"
    host = f"127.0.0.1:{admin}"
    form = {"Host": host, "Content-Type": "application/x-www-form-urlencoded"}
    # what a form on another site sends (browsers add Origin and Sec-Fetch-Site to a cross-site POST)
    assert (
        raw(
            admin,
            "POST",
            drain,
            {**form, "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
            b"x=1",
        )
        == 403
    )
    assert raw(admin, "POST", drain, {**form, "Origin": "http://evil.example"}, b"x=1") == 403
    assert raw(admin, "POST", drain, {"Host": host, "Sec-Fetch-Site": "cross-site"}) == 403
    # a fetch(no-cors) from a foreign page may send text/plain; even same-origin it needs the header
    assert raw(admin, "POST", drain, {"Host": host, "Content-Type": "text/plain"}, b"{}") == 403
    assert (
        raw(admin, "POST", drain, {"Host": host, "X-Fastlb-Admin": "1", "Content-Type": "text/plain"}, b"{}")
        == 415
    )
    assert raw(admin, "POST", drain, {"Host": host, **form, "X-Fastlb-Admin": "1"}, b"x=1") == 415
    # and with the header, a foreign Origin is still refused
    cross = {"Host": host, "X-Fastlb-Admin": "1", "Origin": "http://evil.example"}
    assert raw(admin, "POST", drain, cross) == 403
    assert state_of(admin, "app", b.address) == "up"
    # what the dashboard sends from its own page is accepted
    own = {"Host": host, "X-Fastlb-Admin": "1", "Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"}
    assert raw(admin, "POST", drain, own) == 200
    assert state_of(admin, "app", b.address) in ("draining", "drained")
    refused = [e for e in events(admin) if e["status"] in (403, 415)]
    assert len(refused) == 7 and all(e["action"] == "drain" and e["actor"] == "anonymous" for e in refused)
    assert "cross-site request refused (Sec-Fetch-Site: cross-site)" in refused[0]["result"]


def test_a_weight_change_needs_a_json_body(hb, fastlb):
    a = hb("a")
    _, admin = serve(fastlb, [a.address])
    path = f"/api/pools/app/backends/{a.address}/weight"
    status, body = api(admin, "PUT", path, b'{"weight": 0}', headers={"Content-Type": "text/plain"})
    assert status == 415 and "Content-Type: application/json" in body["error"]
    assert api(admin, "GET", "/api/status")[1]["pools"][0]["backends"][0]["weight"] == 1
    assert api(admin, "PUT", path, {"weight": 0})[0] == 200


# --- DNS rebinding: Host ------------------------------------------------------------------------


def test_a_rebinding_host_is_refused_on_every_path(hb, fastlb):
    a = hb("a")
    _, admin = serve(fastlb, [a.address])
    for path in ("/api/status", "/healthz", "/metrics", "/"):
        assert raw(admin, "GET", path, {"Host": f"rebind.attacker.example:{admin}"}) == 421
        assert raw(admin, "GET", path, {"Host": f"127.0.0.1:{admin}"}) == 200
        assert raw(admin, "GET", path, {"Host": f"localhost:{admin}"}) == 200
    status, body = api(admin, "GET", "/api/status", headers={"Host": "evil.example"})
    assert status == 421 and "admin.allowed_hosts" in body["error"]


def test_allowed_hosts_replace_the_default(hb, fastlb):
    a = hb("a")
    _, admin = serve(fastlb, [a.address], 'allowed_hosts = ["lb.example.com", ".ops.example.com"]')
    assert raw(admin, "GET", "/api/status", {"Host": f"lb.example.com:{admin}"}) == 200
    assert raw(admin, "GET", "/api/status", {"Host": "a.ops.example.com"}) == 200
    assert raw(admin, "GET", "/api/status", {"Host": f"127.0.0.1:{admin}"}) == 421


# --- tokens -------------------------------------------------------------------------------------


def with_tokens(tmp_path: Path) -> str:
    (tmp_path / "admin-tokens").write_text(tokens_text(alice=("operate", OPERATE), grafana=("read", READ)))
    return 'tokens_file = "admin-tokens"'


def test_tokens_roles_and_open_paths(hb, fastlb, tmp_path):
    a, b = hb("a"), hb("b")
    _, admin = serve(fastlb, [a.address, b.address], with_tokens(tmp_path))
    drain = f"/api/pools/app/backends/{b.address}/drain"
    status, body = api(admin, "GET", "/api/status")
    assert status == 401 and "Authorization: Bearer" in body["error"]
    assert api(admin, "GET", "/api/status", token="fastlb_wrong")[0] == 401
    assert api(admin, "GET", "/healthz")[0] == 200  # open
    assert api(admin, "GET", "/metrics")[0] == 200  # open
    assert api(admin, "GET", "/")[0] == 200  # the dashboard's page; its data needs the token
    assert api(admin, "GET", "/api/events")[0] == 401
    assert api(admin, "GET", "/api/status", token=READ)[0] == 200
    assert api(admin, "POST", drain)[0] == 401
    status, body = api(admin, "POST", drain, token=READ)
    assert status == 403 and "role read" in body["error"]
    assert state_of_with(admin, b.address, READ) == "up"
    assert api(admin, "POST", drain, token=OPERATE)[0] == 200
    assert state_of_with(admin, b.address, READ) in ("draining", "drained")
    assert (
        api(admin, "PUT", f"/api/pools/app/backends/{a.address}/weight", {"weight": 7}, token=OPERATE)[0]
        == 200
    )
    trail = events(admin, READ)
    assert [(e["actor"], e["action"], e["status"]) for e in trail] == [
        ("anonymous", "drain", 401),
        ("grafana", "drain", 403),
        ("alice", "drain", 200),
        ("alice", "weight", 200),
    ]
    assert trail[2]["target"] == f"app/{b.address}" and trail[2]["client"] == "127.0.0.1"
    assert trail[2]["result"] == "ok" and trail[3]["target"] == f'app/{a.address} {{"weight":7}}'
    assert [e["id"] for e in api(admin, "GET", "/api/events?since=3", token=READ)[1]["events"]] == [4]


def state_of_with(admin: int, address: str, token: str) -> str:
    status, body = api(admin, "GET", "/api/status", token=token)
    assert status == 200, body
    return next(b["state"] for b in body["pools"][0]["backends"] if b["address"] == address)


def test_failed_tokens_are_rate_limited_per_client(hb, fastlb, tmp_path):
    a = hb("a")
    _, admin = serve(fastlb, [a.address], with_tokens(tmp_path))
    codes = [api(admin, "GET", "/api/status", token=f"fastlb_guess{i}")[0] for i in range(12)]
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
    c.request("GET", "/api/status", headers={"Authorization": f"Bearer {OPERATE}"})
    r = c.getresponse()
    r.read()
    c.close()
    assert r.status == 429 and 1 <= int(r.getheader("Retry-After") or 0) <= 6  # blocked even when right
    assert api(admin, "GET", "/healthz")[0] == 200  # open paths still answer
    # requests without a token are not guesses: they do not count
    assert wait_until(lambda: api(admin, "GET", "/api/status", token=OPERATE)[0] == 200, timeout=10)
    assert all(api(admin, "GET", "/api/status")[0] == 401 for _ in range(15))
    assert api(admin, "GET", "/api/status", token=OPERATE)[0] == 200


def test_the_tokens_file_is_reread_on_reload(hb, fastlb, tmp_path):
    a = hb("a")
    _, admin = serve(fastlb, [a.address], with_tokens(tmp_path))
    tokens = tmp_path / "admin-tokens"
    tokens.write_text(tokens.read_text() + tokens_text(bob=("operate", "fastlb_bob")))
    assert api(admin, "GET", "/api/status", token="fastlb_bob")[0] == 401
    assert api(admin, "POST", "/api/reload", token=OPERATE)[0] == 200
    assert api(admin, "GET", "/api/status", token="fastlb_bob")[0] == 200
    # a bad line: the reload is refused and the tokens in force stay
    tokens.write_text(tokens_text(carol=("operate", "fastlb_carol")) + "dave admin 00\n")
    status, body = api(admin, "POST", "/api/reload", token="fastlb_bob")
    assert status == 400
    assert any(e.startswith("admin.tokens_file: admin-tokens: line 2: role 'admin'") for e in body["errors"])
    assert api(admin, "GET", "/api/status", token="fastlb_bob")[0] == 200
    assert api(admin, "GET", "/api/status", token="fastlb_carol")[0] == 401
    assert [(e["actor"], e["action"], e["status"]) for e in events(admin, "fastlb_bob")][-2:] == [
        ("alice", "reload", 200),
        ("bob", "reload", 400),
    ]


def test_fastlb_ctl_with_a_token(hb, fastlb, tmp_path):
    a, b = hb("a"), hb("b")
    _, admin = serve(fastlb, [a.address, b.address], with_tokens(tmp_path))
    token_file = tmp_path / "token"
    token_file.write_text(OPERATE + "\n")

    def ctl(*args: str, env_token: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "FASTLB_ADMIN_TOKEN"}
        if env_token is not None:
            env["FASTLB_ADMIN_TOKEN"] = env_token
        cmd = [sys.executable, "-m", "fastlb", "ctl", "--admin", f"127.0.0.1:{admin}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=30)

    done = ctl("status")
    assert done.returncode == 2 and "a token is needed" in done.stderr
    done = ctl("--token-file", str(token_file), "drain", "app", b.address)
    assert done.returncode == 0, done.stderr
    assert state_of_with(admin, b.address, READ) in ("draining", "drained")
    done = ctl("enable", "app", b.address, env_token=READ)
    assert done.returncode == 2 and "role read" in done.stderr
    assert ctl("enable", "app", b.address, env_token=OPERATE).returncode == 0
    done = ctl("events", env_token=READ)
    assert done.returncode == 0 and "alice" in done.stdout and "grafana" in done.stdout
    missing = ctl("--token-file", str(tmp_path / "nope"), "status")
    assert missing.returncode == 2 and "--token-file: cannot read" in missing.stderr


def test_admin_token_prints_a_token_and_its_line(hb, fastlb, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fastlb", "admin-token", "ci-bot", "operate"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    token, entry = done.stdout.splitlines()
    assert entry == f"ci-bot operate {digest(token).hex()}" and token not in entry
    (tmp_path / "admin-tokens").write_text(entry + "\n")
    a = hb("a")
    _, admin = serve(fastlb, [a.address], 'tokens_file = "admin-tokens"')
    assert api(admin, "POST", f"/api/pools/app/backends/{a.address}/disable", token=token)[0] == 200
    assert events(admin, token)[-1]["actor"] == "ci-bot"
    bad = subprocess.run(
        [sys.executable, "-m", "fastlb", "admin-token", "x", "root"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


# --- what a bind beyond loopback needs ------------------------------------------------------------


def check(tmp_path: Path, admin_keys: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "fastlb.toml"
    path.write_text(http_config(free_port(), [pool("app", ["127.0.0.1:9"])]).replace(
        '[admin]\nbind = "off"', f"[admin]\n{admin_keys}"))  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "fastlb", "check", "-c", str(path)], capture_output=True, text=True
    )


def test_a_public_admin_bind_needs_tokens(tmp_path):
    done = check(tmp_path, 'bind = "0.0.0.0:9901"')
    assert done.returncode == 2
    assert done.stderr.startswith("admin.bind: 0.0.0.0:9901 is reachable beyond this machine")
    assert "admin.tokens_file" in done.stderr and "admin.insecure" in done.stderr
    assert check(tmp_path, 'bind = "10.1.2.3:9901"').returncode == 2
    assert check(tmp_path, 'bind = "0.0.0.0:9901"\ninsecure = true').returncode == 0
    assert check(tmp_path, 'bind = "localhost:9901"').returncode == 0
    assert check(tmp_path, 'bind = "[::1]:9901"').returncode == 0
    (tmp_path / "admin-tokens").write_text(tokens_text(alice=("operate", OPERATE)))
    assert check(tmp_path, 'bind = "0.0.0.0:9901"\ntokens_file = "admin-tokens"').returncode == 0
    missing = check(tmp_path, 'bind = "0.0.0.0:9901"\ntokens_file = "nope"')
    assert missing.returncode == 2 and missing.stderr.startswith("admin.tokens_file: cannot read nope")


def test_serve_refuses_a_public_admin_bind_without_tokens(tmp_path):
    path = tmp_path / "fastlb.toml"
    config = http_config(free_port(), [pool("app", ["127.0.0.1:9"])], admin=f"0.0.0.0:{free_port()}")
    path.write_text(config)
    done = subprocess.run(
        [sys.executable, "-m", "fastlb", "serve", "-c", str(path)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2 and done.stderr.startswith("admin.bind:")


# --- TLS and mTLS -------------------------------------------------------------------------------


def curl(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args, url], capture_output=True, text=True)


def test_admin_over_tls_and_mtls(hb, fastlb, tmp_path):
    ca, clients = trustme.CA(), trustme.CA()
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
        tmp_path / "admin.pem"
    )
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    clients.cert_pem.write_to_path(tmp_path / "ops-ca.pem")
    clients.issue_cert("ops@example.test", common_name="ops").private_key_and_cert_chain_pem.write_to_path(
        tmp_path / "ops.pem"
    )
    trustme.CA().issue_cert("x@example.test").private_key_and_cert_chain_pem.write_to_path(
        tmp_path / "other.pem"
    )
    a, b = hb("a"), hb("b")
    tls = 'tls = { cert = "admin.pem", key = "admin.pem", client_ca = "ops-ca.pem" }'
    _, admin = serve(fastlb, [a.address, b.address], tls)
    url = f"https://127.0.0.1:{admin}"
    plain = curl(f"http://127.0.0.1:{admin}/healthz")
    assert plain.returncode != 0 or "ok" not in plain.stdout  # HTTPS only
    no_cert = curl(f"{url}/api/status", "--cacert", str(tmp_path / "ca.pem"))
    assert no_cert.returncode != 0  # the handshake needs a client certificate
    wrong = curl(
        f"{url}/api/status", "--cacert", str(tmp_path / "ca.pem"), "--cert", str(tmp_path / "other.pem")
    )
    assert wrong.returncode != 0
    auth = ("--cacert", str(tmp_path / "ca.pem"), "--cert", str(tmp_path / "ops.pem"))
    status = curl(f"{url}/api/status", *auth, "-w", "%{http_code}", "-o", "/dev/null")
    assert status.returncode == 0 and status.stdout == "200", status.stderr
    drain = curl(
        f"{url}/api/pools/app/backends/{b.address}/drain", *auth, "-XPOST", "-H", "X-Fastlb-Admin: 1"
    )
    assert drain.returncode == 0 and '"ok": true' in drain.stdout, drain.stdout + drain.stderr
    ctl = subprocess.run(
        [sys.executable, "-m", "fastlb", "ctl", "--admin", url, "--cacert", str(tmp_path / "ca.pem"),
         "--cert", str(tmp_path / "ops.pem"), "--json", "events"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert ctl.returncode == 0, ctl.stderr
    assert '"actor": "cert:ops"' in ctl.stdout and '"action": "drain"' in ctl.stdout


def test_admin_tls_without_client_ca_serves_https(hb, fastlb, tmp_path):
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(tmp_path / "admin.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    a = hb("a")
    _, admin = serve(fastlb, [a.address], 'tls = { cert = "admin.pem", key = "admin.pem" }')
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    c = http.client.HTTPSConnection("127.0.0.1", admin, context=ctx, timeout=10)
    c.request("GET", "/healthz")
    assert c.getresponse().read() == b"ok\n"
    c.close()
    # the Origin check knows the scheme: an http:// page of the same host is another origin
    status = curl(
        f"https://127.0.0.1:{admin}/api/pools/app/backends/{a.address}/disable",
        "--cacert", str(tmp_path / "ca.pem"), "-XPOST", "-H", "X-Fastlb-Admin: 1",
        "-H", f"Origin: http://127.0.0.1:{admin}", "-w", "%{http_code}", "-o", "/dev/null",
    )  # fmt: skip
    assert status.stdout == "403"


def test_an_admin_certificate_that_does_not_match_its_key_is_a_config_error(tmp_path):
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(tmp_path / "admin.pem")
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(tmp_path / "admin.key")
    done = check(tmp_path, 'bind = "127.0.0.1:9901"\ntls = { cert = "admin.pem", key = "admin.key" }')
    assert done.returncode == 2 and done.stderr.startswith("admin.tls.key: admin.key does not match")


# --- the audit trail ------------------------------------------------------------------------------


def test_sighup_reloads_are_audited(hb, fastlb):
    a = hb("a")
    port, admin = free_port(), free_port()
    proc = fastlb(http_config(port, [pool("app", [a.address])], admin=f"127.0.0.1:{admin}"), port)
    proc.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: any(e["action"] == "reload" for e in events(admin)))
    (event,) = events(admin)
    assert (event["actor"], event["client"], event["result"]) == ("signal", "SIGHUP", "ok")
    _, err = proc.stop()
    assert "audit: signal from SIGHUP: reload: ok" in err


# --- the dashboard with a token -------------------------------------------------------------------


def test_dashboard_asks_for_a_token_then_drains_and_enables(hb, fastlb, tmp_path):
    assert CHROMIUM, "the dashboard test needs Debian's chromium (apt-get install chromium)"
    from playwright.sync_api import sync_playwright

    a, b = hb("a"), hb("b")
    port, admin = serve(fastlb, [a.address, b.address], with_tokens(tmp_path))
    for _ in range(5):
        get(port)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{admin}/")
            page.locator("#login-panel").wait_for(state="visible", timeout=10_000)
            page.fill("#token", "fastlb_not-it")
            page.click("#login button[type=submit]")
            page.wait_for_function(
                "() => document.getElementById('login-why').textContent === 'unknown token'"
            )
            page.fill("#token", OPERATE)
            page.click("#login button[type=submit]")
            row = page.locator(f'tr[data-backend="app/{b.address}"]')
            row.wait_for(timeout=10_000)
            row.locator("button[data-action=drain]").click()
            state = f"document.querySelector('tr[data-backend=\"app/{b.address}\"] [data-testid=state]')"
            page.wait_for_function(
                f"() => ['draining', 'drained'].includes({state}.textContent)", timeout=10_000
            )
            assert state_of_with(admin, b.address, READ) in ("draining", "drained")
            row.locator("button[data-action=enable]").click()
            page.wait_for_function(f"() => {state}.textContent === 'up'", timeout=10_000)
            page.wait_for_function("() => document.querySelectorAll('#events tr[data-event]').length === 2")
            assert page.locator("#events tr[data-event] td").nth(1).inner_text() == "alice"
            assert page.evaluate("() => sessionStorage.getItem('fastlb-admin-token')") == OPERATE
            # the token stays with the tab: a new tab (another session) asks again
            other = browser.new_page()
            other.goto(f"http://127.0.0.1:{admin}/")
            other.locator("#login-panel").wait_for(state="visible", timeout=10_000)
        finally:
            browser.close()
    assert state_of_with(admin, b.address, READ) == "up"


# --- the documented configs ---------------------------------------------------------------------


@pytest.mark.parametrize("doc", ["docs/security.md", "README.md"])
def test_documented_admin_configs_check(tmp_path, doc):
    """Every [admin] block of the doc, beside a listener, with the files it names made here."""
    text = (Path(__file__).resolve().parent.parent / doc).read_text()
    blocks = [b.split("```")[0] for b in text.split("```toml\n")[1:]]
    admin_blocks = [b for b in blocks if "tokens_file" in b or "allowed_hosts" in b]
    assert admin_blocks
    ca, clients = trustme.CA(), trustme.CA()
    for k, block in enumerate(admin_blocks):
        folder = tmp_path / str(k)
        admin = tomllib.loads(block)["admin"]
        files = {admin.get("tokens_file"), *(admin.get("tls", {}).values())} - {None}
        for name in files:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if "tokens_file" in admin:
            (folder / admin["tokens_file"]).write_text(tokens_text(alice=("operate", OPERATE)))
        if "tls" in admin:
            leaf = ca.issue_cert("127.0.0.1")
            leaf.cert_chain_pems[0].write_to_path(folder / admin["tls"]["cert"])
            leaf.private_key_pem.write_to_path(folder / admin["tls"]["key"])
            if "client_ca" in admin["tls"]:
                clients.cert_pem.write_to_path(folder / admin["tls"]["client_ca"])
        path = folder / "fastlb.toml"
        path.write_text(
            block + "\n" + http_config(free_port(), [pool("app", ["127.0.0.1:9"])]).split("\n\n", 2)[2]
        )
        config = load_config(path)
        assert config.admin.tokens is None or [t.name for t in config.admin.tokens] == ["alice"]
