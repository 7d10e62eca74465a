"""The monitoring content: alert rules, their unit tests, the Grafana dashboard.

Static checks (no daemon needed): promtool accepts the rules and their unit tests pass; every
metric, label and `result` value the rules and the dashboard use is one the daemon exports (as the
contract lists them, below); the dashboard's queries parse; every alert is documented and tested.
Central mode's alerts and panels (the Lease holder, the Kubernetes API requests) are checked the
same way, statically: the daemon below writes files and exports no API requests. So are the
issuer's (auth.method login_as_customer or cloud_service_otp): the daemon below logs customers in
with their passwords and must export no issuer metric.

End to end: the daemon runs against the dev server, its /metrics passes `promtool check metrics`
and holds every metric the rules and the dashboard use; a real Prometheus server scrapes it with
the rules loaded, sees both tokens valid, evaluates every rule and every dashboard query, stays
quiet while all is well, and fires MagentoTokenConfigReloadFailed after a bad SIGHUP reload.
Everything listens on 127.0.0.1 only, on free ports, and every wait is bounded.
"""
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
ALERTS = ROOT / "charts" / "magento-token-sidecar" / "files" / "alerts.yaml"
DASHBOARD = ROOT / "charts" / "magento-token-sidecar" / "files" / "dashboard.json"
ALERT_TESTS = ROOT / "monitoring" / "alerts.test.yaml"

# The daemon's metrics as the contract lists them: name -> (type, labels).
REFRESH_RESULTS = {"success", "auth_failure", "http_error", "network_error", "invalid_response", "write_error", "blocked"}
RELOAD_RESULTS = {"success", "failure"}
VALIDATION_RESULTS = {"valid", "revoked", "error"}
NOTIFY_RESULTS = {"success", "failure"}
CONTRACT_METRICS = {
    "magento_token_refresh_total": ("counter", {"customer", "result"}),
    "magento_token_refresh_duration_seconds": ("histogram", set()),
    "magento_token_expiry_timestamp_seconds": ("gauge", {"customer"}),
    "magento_token_last_success_timestamp_seconds": ("gauge", {"customer"}),
    "magento_token_next_refresh_timestamp_seconds": ("gauge", {"customer"}),
    "magento_token_consecutive_failures": ("gauge", {"customer"}),
    "magento_token_valid": ("gauge", {"customer"}),
    "magento_token_config_reloads_total": ("counter", {"result"}),
    "magento_token_build_info": ("gauge", {"version"}),
    "magento_token_notify_total": ("counter", {"customer", "result"}),
}
# Exported by the daemon beyond the contract's table: MagentoTokenPasswordUnreadable uses the
# password errors, MagentoTokenLockoutBudgetSpent (and the exclusions of MagentoTokenRefreshFailing
# and MagentoTokenCredentialsRejected) the held-back gauge, MagentoTokenRevokedRepeatedly the
# checks of the token on disk; the dashboard shows them all.
EXTRA_METRICS = {
    "magento_token_password_errors_total": ("counter", {"customer"}),
    "magento_token_paused": ("gauge", {"customer"}),
    "magento_token_held_back": ("gauge", {"customer"}),
    "magento_token_validations_total": ("counter", {"customer", "result"}),
}
DAEMON_METRICS = CONTRACT_METRICS | EXTRA_METRICS
# Central mode (output.kubernetes, issue 11): the Lease holder and the daemon's requests to the
# Kubernetes API. Static checks know them; the end-to-end tests below run the daemon with
# output.dir, where it makes no API request, so they do not expect them on /metrics.
KUBERNETES_RESULTS = {"success", "conflict", "not_found", "already_exists", "forbidden", "unavailable", "error"}
KUBERNETES_METRICS = {
    "magento_token_leader": ("gauge", set()),
    "magento_token_kubernetes_requests_total": ("counter", {"resource", "verb", "result"}),
}
# Tokens without customer passwords (auth.method login_as_customer or cloud_service_otp, issue 22):
# the credential that gets every customer's token (the issuer: an admin token or an IMS access
# token). None of these exists with auth.method password, the end-to-end daemon below: static
# checks know them, and the end-to-end test checks that they are absent there.
AUTH_METHODS = {"login_as_customer", "cloud_service_otp"}
ISSUER_METRICS = {
    "magento_token_issuer_refresh_total": ("counter", {"method", "result"}),
    "magento_token_issuer_expiry_timestamp_seconds": ("gauge", {"method"}),
    "magento_token_issuer_held_back": ("gauge", {"method"}),
}
LABEL_VALUES = {
    "magento_token_kubernetes_requests_total": {
        "resource": {"secret", "lease"},
        "verb": {"get", "create", "update", "patch"},
    },
} | {name: {"method": AUTH_METHODS} for name in ISSUER_METRICS}
RESULT_VALUES = {
    "magento_token_refresh_total": REFRESH_RESULTS,
    "magento_token_config_reloads_total": RELOAD_RESULTS,
    "magento_token_validations_total": VALIDATION_RESULTS,
    "magento_token_notify_total": NOTIFY_RESULTS,
    "magento_token_kubernetes_requests_total": KUBERNETES_RESULTS,
    "magento_token_issuer_refresh_total": REFRESH_RESULTS,
}
# The standard process collector's metrics (Linux).
PROCESS_METRICS = {
    "process_cpu_seconds_total", "process_open_fds", "process_max_fds", "process_virtual_memory_bytes",
    "process_virtual_memory_max_bytes", "process_resident_memory_bytes", "process_start_time_seconds",
    "process_threads",
}
# Labels every scraped series gets from its target. The chart's ServiceMonitor and PodMonitor add
# `namespace` (and, in central mode, the release as `app_kubernetes_io_instance`, podTargetLabels):
# the leader alerts group by them, so two releases' Leases are never summed together. Where a
# scrape sets neither they are empty, and the alerts group by job alone.
TARGET_LABELS = {"job", "instance", "namespace", "app_kubernetes_io_instance"}


