"""deploy/: the Kubernetes manifests (parse, standard kinds, the fields a safe rollout depends on,
the embedded fastlb.toml passes `fastlb check` and serves), the Prometheus rules and the Grafana
dashboard (every metric and label they use is one a running `fastlb serve` exports, the rules
say what fastlb's own default alerts say). promtool and kubectl, where installed, check more."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from admin import api, scrape
from h2util import H2Client
from prometheus_client.parser import text_string_to_metric_families

from fastlb.admin_auth import digest
from fastlb.config import DEFAULT_ALERTS, Duration, load_config, split_host_port

from conftest import free_port, wait_until
from udputil import EchoBackend, free_udp_port

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
RULES = ROOT / "deploy" / "prometheus" / "fastlb-rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "fastlb-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "fastlb-dashboard.json"
MANIFESTS = ("configmap.yaml", "secret.yaml", "deployment.yaml", "service.yaml", "pdb.yaml")
KINDS = {
    "ConfigMap": "v1",
    "Secret": "v1",
    "Deployment": "apps/v1",
    "Service": "v1",
    "PodDisruptionBudget": "policy/v1",
}
TARGET_LABELS = {"instance", "job"}  # what Prometheus adds to every scraped series


# --- the Kubernetes manifests ------------------------------------------------------------------


def load(name: str) -> dict[str, Any]:
    docs = list(yaml.safe_load_all((K8S / name).read_text()))
    assert len(docs) == 1, f"{name}: one object per file"
    assert isinstance(docs[0], dict)
    return docs[0]


def objects() -> dict[str, dict[str, Any]]:
    """kind -> the object."""
    return {(o := load(name))["kind"]: o for name in MANIFESTS}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def embedded_toml() -> str:
    return str(objects()["ConfigMap"]["data"]["fastlb.toml"])


def embedded() -> dict[str, Any]:
    return tomllib.loads(embedded_toml())


def port_number(c: dict[str, Any], port: int | str) -> int:
    """A container port given by number or by name."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port in named, f"port {port!r} is not one of the container's {named}"
    return int(named[port])


