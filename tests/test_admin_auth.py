"""The admin API's pure checks (fastlb.admin_auth): tokens file, token match, Host, cross-site
and the failed-attempt limit. Through real processes: test_admin_security.py."""

from __future__ import annotations

import pytest

from fastlb.admin_auth import (
    FailedAttempts,
    Token,
    check_token,
    cross_site,
    default_allowed_hosts,
    digest,
    host_allowed,
    is_loopback_host,
    new_token,
    parse_tokens,
)


def line(name: str, role: str, token: str) -> str:
    return f"{name} {role} {digest(token).hex()}"


def test_tokens_file_lines_comments_and_blank_lines() -> None:
    text = "# ops\n\n" + line("alice", "operate", "t1") + "\n  " + line("grafana", "read", "t2") + "  \n"
    tokens, errors = parse_tokens(text)
    assert errors == []
    assert [(t.name, t.role) for t in tokens] == [("alice", "operate"), ("grafana", "read")]
    assert tokens[0].sha256 == digest("t1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alice operate", 'line 1: expected "NAME ROLE SHA256HEX"'),
        (f"alice admin {'0' * 64}", 'line 1: role \'admin\': must be "read" or "operate"'),
        ("alice read fastlb_abc", "line 1: not a SHA-256 digest (64 hex digits); store the digest"),
        (f"al/ice read {'0' * 64}", "line 1: name 'al/ice'"),
        (f"a read {'0' * 64}\na operate {'1' * 64}", "line 2: name 'a' is already on line 1"),
    ],
)
def test_tokens_file_errors_name_the_line(text: str, message: str) -> None:
    _, errors = parse_tokens(text)
    assert len(errors) == 1 and errors[0].startswith(message), errors


def test_a_token_matches_its_entry_only() -> None:
    tokens, _ = parse_tokens(line("a", "read", "one") + "\n" + line("b", "operate", "two"))
    assert check_token("two", tokens) == tokens[1]
    assert check_token("one", tokens) == tokens[0]
    assert check_token("three", tokens) is None
    assert check_token(digest("one").hex(), tokens) is None  # the digest itself is not a token
    assert check_token("", tokens) is None


def test_roles() -> None:
    read, operate = Token("r", "read", b""), Token("o", "operate", b"")
    assert read.may("GET") and not read.may("POST") and not read.may("put") and not read.may("DELETE")
    assert operate.may("POST") and operate.may("GET")


def test_new_tokens_are_long_and_distinct() -> None:
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50 and all(t.startswith("fastlb_") and len(t) >= 40 for t in tokens)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("localhost", True), ("LOCALHOST.", True),
     ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("lb.internal", False)],
)  # fmt: skip
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_default_hosts_are_the_bind_address_and_localhost() -> None:
    hosts = default_allowed_hosts("10.0.0.5")
    assert host_allowed("10.0.0.5:9901", hosts)
    assert host_allowed("localhost:9901", hosts) and host_allowed("127.0.0.1", hosts)
    assert host_allowed("[::1]:9901", hosts)
    assert not host_allowed("10.0.0.6:9901", hosts)
    assert not host_allowed("attacker.example:9901", hosts)


def test_a_wildcard_bind_allows_ip_literals_but_no_names() -> None:
    hosts = default_allowed_hosts("0.0.0.0")
    assert host_allowed("192.168.1.20:9901", hosts) and host_allowed("[2001:db8::1]:9901", hosts)
    assert not host_allowed("rebind.attacker.example:9901", hosts)
    assert not host_allowed("192.168.1.20.nip.io", hosts)


@pytest.mark.parametrize(
    ("header", "allowed"),
    [("lb.example.com", True), ("LB.Example.COM.:443", True), ("ops.lb.example.com", True),
     ("example.com", False), ("evil-lb.example.com", False), ("lb.example.com.evil", False),
     ("", False), ("a:b:c", False), ("[nope]:80", False)],
)  # fmt: skip
def test_listed_hosts_and_domains(header: str, allowed: bool) -> None:
    assert host_allowed(header, ["lb.example.com", ".lb.example.com"]) is allowed


def test_star_allows_any_host_and_a_missing_host_passes() -> None:
    assert host_allowed("anything.example", ["*"])
    assert host_allowed(None, ["localhost"])


@pytest.mark.parametrize(
    ("origin", "fetch_site", "refused"),
    [
        (None, None, None),
        ("http://127.0.0.1:9901", None, None),
        (None, "same-origin", None),
        (None, "none", None),  # typed into the address bar, a bookmark
        ("http://evil.example", None, "Origin: http://evil.example"),
        ("http://127.0.0.1:9902", None, "Origin: http://127.0.0.1:9902"),
        ("https://127.0.0.1:9901", None, "Origin: https://127.0.0.1:9901"),  # another scheme
        ("null", None, "Origin: null"),  # sandboxed frames, file://
        (None, "cross-site", "Sec-Fetch-Site: cross-site"),
        (None, "same-site", "Sec-Fetch-Site: same-site"),  # a sibling subdomain is another origin
        ("http://127.0.0.1:9901", "cross-site", "Sec-Fetch-Site: cross-site"),
    ],
)
def test_cross_site(origin: str | None, fetch_site: str | None, refused: str | None) -> None:
    assert cross_site(origin, fetch_site, "127.0.0.1:9901", "http") == refused


def test_same_origin_on_default_ports() -> None:
    assert cross_site("https://lb.example.com", None, "lb.example.com", "https") is None
    assert cross_site("https://lb.example.com:443", None, "lb.example.com", "https") is None
    assert cross_site("http://lb.example.com", None, "lb.example.com:8080", "http") is not None


def test_failed_attempts_block_a_client_until_its_bucket_refills() -> None:
    limit = FailedAttempts(burst=3, refill_s=10.0)
    for _ in range(3):
        assert limit.blocked_for("10.0.0.1", now=100.0) == 0.0
        limit.failed("10.0.0.1", now=100.0)
    assert limit.blocked_for("10.0.0.1", now=100.0) == pytest.approx(10.0)
    assert limit.blocked_for("10.0.0.2", now=100.0) == 0.0  # another client is not affected
    assert limit.blocked_for("10.0.0.1", now=105.0) == pytest.approx(5.0)
    assert limit.blocked_for("10.0.0.1", now=110.0) == 0.0
    limit.failed("10.0.0.1", now=110.0)  # one attempt back, used: blocked again
    assert limit.blocked_for("10.0.0.1", now=110.0) > 0


def test_failed_attempts_track_a_bounded_number_of_clients() -> None:
    limit = FailedAttempts(burst=1, refill_s=60.0, clients=100)
    for i in range(1000):
        limit.failed(f"10.0.{i // 256}.{i % 256}", now=0.0)
    assert len(limit._buckets) == 100
    assert limit.blocked_for("10.0.3.231", now=0.0) > 0  # the most recent are kept