def sample_labels() -> dict:
    """Every sample name the daemon exposes (histograms expanded), with the labels it carries."""
    out = {}
    for name, (kind, labels) in (DAEMON_METRICS | KUBERNETES_METRICS | ISSUER_METRICS).items():
        if kind == "histogram":
            out[name + "_bucket"] = labels | {"le"}
            out[name + "_sum"] = set(labels)
            out[name + "_count"] = set(labels)
        else:
            out[name] = set(labels)
    for name in PROCESS_METRICS:
        out[name] = set()
    out["up"] = set()  # added by Prometheus for each target
    return {name: labels | TARGET_LABELS for name, labels in out.items()}


KNOWN = sample_labels()

# --- a small PromQL reader: enough for metric names, matchers and grouping labels ----------------

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                   "unless", "offset", "inf", "nan", "atan2"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}")
MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def metric_names(expr: str) -> set:
    """Metric names an expression selects: identifiers that are not functions, keywords, label
    names in grouping clauses or matchers, durations or Grafana variables."""
    e = re.sub(r"\{[^}]*\}", " ", expr)  # matchers (strings inside them go too)
    e = _strip_strings(e)
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range and subquery durations
    e = GROUPING.sub(" ", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        before = e[m.start() - 1] if m.start() else " "
        if before.isalnum() or before in "_$.":  # part of a number, duration or $variable
            continue
        if e[m.end():].lstrip().startswith("("):  # function or aggregation
            continue
        if m.group(0).lower() in PROMQL_KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def selectors(expr: str):
    """(metric name or None, [(label, op, value)]) for every {...} selector."""
    for m in SELECTOR.finditer(expr):
        body = m.group(2)
        matchers = MATCHER.findall(body)
        rebuilt = ",".join(f'{l}{op}"{v}"' for l, op, v in matchers)
        assert re.sub(r"\s", "", rebuilt) == re.sub(r"\s|,$", "", body), f"cannot read matchers {body!r}"
        yield m.group(1), matchers


def grouping_labels(expr: str) -> set:
    labels = set()
    for m in GROUPING.finditer(_strip_strings(expr)):
        labels |= {l.strip() for l in m.group(2).split(",") if l.strip()}
    return labels


def test_promql_reader_reads_what_the_rules_use():
    assert metric_names('sum by (le) (rate(a_bucket{job=~"$job"}[$__rate_interval]))') == {"a_bucket"}
    assert metric_names("(x - time()) < 600 and y == 1") == {"x", "y"}
    assert metric_names("a >= 3 unless ignoring (result) increase(b{result=\"x\"}[1h]) > 0") == {"a", "b"}
    assert metric_names("c offset 15m or absent(up{job=~\".*\"}) or vector(0)") == {"c", "up"}
    assert metric_names("histogram_quantile(0.99, sum(rate(h[5m])) by (le)) * 1e3") == {"h"}
    assert list(selectors('m{a="1", b!~"x|y"}')) == [("m", [("a", "=", "1"), ("b", "!~", "x|y")])]
    assert grouping_labels("sum by (customer, result) (x) / on(instance) group_left(version) y") == {
        "customer", "result", "instance", "version"}


# --- the files -------------------------------------------------------------------------------


def load_rules() -> list:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dash: dict):
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def dashboard_exprs(dash: dict) -> list:
    """(panel title, expression) of every query, in order."""
    return [(p.get("title", ""), t["expr"]) for p in dashboard_panels(dash) for t in p.get("targets", [])]