def test_manifests_parse_as_standard_kinds_and_kustomize_lists_them_all():
    kinds = {load(name)["kind"]: load(name)["apiVersion"] for name in MANIFESTS}
    assert kinds == KINDS
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert listed["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert sorted(listed["resources"]) == sorted(MANIFESTS)
    assert sorted(p.name for p in K8S.glob("*.yaml")) == sorted([*MANIFESTS, "kustomization.yaml"])


def test_selectors_match_the_pod_template():
    o = objects()
    labels = o["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for selector in (
        o["Deployment"]["spec"]["selector"]["matchLabels"],
        o["Service"]["spec"]["selector"],
        o["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector and selector.items() <= labels.items(), (selector, labels)


def test_deployment_replicas_probes_and_a_drain_that_fits_the_grace_period(tmp_path):
    d = objects()["Deployment"]
    spec, c = d["spec"]["template"]["spec"], container(d)
    assert d["spec"]["replicas"] == 2
    assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    admin_host, admin_port = split_host_port(embedded()["admin"]["bind"], bind=True)
    assert admin_host == "0.0.0.0" and admin_port == 9901  # the kubelet probes the pod IP
    for probe in ("readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        assert port_number(c, get["port"]) == admin_port, probe
        assert get.get("scheme", "HTTP") == "HTTP", probe
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    sleep_s = float(command[1])
    assert sleep_s >= 5  # long enough for endpoint removal to reach kube-proxy and the cloud LB
    config = load_config(with_tokens(tmp_path, ""))
    drain_s = max(p.drain_timeout.seconds for p in config.pools)
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > sleep_s + drain_s, (grace, sleep_s, drain_s)


def test_deployment_resources_are_guaranteed_and_the_workers_follow_the_cpu_limit():
    c = container(objects()["Deployment"])
    resources = c["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS: the static CPU manager's case
    cpus = resources["limits"]["cpu"]
    assert str(cpus).isdigit(), "whole CPUs, or the static policy gives no exclusive ones"
    assert embedded()["runtime"]["workers"] == int(cpus)


def test_deployment_mounts_the_config_and_the_tokens_where_the_config_says():
    o = objects()
    d, c = o["Deployment"], container(o["Deployment"])
    volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
    config_path = Path(c["command"][c["command"].index("-c") + 1])
    assert c["command"][:2] == ["fastlb", "serve"]
    assert mounts[str(config_path.parent)]["configMap"]["name"] == o["ConfigMap"]["metadata"]["name"]
    assert config_path.name in o["ConfigMap"]["data"]
    tokens = Path(embedded()["admin"]["tokens_file"])
    assert tokens.is_absolute()  # a ConfigMap's folder is a symlink farm: relative paths mislead
    assert mounts[str(tokens.parent)]["secret"]["secretName"] == o["Secret"]["metadata"]["name"]
    assert tokens.name in o["Secret"]["stringData"]
    # the tokens file is readable by the user fastlb runs as (a Secret's files belong to root)
    pod = d["spec"]["template"]["spec"]["securityContext"]
    mode = mounts[str(tokens.parent)]["secret"].get("defaultMode", 0o644)
    assert pod["runAsUser"] != 0
    assert mode & 0o004 or (mode & 0o040 and pod.get("fsGroup") == pod.get("runAsGroup")), oct(mode)
    assert set(embedded()["admin"]["open"]) == {"/healthz", "/metrics"}


def test_service_is_a_network_load_balancer_keeping_source_addresses():
    o = objects()
    s, c = o["Service"], container(o["Deployment"])
    assert s["spec"]["type"] == "LoadBalancer"
    assert s["spec"]["externalTrafficPolicy"] == "Local"
    listeners = {split_host_port(li["bind"], bind=True)[1] for li in embedded()["listeners"]}
    targets = {port_number(c, p["targetPort"]) for p in s["spec"]["ports"]}
    assert targets == listeners  # every listener, and not the admin port
    assert "aws-load-balancer-proxy-protocol" in (K8S / "service.yaml").read_text()


def test_pod_disruption_budget_keeps_one_available():
    assert objects()["PodDisruptionBudget"]["spec"]["minAvailable"] == 1


def with_tokens(tmp_path: Path, tokens: str) -> Path:
    """The embedded config in `tmp_path`, its tokens_file pointing at a file holding `tokens`."""
    text = embedded_toml()
    path = embedded()["admin"]["tokens_file"]
    assert text.count(f'"{path}"') == 1
    (tmp_path / "admin-tokens").write_text(tokens)
    config = tmp_path / "fastlb.toml"
    config.write_text(text.replace(f'"{path}"', f'"{tmp_path / "admin-tokens"}"'))
    return config


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastlb", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_embedded_config_passes_fastlb_check(tmp_path):
    # as shipped: the Secret's empty tokens file (only /healthz and /metrics answer), a warning
    shipped = objects()["Secret"]["stringData"]["admin-tokens"]
    done = check(with_tokens(tmp_path, shipped))
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr
    assert "has no tokens" in done.stderr
    # with a token: no warning at all
    done = check(with_tokens(tmp_path, f"ops operate {digest('s3cret').hex()}\n"))
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", ""), done.stderr
    # without the tokens file the public admin bind is refused: the Secret is what allows it
    text = embedded_toml()
    bare = tmp_path / "bare.toml"
    bare.write_text(re.sub(r"(?m)^tokens_file = .*$", "", text))
    done = check(bare)
    assert done.returncode == 2 and done.stderr.startswith("admin.bind:"), done.stderr


def test_the_commented_proxy_protocol_line_passes_fastlb_check_once_uncommented(tmp_path):
    config = with_tokens(tmp_path, f"ops operate {digest('s3cret').hex()}\n")
    text = config.read_text()
    line = re.compile(r"(?m)^# (proxy_protocol = \{.*\})$")
    assert len(line.findall(text)) == 1
    config.write_text(line.sub(r"\1", text))
    assert tomllib.loads(config.read_text())["listeners"][0]["proxy_protocol"]["accept"] == "required"
    done = check(config)
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", ""), done.stderr


def test_embedded_config_serves_probes_open_and_the_rest_behind_tokens(fastlb, hb, tmp_path):
    """The shipped file with only its ports and backend changed: the probe and scrape paths
    answer without a token on the wildcard admin bind, the rest asks for one, traffic flows,
    and SIGTERM drains and exits 0."""
    b = hb("b1")
    port, admin = free_port(), free_port()
    text = with_tokens(tmp_path, f"ops operate {digest('s3cret').hex()}\n").read_text()
    for old, new in (
        ('"0.0.0.0:8080"', f'"0.0.0.0:{port}"'),
        ('"0.0.0.0:9901"', f'"0.0.0.0:{admin}"'),
        ('"app.default.svc.cluster.local:8080"', f'"{b.address}"'),
        ('drain_timeout = "30s"', 'drain_timeout = "2s"'),
    ):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    lb = fastlb(text, port)
    host = {"Host": f"10.1.2.3:{admin}"}  # as the kubelet sends it: the pod IP
    assert api(admin, "GET", "/healthz", headers=host) == (200, "ok\n")
    status, metrics = api(admin, "GET", "/metrics", headers=host)
    assert status == 200 and "fastlb_healthy_backends" in metrics
    assert api(admin, "GET", "/api/status", headers=host)[0] == 401
    assert api(admin, "GET", "/api/status", headers=host, token="s3cret")[0] == 200
    assert wait_until(lambda: http_get(port) == (200, "b1"), 10)
    code, err = lb.stop(signal.SIGTERM)
    assert code == 0, err


def http_get(port: int, path: str = "/") -> tuple[int, str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        return r.status, r.getheader("x-backend") or ""
    except OSError:
        return 0, ""
    finally:
        c.close()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_builds_the_set():
    done = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    built = [o["kind"] for o in yaml.safe_load_all(done.stdout)]
    assert sorted(built) == sorted(KINDS)


# --- the Prometheus rules and the Grafana dashboard ---------------------------------------------


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r for g in groups for r in g["rules"]]


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable."""
    out = []
    for p in dashboard()["panels"]:
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r}", t["expr"]))
    for v in dashboard()["templating"]["list"]:
        if v["type"] == "query":
            out.append((f"variable {v['name']}", v["query"]["query"]))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    return [(f"alert {r['alert']}", r["expr"]) for r in rules()]


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_METRIC = re.compile(r"(?<![A-Za-z0-9_:])fastlb_[A-Za-z0-9_:]*")
_SELECTOR = re.compile(r"(fastlb_[A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"label_values\(\s*(fastlb_[A-Za-z0-9_:]*)[^,]*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)")


def metric_names(expr: str) -> set[str]:
    """The fastlb_ series names an expression reads (string literals left out)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def label_uses(expr: str) -> tuple[list[tuple[str, str]], set[str]]:
    """(metric, label) of every selector matcher and label_values(), and the labels of every
    grouping or matching clause."""
    bare = _STRING.sub('""', expr)
    selected = [(m, name) for m, body in _SELECTOR.findall(bare) for name in _MATCHER.findall(body)]
    selected += _LABEL_VALUES.findall(bare)
    grouped = {name.strip() for body in _GROUPING.findall(bare) for name in body.split(",") if name.strip()}
    return selected, grouped


def test_the_promql_parsing_here_sees_names_labels_and_histogram_series():
    expr = (
        'sum by (listener, le) (rate(fastlb_request_duration_seconds_bucket{instance=~"$i", '
        'code="fastlb_not_a_metric"}[5m])) and on (pool) fastlb_healthy_backends'
    )
    assert metric_names(expr) == {"fastlb_request_duration_seconds_bucket", "fastlb_healthy_backends"}
    selected, grouped = label_uses(expr)
    assert selected == [
        ("fastlb_request_duration_seconds_bucket", "instance"),
        ("fastlb_request_duration_seconds_bucket", "code"),
    ]
    assert grouped == {"listener", "le", "pool"}
    assert label_uses('label_values(fastlb_x{a=~"$b"}, listener)')[0] == [
        ("fastlb_x", "a"),
        ("fastlb_x", "listener"),
    ]


def exported(text: str) -> tuple[dict[str, set[str]], dict[str, str]]:
    """From a /metrics scrape: the labels of each series name that has samples, and the family
    (histogram `_bucket`/`_sum`/`_count` and counter `_total` series map to theirs) of each."""
    labels: dict[str, set[str]] = {}
    family: dict[str, str] = {}
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            labels.setdefault(s.name, set()).update(s.labels)
            family[s.name] = f.name
    return labels, family


@pytest.fixture
def busy_fastlb(fastlb, hb, tmp_path) -> Iterator[tuple[int, str, str]]:
    """A `fastlb serve` with http (HTTP/1 and h2c), https and udp listeners that has served a
    little of each, one backend drained: (admin port, that backend's address, the /metrics text)."""
    ca = trustme.CA()
    cert = ca.issue_cert("site.test")
    (tmp_path / "site.pem").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(tmp_path / "site.key"))
    b1, b2 = hb("b1"), hb("b2")
    echo = EchoBackend("echo")
    web, secure, admin, dns = free_port(), free_port(), free_port(), free_udp_port()
    config = f"""
[runtime]
workers = 2
cpu_affinity = "off"
[admin]
bind = "127.0.0.1:{admin}"
[[listeners]]
name = "web"
bind = "127.0.0.1:{web}"
protocol = "http"
pool = "app"
[[listeners]]
name = "secure"
bind = "127.0.0.1:{secure}"
protocol = "https"
pool = "app"
  [listeners.tls]
  certificates = [{{ cert = "site.pem", key = "site.key" }}]
[[listeners]]
name = "dns"
bind = "127.0.0.1:{dns}"
protocol = "udp"
pool = "udp"
[[pools]]
name = "app"
backends = [{{ address = "{b1.address}" }}, {{ address = "{b2.address}" }}]
health = {{ type = "none" }}
[[pools]]
name = "udp"
backends = [{{ address = "{echo.address}" }}]
health = {{ type = "none" }}
"""
    try:
        fastlb(config, web)
        assert http_get(web)[0] == 200
        assert http_get(web, "/status/503")[0] == 503
        with H2Client(web) as h2c:
            assert h2c.get("/").status == 200
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        raw = socket.create_connection(("127.0.0.1", secure), timeout=5)
        with ctx.wrap_socket(raw, server_hostname="site.test") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n")
            assert tls.recv(100).startswith(b"HTTP/1.1 200")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(5)
            u.sendto(b"ping", ("127.0.0.1", dns))
            assert u.recvfrom(100)[0] == b"ping"
        assert api(admin, "POST", f"/api/pools/app/backends/{b2.address}/drain")[0] == 200
        status, text = api(admin, "GET", "/metrics")
        assert status == 200
        yield admin, b2.address, text
    finally:
        echo.close()


def test_every_metric_and_label_of_the_rules_and_dashboard_is_exported(busy_fastlb):
    _, _, text = busy_fastlb
    labels, family = exported(text)
    used = rule_exprs() + dashboard_exprs()
    assert len(used) > 20
    problems = []
    for where, expr in used:
        names = metric_names(expr)
        if not names:
            problems.append(f"{where}: reads no fastlb_ metric: {expr}")
        problems += [f"{where}: {n} has no series in /metrics" for n in sorted(names - labels.keys())]
        selected, grouped = label_uses(expr)
        for metric, label in selected:
            if metric in labels and label not in labels[metric] | TARGET_LABELS:
                problems.append(f"{where}: {metric} has no label {label!r} ({sorted(labels[metric])})")
        known = set().union(*(labels.get(n, set()) for n in names)) | TARGET_LABELS
        problems += [f"{where}: no metric it reads has the label {g!r}" for g in sorted(grouped - known)]
    assert not problems, "\n".join(problems)
    # the families the brief asked the dashboard to show, and the four the rules need
    shown = {family[n] for _, e in dashboard_exprs() for n in metric_names(e) if n in family}
    assert shown >= {
        "fastlb_requests",
        "fastlb_request_duration_seconds",
        "fastlb_healthy_backends",
        "fastlb_connections_active",
        "fastlb_bytes",
        "fastlb_tls_handshakes",
        "fastlb_http2_streams_active",
        "fastlb_udp_datagrams",
        "fastlb_backend_state",
    }, shown


def test_backend_state_counts_the_draining_backend(busy_fastlb):
    admin, drained, _ = busy_fastlb

    def states() -> dict[str, float]:
        m = scrape(admin)
        return {
            dict(k[1])["state"]: v
            for k, v in m.items()
            if k[0] == "fastlb_backend_state" and dict(k[1])["backend"] == drained
        }

    assert set(states()) == {"up", "down", "draining", "drained", "disabled"}
    assert wait_until(lambda: states()["drained"] == 1, 10)  # idle: drained at once or soon
    assert sum(states().values()) == 1


def test_rules_are_fastlbs_default_alerts_with_labels_and_annotations():
    defaults = {a["name"]: a for a in DEFAULT_ALERTS if a["name"] != "CanaryRolledBack"}
    by_name = {r["alert"]: r for r in rules()}
    assert by_name.keys() == defaults.keys()
    for name, r in by_name.items():
        assert Duration.parse(r["for"]).seconds == Duration.parse(defaults[name]["for"]).seconds, name
        # the same comparison and number (the unit tests in fastlb-rules.test.yml show the rest)
        _, op, threshold = defaults[name]["expr"].split()
        assert re.search(rf"(?<![<>=!]){re.escape(op)}(?!=)", r["expr"]), (name, op)
        assert re.search(rf"(?<![\w.]){re.escape(threshold)}(?![\w.])", r["expr"]), (name, threshold)
        assert r["labels"]["severity"] in ("critical", "warning", "info"), name
        assert r["annotations"]["summary"] and r["annotations"]["description"], name


def test_dashboard_takes_its_datasource_from_a_variable():
    d = dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": "${datasource}"}
    panels = [p for p in d["panels"] if p["type"] != "row"]
    assert panels
    for p in panels:
        assert p["datasource"] == ref, p["title"]
        assert p["targets"] and all(t["datasource"] == ref for t in p["targets"]), p["title"]
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == ref, v["name"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    assert d["uid"] == "fastlb" and d["id"] is None  # importable anywhere


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)")
def test_promtool_checks_the_rules_runs_their_unit_tests_and_parses_the_dashboard(tmp_path):
    assert PROMTOOL is not None
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULES_TEST)]):
        done = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    # the dashboard's queries, with Grafana's variables filled in, as recording rules
    recorded = []
    for i, (where, expr) in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            continue
        expr = expr.replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$listener", ".*")
        assert "$" not in expr, (where, expr)
        recorded.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    done = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