def grafana_to_promql(expr: str) -> str:
    """The dashboard's queries with Grafana's variables replaced as Grafana would for "All"."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?(\w+)\}?", ".+", expr)


def rule_exprs() -> list:
    return [(r.get("alert") or r.get("record"), r["expr"]) for r in load_rules()]


def used_exprs() -> list:
    return [("alerts.yaml: " + n, e) for n, e in rule_exprs()] + [
        ("dashboard.json: " + n, e) for n, e in dashboard_exprs(load_dashboard())]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: install Debian's prometheus package (scripts/test does)")
    return path


def run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)


# --- (1) promtool --------------------------------------------------------------------------------


def test_promtool_checks_the_rules():
    res = run([promtool(), "check", "rules", str(ALERTS)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in res.stdout


def test_promtool_unit_tests_of_the_rules_pass():
    res = run([promtool(), "test", "rules", str(ALERT_TESTS.relative_to(ROOT))], cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_dashboard_queries_parse(tmp_path):
    """promtool has no query checker, but it parses recording rules: one per dashboard query."""
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
             for i, (_, expr) in enumerate(dashboard_exprs(load_dashboard()))]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = run([promtool(), "check", "rules", str(path)])
    assert res.returncode == 0, res.stdout + res.stderr


# --- (2) names, labels, values ---------------------------------------------------------------


def _expr_params():
    seen = {}
    for where, expr in used_exprs():
        seen[where] = seen.get(where, 0) + 1
        yield pytest.param(where, expr, id=where if seen[where] == 1 else f"{where} #{seen[where]}")


@pytest.mark.parametrize("where,expr", list(_expr_params()))
def test_queries_use_only_exported_metrics_and_labels(where, expr):
    names = metric_names(expr)
    assert names, f"{where}: no metric found in {expr!r}"
    unknown = names - KNOWN.keys()
    assert not unknown, f"{where}: {sorted(unknown)} not exported by the daemon"
    for name, matchers in selectors(expr):
        allowed = KNOWN[name] if name else set().union(*(KNOWN[n] for n in names))
        for label, op, value in matchers:
            assert label in allowed | {"__name__"}, f"{where}: {name} has no label {label!r}"
            allowed_values = {"result": RESULT_VALUES.get(name)} | LABEL_VALUES.get(name, {})
            if allowed_values.get(label) is None:
                continue
            if op in ("=", "!="):
                assert value in allowed_values[label], f"{where}: {name} has no {label} {value!r}"
            elif re.fullmatch(r"[a-z_]+(\|[a-z_]+)*", value):  # a plain alternation, a|b|c
                unknown = set(value.split("|")) - allowed_values[label]
                assert not unknown, f"{where}: {name} has no {label} {sorted(unknown)}"
    all_labels = set().union(*(KNOWN[n] for n in names))
    missing = grouping_labels(expr) - all_labels
    assert not missing, f"{where}: groups by {sorted(missing)}, which {sorted(names)} do not carry"


def test_the_dashboard_covers_what_operators_look_at():
    used = set().union(*(metric_names(e) for _, e in dashboard_exprs(load_dashboard())))
    for name in ["magento_token_expiry_timestamp_seconds", "magento_token_refresh_total",
                 "magento_token_refresh_duration_seconds_bucket", "magento_token_consecutive_failures",
                 "magento_token_valid", "magento_token_next_refresh_timestamp_seconds",
                 "magento_token_config_reloads_total", "magento_token_held_back",
                 "magento_token_validations_total", "magento_token_notify_total",
                 "process_resident_memory_bytes",
                 "process_cpu_seconds_total"]:
        assert name in used, f"no dashboard panel shows {name}"


def central_only(expr: str) -> bool:
    """A query of central mode's metrics alone: empty where the daemon writes files."""
    names = metric_names(expr)
    return bool(names) and names <= KUBERNETES_METRICS.keys()


def issuer_only(expr: str) -> bool:
    """A query of the issuer's metrics alone: empty with auth.method password."""
    names = metric_names(expr)
    return bool(names) and names <= ISSUER_METRICS.keys()


def test_central_mode_alerts_and_panels():
    """Issue 11: an alert when no replica holds the Lease, when two do, and when the daemon's
    API requests are refused (RBAC) or keep failing; panels of the holder per pod and of the
    API requests by result."""
    rules = {r["alert"]: r for r in load_rules()}
    for name, metric in [("MagentoTokenNoLeader", "magento_token_leader"),
                         ("MagentoTokenSplitLeader", "magento_token_leader"),
                         ("MagentoTokenKubernetesApiErrors", "magento_token_kubernetes_requests_total")]:
        assert name in rules, f"no alert {name}"
        assert metric in metric_names(rules[name]["expr"]), name
        assert rules[name]["labels"]["severity"] == "critical", name
    # Grouped per installation (job, namespace, release), never summed across releases.
    for name in ("MagentoTokenNoLeader", "MagentoTokenSplitLeader"):
        assert {"job", "namespace", "app_kubernetes_io_instance"} <= grouping_labels(rules[name]["expr"]), name
    panels = {p.get("title"): p for p in dashboard_panels(load_dashboard())}
    leader = panels.get("Lease holder by pod")
    assert leader and leader["type"] == "state-timeline", "no 'Lease holder by pod' panel"
    assert metric_names(leader["targets"][0]["expr"]) == {"magento_token_leader"}
    assert "{{instance}}" in leader["targets"][0]["legendFormat"]
    api = panels.get("Kubernetes API requests by result")
    assert api, "no 'Kubernetes API requests by result' panel"
    expr = api["targets"][0]["expr"]
    assert metric_names(expr) == {"magento_token_kubernetes_requests_total"} and "result" in grouping_labels(expr)


def test_issuer_alerts_and_panels():
    """Issue 22: alerts for an issuer that keeps failing, one held back by the admin's lockout
    budget, one whose token is about to expire, and a customer Magento will not issue a token for;
    panels of the issuer's token's time left and of its refreshes by result. The customer alerts
    whose cause is the issuer's step aside for it."""
    rules = {r["alert"]: r for r in load_rules()}
    for name, metric, severity in [
        ("MagentoTokenIssuerFailing", "magento_token_issuer_refresh_total", "warning"),
        ("MagentoTokenIssuerHeldBack", "magento_token_issuer_held_back", "critical"),
        ("MagentoTokenIssuerExpiringSoon", "magento_token_issuer_expiry_timestamp_seconds", "warning"),
        ("MagentoTokenIssuerRefusesCustomer", "magento_token_refresh_total", "critical"),
    ]:
        assert name in rules, f"no alert {name}"
        assert metric in metric_names(rules[name]["expr"]), name
        assert rules[name]["labels"]["severity"] == severity, name
        assert "$labels.method" in rules[name]["annotations"]["description"], f"{name}: description names no method"
    for name in ("MagentoTokenLockoutBudgetSpent", "MagentoTokenRefreshFailing", "MagentoTokenLoginBlocked"):
        assert "magento_token_issuer_held_back" in metric_names(rules[name]["expr"]), f"{name} does not step aside for the issuer"
    panels = {p.get("title"): p for p in dashboard_panels(load_dashboard())}
    left = panels.get("Issuer token time left")
    assert left, "no 'Issuer token time left' panel"
    expr = left["targets"][0]["expr"]
    assert metric_names(expr) == {"magento_token_issuer_expiry_timestamp_seconds"} and "time()" in expr
    assert left["fieldConfig"]["defaults"]["unit"] == "s"
    refreshes = panels.get("Issuer refreshes by result")
    assert refreshes, "no 'Issuer refreshes by result' panel"
    expr = refreshes["targets"][0]["expr"]
    assert metric_names(expr) == {"magento_token_issuer_refresh_total"} and "result" in grouping_labels(expr)
    held = panels.get("Issuer held back")
    assert held and metric_names(held["targets"][0]["expr"]) == {"magento_token_issuer_held_back"}


def test_dashboard_shape():
    dash = load_dashboard()
    assert dash["schemaVersion"] >= 36
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    customer = variables["customer"]
    assert customer["type"] == "query" and customer["multi"] and customer["includeAll"]
    query = customer["query"] if isinstance(customer["query"], str) else customer["query"]["query"]
    assert re.fullmatch(r"label_values\(magento_token_valid(\{[^}]*\})?,\s*customer\)", query), query
    ids, cells = set(), set()
    for panel in dashboard_panels(dash):
        assert panel["id"] not in ids, f"panel id {panel['id']} used twice"
        ids.add(panel["id"])
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, f"{panel['title']} is wider than the grid"
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for t in panel["targets"]:
            assert t["datasource"] == panel["datasource"], panel["title"]


def test_every_alert_is_documented():
    rules = load_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names repeat"
    for r in rules:
        name = r["alert"]
        assert re.fullmatch(r"MagentoToken[A-Z][A-Za-z]+", name), name
        assert r["labels"]["severity"] in {"warning", "critical"}, name
        ann = r["annotations"]
        for key in ("summary", "description", "runbook"):
            assert ann.get(key, "").strip(), f"{name}: no {key}"
        per_customer = any("customer" in KNOWN[n] for n in metric_names(r["expr"]))
        if per_customer:
            assert "$labels.customer" in ann["description"], f"{name}: description does not name the customer"
        assert "$labels." in ann["description"] or "absent(" in r["expr"], f"{name}: description names no target"


def test_every_alert_has_firing_and_quiet_unit_tests():
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    assert tests["rule_files"] == ["../charts/magento-token-sidecar/files/alerts.yaml"]
    firing, quiet = set(), set()
    for case in tests["tests"]:
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
    alerts = {r["alert"] for r in load_rules()}
    assert alerts - firing == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown quiet"
    assert firing | quiet <= alerts, "tests name alerts that do not exist"


# --- (3) end to end ------------------------------------------------------------------------------

# Plain urllib, never through a proxy from the environment: everything here is on loopback.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 5) -> tuple:
    try:
        with HTTP.open(url, timeout=timeout) as res:
            return res.status, res.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except (urllib.error.URLError, ConnectionError, socket.timeout) as err:
        return None, str(err)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, interval: float = 0.5, alive=()):
    """Poll check() -> (done, detail) until done or timeout; fail early when a process dies."""
    deadline = time.monotonic() + timeout
    detail = None
    while True:
        for proc in alive:
            if proc.poll() is not None:
                pytest.fail(f"while waiting for {what}: {proc.args[0]} exited with {proc.returncode}:\n"
                            f"{tail(proc)}")
        done, detail = check()
        if done:
            return detail
        if time.monotonic() >= deadline:
            logs = "".join(f"\n--- {p.args[0]}:\n{tail(p)}" for p in alive)
            pytest.fail(f"timed out after {timeout}s waiting for {what}; last seen: {detail}{logs}")
        time.sleep(interval)


def tail(proc, n: int = 40) -> str:
    log = getattr(proc, "log_path", None)
    if log is None or not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


class Stack:
    """The daemon against the dev server, and a Prometheus server scraping it."""

    JOB = "magento-token-sidecar"
    CUSTOMERS = {"alice": ("alice@example.com", "alice-secret"), "bob": ("bob@example.com", "b0b-secret")}

    def __init__(self, binary, devserver, tmp_path):
        self.binary, self.tmp = binary, tmp_path
        self.procs = []
        self.magento = devserver(*(f"{email}:{pw}" for email, pw in self.CUSTOMERS.values()))
        self.admin = f"127.0.0.1:{free_port()}"
        self.config_path = tmp_path / "config.yaml"
        self.config = self.daemon_config()
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.prom_url = None

    def daemon_config(self) -> dict:
        out = self.tmp / "tokens"
        secrets = self.tmp / "secrets"
        out.mkdir()
        secrets.mkdir()
        customers = []
        for name, (email, password) in self.CUSTOMERS.items():
            (secrets / name).write_text(password + "\n")
            customers.append({"name": name, "username": email, "password_file": str(secrets / name)})
        return {
            "magento": {"base_url": self.magento, "timeout": "5s"},
            "output": {"dir": str(out), "mode": "0600"},
            "admin": {"listen": self.admin},
            "log": {"format": "text", "level": "info"},
            "customers": customers,
        }

    def spawn(self, name: str, args: list, env=None):
        """Start a process with its output in <tmp>/<name>.log; stopped in close()."""
        log_path = self.tmp / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=self.tmp, env=env)
        proc.log_path = log_path
        self.procs.append(proc)
        return proc

    def start_daemon(self):
        env = {k: v for k, v in os.environ.items() if k != "MAGENTO_TOKEN_SIDECAR_CONFIG"}
        self.daemon = self.spawn("daemon", [str(self.binary), "run", "--config", str(self.config_path)], env)

        def ready():
            status, body = http_get(f"http://{self.admin}/readyz", timeout=2)
            return status == 200, (status, body[:300])
        wait_for("the daemon's /readyz to answer 200", ready, timeout=30, alive=[self.daemon])

    def metrics(self) -> str:
        status, body = http_get(f"http://{self.admin}/metrics")
        assert status == 200, f"/metrics answered {status}: {body[:300]}"
        return body

    def start_prometheus(self):
        prometheus = shutil.which("prometheus")
        if prometheus is None:
            pytest.fail("the prometheus server is missing: install Debian's prometheus package (scripts/test does)")
        port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": self.JOB, "static_configs": [{"targets": [self.admin]}]}],
        }
        path = self.tmp / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        (self.tmp / "tsdb").mkdir()
        self.prometheus = self.spawn("prometheus", [
            prometheus, f"--config.file={path}", f"--storage.tsdb.path={self.tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"])
        self.prom_url = f"http://127.0.0.1:{port}"

        def ready():
            status, body = http_get(self.prom_url + "/-/ready", timeout=2)
            return status == 200, (status, body[:200])
        wait_for("Prometheus to be ready", ready, timeout=30, alive=[self.prometheus])

    def api(self, path: str, **params) -> dict:
        url = f"{self.prom_url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_get(url)
        assert status is not None, f"Prometheus did not answer {url}: {body}"
        doc = json.loads(body)
        assert doc.get("status") == "success", f"{url}: {status} {body[:500]}"
        return doc["data"]

    def query(self, expr: str) -> list:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def wait_query(self, what: str, expr: str, check, timeout: float = 60):
        def poll():
            result = self.query(expr)
            return check(result), result
        return wait_for(what, poll, timeout=timeout, alive=[self.daemon, self.prometheus])

    def close(self):
        for proc in reversed(self.procs):
            stop(proc)


@pytest.fixture
def stack(binary, devserver, tmp_path):
    s = Stack(binary, devserver, tmp_path)
    yield s
    s.close()


def parse_exposition(text: str) -> tuple:
    """(types by family, {sample name: [labels dict]}) from the Prometheus text format."""
    types, samples = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            types[name] = kind.strip()
        elif line and not line.startswith("#"):
            m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+\S+", line)
            assert m, f"cannot read metrics line {line!r}"
            labels = dict(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
            samples.setdefault(m.group(1), []).append(labels)
    return types, samples


def values_of(result: list, label: str) -> dict:
    return {r["metric"].get(label): r["value"][1] for r in result}


def test_end_to_end_metrics_and_prometheus(stack):
    stack.start_daemon()

    # The exposition is well-formed and lint-clean.
    text = stack.metrics()
    lint = run([promtool(), "check", "metrics"], input=text)
    assert lint.returncode == 0, f"promtool check metrics:\n{lint.stdout}{lint.stderr}"

    # Every metric, with its type and labels; per-customer series exist for every customer and
    # every result (refresh and validation); both reload results exist (MagentoTokenConfigReloadFailed
    # relies on it).
    types, samples = parse_exposition(text)
    for name, (kind, labels) in DAEMON_METRICS.items():
        assert types.get(name) == kind, f"{name}: TYPE {types.get(name)!r}, contract says {kind}"
        sample = name + "_count" if kind == "histogram" else name
        assert sample in samples, f"{sample} is not exported"
        for series in samples[sample]:
            assert set(series) == labels, f"{sample} has labels {sorted(series)}, contract says {sorted(labels)}"
    customers = set(stack.CUSTOMERS)
    for name, (kind, labels) in DAEMON_METRICS.items():
        if "customer" in labels:
            assert {s["customer"] for s in samples[name]} == customers, f"{name}: not one series per customer"
    for name, results in RESULT_VALUES.items():
        if name in DAEMON_METRICS and "customer" in DAEMON_METRICS[name][1]:
            pairs = {(s["customer"], s["result"]) for s in samples[name]}
            assert pairs == {(c, r) for c in customers for r in results}, f"{name} series: {sorted(pairs)}"
    assert {s["result"] for s in samples["magento_token_config_reloads_total"]} == RELOAD_RESULTS
    # Central mode's metrics, should this daemon export them too: their type and labels, and no
    # Lease held by a daemon writing files (MagentoTokenNoLeader counts on that).
    for name, (kind, labels) in KUBERNETES_METRICS.items():
        if name in types:
            assert types[name] == kind, f"{name}: TYPE {types[name]!r}, expected {kind}"
            for series in samples.get(name, []):
                assert set(series) == labels, f"{name} has labels {sorted(series)}, expected {sorted(labels)}"
    assert not samples.get("magento_token_kubernetes_requests_total"), "requests to a Kubernetes API with output.dir"
    # No issuer with auth.method password (the default): none of its metrics, not even at 0.
    issuer = sorted(n for n in ISSUER_METRICS if n in types or n in samples)
    assert not issuer, f"{issuer} exported with auth.method password"
    assert samples["magento_token_build_info"] and all(s["version"] for s in samples["magento_token_build_info"])

    # What the rules and the dashboard query is really there (`up` comes from Prometheus), but
    # central mode's metrics: this daemon writes files and talks to no Kubernetes API.
    exported = set(samples) | {"up"} | KUBERNETES_METRICS.keys() | ISSUER_METRICS.keys()
    for where, expr in used_exprs():
        missing = metric_names(expr) - exported
        assert not missing, f"{where} uses {sorted(missing)}, which /metrics does not have"

    # A real Prometheus: scrapes the daemon, loads the rules, sees both tokens valid.
    stack.start_prometheus()
    job = f'job="{stack.JOB}"'
    stack.wait_query("up == 1", f"up{{{job}}}",
                     lambda r: values_of(r, "job") == {stack.JOB: "1"})
    stack.wait_query("magento_token_valid == 1 for both customers", f"magento_token_valid{{{job}}}",
                     lambda r: values_of(r, "customer") == {c: "1" for c in customers})

    # The rule file loaded whole and every rule evaluates without error.
    expected = [r["alert"] for r in load_rules()]

    def rules_ok():
        groups = stack.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        names = [r["name"] for r in rules]
        health = {r["name"]: (r["health"], r.get("lastError", "")) for r in rules}
        done = names == expected and all(h == "ok" for h, _ in health.values())
        return done, {"files": sorted({g["file"] for g in groups}), "rules": health}
    detail = wait_for("every rule to be evaluated with health ok", rules_ok, timeout=30,
                      alive=[stack.daemon, stack.prometheus])
    assert detail["files"] == [str(ALERTS)]

    # A healthy daemon raises nothing (start-up may leave MagentoTokenInvalid pending for a moment).
    def quiet():
        alerts = stack.api("alerts")["alerts"]
        return not alerts, [(a["labels"]["alertname"], a["state"], a["labels"].get("customer")) for a in alerts]
    wait_for("no alert pending or firing", quiet, timeout=30, alive=[stack.daemon, stack.prometheus])

    # Every dashboard query runs on the real data and returns something.
    def dashboard_answers():
        empty = [(title, expr) for title, expr in dashboard_exprs(load_dashboard())
                 if not central_only(expr) and not issuer_only(expr) and not stack.query(grafana_to_promql(expr))]
        return not empty, empty
    wait_for("every dashboard query to return data", dashboard_answers, timeout=30,
             alive=[stack.daemon, stack.prometheus])


def test_end_to_end_failed_reload_fires_its_alert(stack):
    stack.start_daemon()
    stack.start_prometheus()
    job = f'job="{stack.JOB}"'
    stack.wait_query("magento_token_valid == 1 for both customers", f"magento_token_valid{{{job}}}",
                     lambda r: values_of(r, "customer") == {c: "1" for c in stack.CUSTOMERS})

    # An unknown key makes the new config invalid: the daemon keeps the old one and counts a failure.
    bad = dict(stack.config, no_such_key=True)
    stack.config_path.write_text(yaml.safe_dump(bad, sort_keys=False))
    stack.daemon.send_signal(signal.SIGHUP)

    stack.wait_query("a failed reload counted", f'magento_token_config_reloads_total{{{job}, result="failure"}}',
                     lambda r: values_of(r, "result") == {"failure": "1"}, timeout=30)
    stack.wait_query("MagentoTokenConfigReloadFailed firing",
                     'ALERTS{alertname="MagentoTokenConfigReloadFailed", alertstate="firing"}',
                     lambda r: len(r) == 1, timeout=30)
    # The old configuration runs on.
    assert stack.daemon.poll() is None, tail(stack.daemon)
    status, body = http_get(f"http://{stack.admin}/readyz")
    assert status == 200, body
    assert len(stack.query(f"magento_token_valid{{{job}}} == 1")) == 2
