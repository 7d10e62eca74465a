"""The Helm chart, rendered by the real Helm engine (helm-python-sdk embeds Helm 4).

What is checked, under several values sets (defaults, classic sidecar, existingSecret,
monitoring on; tests/python/chart_values/):

- `helm lint --strict` finds nothing above "info" for Kubernetes 1.29 and 1.33;
- every rendered built-in object passes `kubernetes-validate --strict` (offline schemas) for
  Kubernetes 1.29 and 1.33; the prometheus-operator objects (no schema shipped) are checked
  field by field, and the PrometheusRule's rules with `promtool check rules`;
- the properties the chart promises: native vs classic sidecar layout, the in-memory token
  volume mounted whole (never subPath) in every container, the admin server on the pod's
  address, the config and the password Secret, the checksum annotations, the secure defaults,
  the standard labels, the `helm test` pod;
- values.yaml documents every value, the schema rejects wrong types, the README lists every
  value and its examples (embedding in another chart, a plain manifest) render and validate;
- the real binary accepts what the chart renders: `check` on the rendered config with the
  password files the Secret would provide, `once` against the dev server, and `run` answering
  the probes the chart sets;
- tokens without customer passwords (`auth.method` login_as_customer with and without the
  admin's 2FA secret, cloud_service_otp; tests/python/chart_values/login-as-customer.yaml and
  cloud-service-otp.yaml): the `auth` section of the config, no customer password anywhere, the
  admin's or IMS credential's Secret mounted as the passwords are, the refusals, the schema, and
  `check` on what is rendered.
"""
from __future__ import annotations

import base64
import copy
import json
import os
import pathlib
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import helm_python as helm
import pytest
import yaml
from helm_python import _native
from kubernetes_validate import utils as kv

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "magento-token-sidecar"
VALUES_DIR = pathlib.Path(__file__).resolve().parent / "chart_values"
README = CHART / "README.md"

RELEASE = "shop"
NAMESPACE = "web"
KUBE_VERSIONS = ["1.29.0", "1.33.0"]
VALUE_SETS = ["defaults", "classic", "existing-secret", "monitoring"]
# Chart paths inside the daemon's containers (templates/_helpers.tpl).
CONFIG_FILE = "/etc/magento-token-sidecar/config/config.yaml"
SECRET_DIR = "/etc/magento-token-sidecar/secrets"
DAEMON_UID = 65532
# The daemon's config keys (the contract's "Configuration (YAML)").
CONFIG_KEYS = {"magento", "refresh", "output", "admin", "log", "customers"}
MAGENTO_KEYS = {"base_url", "store_code", "timeout", "ca_file", "allow_insecure_http", "api", "graphql_path", "cloud_service"}
CUSTOMER_KEYS = {"name", "username", "password_file", "password_env", "store_code", "base_url", "file"}
B64TOKEN = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")
STANDARD_LABELS = {
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
}
MONITORING_GROUP = "monitoring.coreos.com/"


# ------------------------------------------------------------------------------------------------
# Rendering


def load_values(name: str) -> dict:
    if name == "defaults":
        return {}
    return yaml.safe_load((VALUES_DIR / f"{name}.yaml").read_text())


def render_raw(values: dict | None = None, *, chart: pathlib.Path = CHART, kube_version: str | None = None) -> dict[str, str]:
    """Template path -> rendered text, like `helm template shop CHART -n web`.

    `Chart.render` of helm-python-sdk 0.2.2 does not expose the render option `kube_version`
    (`helm template --kube-version`), which libhelm_c accepts; so the call goes one level down.
    """
    opts = {"name": RELEASE, "namespace": NAMESPACE}
    if kube_version:
        opts["kube_version"] = "v" + kube_version
    with helm.Chart.load(chart) as loaded:
        out = _native.call_string(
            "helm_render", loaded._raw(), json.dumps(values or {}), json.dumps(opts)
        )
    return json.loads(out)


def objects_of(rendered: dict[str, str]) -> list[dict]:
    objs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objs.append(doc)
    return objs


def render(values: dict | None = None, **kw) -> list[dict]:
    return objects_of(render_raw(values, **kw))


def render_error(values: dict, **kw) -> str:
    with pytest.raises(helm.HelmError) as err:
        render_raw(values, **kw)
    return str(err.value)


_CACHE: dict[str, list[dict]] = {}


def rendered_set(name: str) -> list[dict]:
    if name not in _CACHE:
        _CACHE[name] = render(load_values(name))
    return copy.deepcopy(_CACHE[name])


def one(objs: list[dict], kind: str, *, hook: bool | None = False) -> dict:
    found = [o for o in objs if o["kind"] == kind and (hook is None or ("helm.sh/hook" in o["metadata"].get("annotations", {})) == hook)]
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def kinds(objs: list[dict]) -> list[str]:
    return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objs)


def pod_spec(objs: list[dict]) -> dict:
    return one(objs, "Deployment")["spec"]["template"]["spec"]


def config_map(objs: list[dict]) -> dict:
    cm = [o for o in objs if o["kind"] == "ConfigMap" and "config.yaml" in o.get("data", {})]
    assert len(cm) == 1
    return cm[0]


def config_of(objs: list[dict]) -> dict:
    return yaml.safe_load(config_map(objs)["data"]["config.yaml"])


def daemon_containers(spec: dict) -> list[dict]:
    """Every container running the daemon's image (run, once, check)."""
    return [c for c in spec.get("initContainers", []) + spec["containers"] if c.get("args", [""])[0] in ("run", "once", "check")]


def by_name(items: list[dict], name: str) -> dict:
    found = [i for i in items if i["name"] == name]
    assert len(found) == 1, f"{name} not in {[i['name'] for i in items]}"
    return found[0]


# ------------------------------------------------------------------------------------------------
# Lint and schema validation of every object


def assert_schema_refuses(values: dict, where: str) -> None:
    """The chart's schema refuses `values`, naming `where` (a JSON pointer)."""
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError) as err:
            chart.validate_schema(values)
    assert where in str(err.value), str(err.value)


def assert_lints_strictly(values: dict, kube: str) -> None:
    """`helm lint --strict` of `values` against Kubernetes `kube` finds nothing."""
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v" + kube)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("values", VALUE_SETS)
def test_lint_strict(values, kube):
    assert_lints_strictly(load_values(values), kube)


def validate_strictly(objs: list[dict], values: str, kube: str) -> list[str]:
    """Validates every object against Kubernetes `kube`'s schemas, strictly; returns their kinds.
    The monitoring objects are skipped: no schema is shipped for them (test_monitoring_objects
    checks them)."""
    kinds_checked = []
    for obj in objs:
        if obj["apiVersion"].startswith(MONITORING_GROUP):
            continue
        try:
            kv.validate(obj, kube, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} ({values}, {kube}): {'.'.join(map(str, e.path))}: {e.message}")
        except kv.SchemaNotFoundError as e:
            pytest.fail(e.message)
        kinds_checked.append(obj["kind"])
    return kinds_checked


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("values", VALUE_SETS)
def test_every_object_validates_strictly(values, kube):
    assert len(validate_strictly(render(load_values(values), kube_version=kube), values, kube)) >= 4


def validate_with_cli(values: dict, tmp_path: pathlib.Path) -> None:
    """kubernetes-validate's command line, strict, for every version of KUBE_VERSIONS, on the
    `helm template` stream of `values` as a user has it."""
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text("\n---\n".join(t for p, t in sorted(render_raw(values).items()) if not p.endswith("NOTES.txt")))
    exe = pathlib.Path(sys.executable).parent / "kubernetes-validate"
    args = [str(exe), "--strict", "--quiet"] + [a for v in KUBE_VERSIONS for a in ("-k", v)] + [str(manifest)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ERROR" not in proc.stdout, proc.stdout


def test_kubernetes_validate_cli_on_the_rendered_stream(tmp_path):
    """The same, through the tool's command line, on `helm template` output as a user has it."""
    validate_with_cli(load_values("monitoring"), tmp_path)


# ------------------------------------------------------------------------------------------------
# The objects for the default values


def test_default_objects():
    assert kinds(rendered_set("defaults")) == [
        "ConfigMap/shop-magento-token-sidecar",
        "Deployment/shop-magento-token-sidecar",
        "Pod/shop-magento-token-sidecar-check",
        "Secret/shop-magento-token-sidecar",
        "ServiceAccount/shop-magento-token-sidecar",
    ]


def test_notes_tell_how_to_check_tokens_and_metrics():
    notes = render_raw()["magento-token-sidecar/templates/NOTES.txt"]
    for expected in (
        "kubectl -n web rollout status deployment/shop-magento-token-sidecar",
        "ls -ln /var/run/magento-tokens",
        "port-forward deploy/shop-magento-token-sidecar 9102:9102",
        "localhost:9102/status",
        "localhost:9102/metrics",
        "logs deploy/shop-magento-token-sidecar -c token-sidecar",
        "helm test shop -n web",
        "WARNING: magento.base_url",
        'placeholder password "change-me"',
    ):
        assert expected in notes, expected


def test_notes_say_what_replicas_cost_magentos_lock():
    notes = lambda values: render_raw(values)["magento-token-sidecar/templates/NOTES.txt"]
    assert "replicas each run a sidecar" not in notes({})
    three = notes({"deployment": {"replicaCount": 3}})
    assert "3 x (3 + 1) = 12 failures (it locks at 6)" in three, three
    assert "WARNING: that is more than 4" in three
    two = notes({"deployment": {"replicaCount": 2}, "refresh": {"max_auth_failures": 1}})
    assert "2 x (1 + 1) = 4 failures" in two, two
    assert "WARNING: that is more than" not in two


# ------------------------------------------------------------------------------------------------
# Sidecar layout


def test_native_sidecar_layout():
    spec = pod_spec(rendered_set("defaults"))
    assert [c["name"] for c in spec["initContainers"]] == ["token-sidecar"]
    assert [c["name"] for c in spec["containers"]] == ["app"]
    daemon = spec["initContainers"][0]
    assert daemon["restartPolicy"] == "Always"
    assert daemon["args"] == ["run", "--config", CONFIG_FILE]
    assert daemon["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert daemon["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert "readinessProbe" not in daemon  # opt-in: see values.yaml
    # The startup probe allows minutes for the first logins before the kubelet restarts it.
    probe = daemon["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 120


def test_classic_sidecar_layout():
    spec = pod_spec(rendered_set("classic"))
    init = spec["initContainers"]
    assert [c["name"] for c in init] == ["token-init"]
    assert init[0]["args"] == ["once", "--config", CONFIG_FILE, "--timeout", "60s"]
    assert "restartPolicy" not in init[0]
    assert [c["name"] for c in spec["containers"]] == ["storefront-api", "token-sidecar"]
    daemon = spec["containers"][1]
    assert "restartPolicy" not in daemon
    assert daemon["args"] == ["run", "--config", CONFIG_FILE]
    assert daemon["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The app: every value reaches the container.
    app = spec["containers"][0]
    assert app["image"] == "registry.example.com/storefront-api:2.4.1"
    assert "command" not in app and app["args"] == ["--listen", ":8080"]
    assert app["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert {"name": "MAGENTO_TOKEN_FILE", "value": "/var/run/magento-tokens/alice"} in app["env"]
    assert app["resources"]["limits"]["memory"] == "256Mi"
    assert app["readinessProbe"]["httpGet"]["path"] == "/ready"
    service = [o for o in rendered_set("classic") if o["kind"] == "Service"]
    assert service[0]["spec"]["ports"][0]["targetPort"] == "http"


def test_native_sidecar_refused_before_kubernetes_1_29():
    message = render_error({}, kube_version="1.28.0")
    assert "nativeSidecar" in message and "1.29" in message
    spec = pod_spec(render({"nativeSidecar": False}, kube_version="1.28.0"))
    assert spec["initContainers"][0]["args"][0] == "once"


# ------------------------------------------------------------------------------------------------
# Token volume, admin address, config


@pytest.mark.parametrize("values", VALUE_SETS)
def test_token_directory_is_memory_and_mounted_whole(values):
    objs = rendered_set(values)
    spec = pod_spec(objs)
    cfg = config_of(objs)
    path = cfg["output"]["dir"]
    vol = by_name(spec["volumes"], "magento-tokens")
    assert vol["emptyDir"]["medium"] == "Memory"
    assert vol["emptyDir"]["sizeLimit"]
    daemons = [c["name"] for c in daemon_containers(spec)]
    for c in spec["initContainers"] + spec["containers"]:
        mount = by_name(c["volumeMounts"], "magento-tokens")
        assert mount["mountPath"] == path
        # The app reads; only the daemon writes.
        assert mount.get("readOnly", False) is (c["name"] not in daemons), c["name"]
    test_pod = one(objs, "Pod", hook=True)
    for o_spec in (spec, test_pod["spec"]):
        for c in o_spec.get("initContainers", []) + o_spec["containers"]:
            for m in c.get("volumeMounts", []):
                assert "subPath" not in m and "subPathExpr" not in m, (c["name"], m)
    app = spec["containers"][0]
    if load_values(values).get("app", {}).get("tokenDirEnv", "MAGENTO_TOKEN_DIR"):
        assert {"name": "MAGENTO_TOKEN_DIR", "value": path} in app["env"]


@pytest.mark.parametrize("values", VALUE_SETS)
def test_admin_server_listens_on_the_pod_address(values):
    objs = rendered_set(values)
    cfg = config_of(objs)
    port = load_values(values).get("admin", {}).get("port", 9102)
    assert cfg["admin"]["listen"] == f"0.0.0.0:{port}"
    for c in daemon_containers(pod_spec(objs)):
        if c["args"][0] == "run":
            assert c["ports"] == [{"name": "admin", "containerPort": port, "protocol": "TCP"}]


@pytest.mark.parametrize("values", VALUE_SETS)
def test_config_has_the_contract_keys_only(values):
    v = load_values(values)
    objs = rendered_set(values)
    cfg = config_of(objs)
    assert set(cfg) == CONFIG_KEYS | ({"notify"} if v.get("notify") else set())
    assert set(cfg["magento"]) <= MAGENTO_KEYS
    assert "" not in cfg["magento"].values(), "empty strings are dropped, not passed as paths"
    assert cfg["output"]["mode"] == "0640" and isinstance(cfg["output"]["mode"], str)
    for i, c in enumerate(cfg["customers"]):
        assert set(c) <= CUSTOMER_KEYS
        expected = v.get("customers", [{"name": "demo"}])[i]
        key = expected.get("passwordKey", expected["name"])
        assert c["password_file"] == f"{SECRET_DIR}/{key}"
        assert "password" not in c
    # The ConfigMap is also valid YAML 1.2 as the daemon reads it: "0640" stays a quoted string.
    cm = config_map(objs)["data"]["config.yaml"]
    assert re.search(r'^\s+mode: "0640"$', cm, re.M)


def test_config_passes_values_through():
    cfg = config_of(rendered_set("classic"))
    assert cfg["magento"]["base_url"] == "https://shop.example.com/store"
    assert cfg["magento"]["store_code"] == "default"
    assert cfg["output"]["format"] == "json"
    bob = cfg["customers"][1]
    assert bob == {
        "name": "bob",
        "username": "bob@example.com",
        "password_file": f"{SECRET_DIR}/bob",
        "store_code": "de",
        "file": "bob-de.token",
    }
    assert cfg["notify"] == {
        "signal": {"process": "storefront-api", "signal": "HUP"},
        "webhook": "http://127.0.0.1:8080/token-rotated",
        "timeout": "5s",
    }
    cfg = config_of(rendered_set("existing-secret"))
    assert cfg["admin"]["listen"] == "0.0.0.0:9200"
    assert cfg["output"]["dir"] == "/run/tokens"
    assert cfg["magento"]["ca_file"] == "/etc/magento-ca/ca.pem"


def test_notify_is_written_only_when_set_and_signals_need_a_shared_namespace():
    defaults = rendered_set("defaults")
    assert "notify" not in config_of(defaults)
    assert "shareProcessNamespace" not in pod_spec(defaults)
    classic = rendered_set("classic")
    spec = pod_spec(classic)
    assert spec["shareProcessNamespace"] is True
    # The same uid as the daemon: a process may signal only its own user's processes.
    daemon = by_name(spec["containers"], "token-sidecar")
    app = by_name(spec["containers"], "storefront-api")
    assert app["securityContext"]["runAsUser"] == daemon["securityContext"]["runAsUser"] == DAEMON_UID
    cfg = config_of(render({"notify": {"exec": ["/hooks/reload", "--all"], "timeout": "3s"}}))
    assert cfg["notify"] == {"exec": ["/hooks/reload", "--all"], "timeout": "3s"}
    # The timeout alone is no notification.
    assert "notify" not in config_of(render({"notify": {"timeout": "3s"}}))


# ------------------------------------------------------------------------------------------------
# Passwords


def test_chart_secret_holds_one_key_per_customer():
    objs = rendered_set("classic")
    secret = one(objs, "Secret")
    passwords = {c["name"]: c["password"] for c in load_values("classic")["customers"]}
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == passwords
    vol = by_name(pod_spec(objs)["volumes"], "magento-token-sidecar-secrets")
    assert vol["secret"]["secretName"] == secret["metadata"]["name"]
    assert vol["secret"]["defaultMode"] == 0o440
    for c in daemon_containers(pod_spec(objs)):
        mount = by_name(c["volumeMounts"], "magento-token-sidecar-secrets")
        assert mount == {"name": "magento-token-sidecar-secrets", "mountPath": SECRET_DIR, "readOnly": True}
    # The app container does not see the passwords.
    app = pod_spec(objs)["containers"][0]
    assert all(m["name"] != "magento-token-sidecar-secrets" for m in app["volumeMounts"])


def test_existing_secret():
    objs = rendered_set("existing-secret")
    assert not [o for o in objs if o["kind"] == "Secret"]
    vol = by_name(pod_spec(objs)["volumes"], "magento-token-sidecar-secrets")
    assert vol["secret"]["secretName"] == "shop-customer-passwords"
    test_pod = one(objs, "Pod", hook=True)
    assert by_name(test_pod["spec"]["volumes"], "magento-token-sidecar-secrets")["secret"]["secretName"] == "shop-customer-passwords"
    # extraVolumes and sidecar.extraVolumeMounts reach the daemon (the CA file).
    daemon = pod_spec(objs)["initContainers"][0]
    assert by_name(daemon["volumeMounts"], "magento-ca")["mountPath"] == "/etc/magento-ca"
    assert daemon["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}


def test_missing_password_or_duplicate_name_fails_the_render():
    msg = render_error({"customers": [{"name": "a", "username": "a@example.com"}]})
    assert "customers[0].password" in msg and "existingSecret" in msg
    msg = render_error({"customers": [
        {"name": "a", "username": "a@example.com", "password": "x"},
        {"name": "a", "username": "b@example.com", "password": "y"},
    ]})
    assert "customers[1].name" in msg and "twice" in msg


# ------------------------------------------------------------------------------------------------
# Rolling on change


def annotations_for(values: dict) -> dict:
    return one(render(values), "Deployment")["spec"]["template"]["metadata"]["annotations"]


def test_checksums_roll_the_pods_when_config_or_secret_changes():
    base = annotations_for({})
    assert re.fullmatch(r"[0-9a-f]{64}", base["checksum/config"])
    assert re.fullmatch(r"[0-9a-f]{64}", base["checksum/secret"])
    assert annotations_for({}) == base, "stable across renders"
    changed_config = annotations_for({"refresh": {"before_expiry": "20m"}})
    assert changed_config["checksum/config"] != base["checksum/config"]
    assert changed_config["checksum/secret"] == base["checksum/secret"]
    changed_secret = annotations_for({"customers": [{"name": "demo", "username": "demo@example.com", "password": "new"}]})
    assert changed_secret["checksum/secret"] != base["checksum/secret"]
    assert changed_secret["checksum/config"] == base["checksum/config"]
    # With an existing Secret the chart cannot see its content (the daemon picks rotated
    # passwords up without a restart); pointing at another Secret rolls the pods.
    existing = load_values("existing-secret")
    a = annotations_for(existing)
    b = annotations_for({**existing, "existingSecret": "other"})
    assert a["checksum/secret"] != b["checksum/secret"]
    # User annotations survive next to the checksums.
    assert annotations_for({"podAnnotations": {"team": "shop"}})["team"] == "shop"


# ------------------------------------------------------------------------------------------------
# Security


@pytest.mark.parametrize("values", VALUE_SETS)
def test_secure_defaults(values):
    objs = rendered_set(values)
    for spec in (pod_spec(objs), one(objs, "Pod", hook=True)["spec"]):
        assert spec["automountServiceAccountToken"] is False
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert psc["fsGroup"] == DAEMON_UID
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
        for c in daemon_containers(spec):
            assert c["securityContext"]["runAsUser"] == DAEMON_UID
            assert c["securityContext"]["runAsGroup"] == DAEMON_UID
            res = c["resources"]
            assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]
    sa = [o for o in objs if o["kind"] == "ServiceAccount"]
    assert sa and sa[0]["automountServiceAccountToken"] is False
    assert pod_spec(objs)["serviceAccountName"] == sa[0]["metadata"]["name"]


def test_app_reads_tokens_as_another_user():
    """fsGroup owns the emptyDir, the daemon writes group-readable files, the app is in the group."""
    objs = rendered_set("defaults")
    spec = pod_spec(objs)
    app = spec["containers"][0]
    daemon = spec["initContainers"][0]
    assert app["securityContext"]["runAsUser"] != daemon["securityContext"]["runAsUser"]
    mode = int(config_of(objs)["output"]["mode"], 8)
    assert mode & stat.S_IRGRP and not mode & stat.S_IROTH
    assert spec["securityContext"]["fsGroup"] == DAEMON_UID


def test_token_files_group_is_the_pods_fsgroup_unless_set():
    """output.gid comes from podSecurityContext.fsGroup unless set; output.uid only when set,
    and only for a daemon that may give files away."""
    objs = rendered_set("defaults")
    output = config_of(objs)["output"]
    assert output["gid"] == pod_spec(objs)["securityContext"]["fsGroup"] == DAEMON_UID
    assert "uid" not in output
    # Another fsGroup takes the files' group with it; an explicit gid wins, 0 included.
    assert config_of(render({"podSecurityContext": {"fsGroup": 2000}}))["output"]["gid"] == 2000
    assert config_of(render({"output": {"gid": 0}}))["output"]["gid"] == 0
    assert config_of(render({"output": {"gid": 3000}, "podSecurityContext": {"fsGroup": 2000}}))["output"]["gid"] == 3000
    # No fsGroup and no gid: the daemon's own group.
    assert "gid" not in config_of(render({"podSecurityContext": {"fsGroup": None}}))["output"]
    # Large ids stay integers (Helm reads numbers as floats).
    objs = render({"output": {"gid": 4294967294}})
    assert config_of(objs)["output"]["gid"] == 4294967294
    assert re.search(r"^\s+gid: 4294967294$", config_map(objs)["data"]["config.yaml"], re.M)
    # Another owner needs a daemon running as root with CHOWN and FOWNER.
    root = {
        "podSecurityContext": {"runAsNonRoot": False},
        "sidecar": {"securityContext": {"runAsNonRoot": False, "runAsUser": 0,
                                        "capabilities": {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}}},
        "output": {"uid": 1000},
    }
    assert config_of(render(root))["output"] == {
        "dir": "/var/run/magento-tokens", "mode": "0640", "format": "raw", "uid": 1000, "gid": DAEMON_UID,
    }
    msg = render_error({"output": {"uid": 1000}})
    assert "output.uid" in msg and "65532" in msg and "CHOWN" in msg, msg
    without_caps = copy.deepcopy(root)
    without_caps["sidecar"]["securityContext"]["capabilities"] = {"drop": ["ALL"], "add": ["CHOWN"]}
    msg = render_error(without_caps)
    assert "output.uid" in msg and "FOWNER" in msg, msg
    # The daemon's own uid needs nothing.
    assert config_of(render({"output": {"uid": DAEMON_UID}}))["output"]["uid"] == DAEMON_UID


# ------------------------------------------------------------------------------------------------
# Labels and the helm test pod


@pytest.mark.parametrize("values", VALUE_SETS)
def test_standard_labels(values):
    objs = rendered_set(values)
    for o in objs:
        labels = o["metadata"]["labels"]
        assert STANDARD_LABELS <= set(labels), (o["kind"], labels)
        assert labels["app.kubernetes.io/name"] == "magento-token-sidecar"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert o["metadata"]["namespace"] == NAMESPACE
    deploy = one(objs, "Deployment")
    selector = {"app.kubernetes.io/name": "magento-token-sidecar", "app.kubernetes.io/instance": RELEASE}
    assert deploy["spec"]["selector"]["matchLabels"] == selector
    assert selector.items() <= deploy["spec"]["template"]["metadata"]["labels"].items()


def test_helm_test_pod_runs_check():
    objs = rendered_set("defaults")
    pod = one(objs, "Pod", hook=True)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (c,) = pod["spec"]["containers"]
    assert c["args"] == ["check", "--config", CONFIG_FILE]
    assert c["image"] == pod_spec(objs)["initContainers"][0]["image"]
    # `check` wants a writable output dir: the pod has its own token volume.
    assert by_name(pod["spec"]["volumes"], "magento-tokens")["emptyDir"]["medium"] == "Memory"
    assert not [o for o in render({"testPod": {"enabled": False}}) if o["kind"] == "Pod"]


def test_image_reference():
    daemon = pod_spec(render({"image": {"repository": "ghcr.io/acme/mts", "tag": "1.2.3"}}))["initContainers"][0]
    assert daemon["image"] == "ghcr.io/acme/mts:1.2.3"
    digest = "sha256:" + "a" * 64
    daemon = pod_spec(render({"image": {"repository": "ghcr.io/acme/mts", "digest": digest}}))["initContainers"][0]
    assert daemon["image"] == f"ghcr.io/acme/mts@{digest}"
    assert pod_spec(rendered_set("defaults"))["initContainers"][0]["image"] == "magento-token-sidecar:0.1.0"


# ------------------------------------------------------------------------------------------------
# Monitoring


def test_monitoring_is_opt_in():
    assert not [o for o in rendered_set("defaults") if o["apiVersion"].startswith(MONITORING_GROUP)]
    assert not [o for o in rendered_set("defaults") if o["kind"] == "Service"]


def test_monitoring_objects():
    objs = rendered_set("monitoring")
    admin_port = 9102
    svc = [o for o in objs if o["kind"] == "Service"]
    assert len(svc) == 1
    svc = svc[0]
    assert svc["metadata"]["name"] == "shop-magento-token-sidecar-metrics"
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9102, "targetPort": admin_port, "protocol": "TCP"}]
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()

    sm = one(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == "metrics" and ep["path"] == "/metrics"
    # The job label the alert rules match on (job=~".*magento-token-sidecar.*").
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "magento-token-sidecar"

    pm = one(objs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (pep,) = pm["spec"]["podMetricsEndpoints"]
    daemon = pod_spec(objs)["initContainers"][0]
    assert pep["port"] in [p["name"] for p in daemon["ports"]]
    assert pod_labels[pm["spec"]["jobLabel"]] == "magento-token-sidecar"

    rule = one(objs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    assert rule["spec"] == {"groups": alerts["groups"]}, "the project's rules, unchanged"

    dash = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")]
    assert len(dash) == 1
    dash = dash[0]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dash["metadata"]["annotations"]["grafana_folder"] == "Magento"
    assert json.loads(dash["data"]["magento-token-sidecar.json"]) == json.loads((CHART / "files" / "dashboard.json").read_text())


def test_alert_job_matcher_matches_the_monitors():
    """The rules find the job the chart's monitors produce, whatever the release is called."""
    text = (CHART / "files" / "alerts.yaml").read_text()
    matchers = set(re.findall(r'job=~"([^"]+)"', text))
    for m in matchers:
        assert re.fullmatch(m, "magento-token-sidecar"), m


def test_prometheus_rule_passes_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: scripts/test installs Debian's prometheus package")
    rule = one(rendered_set("monitoring"), "PrometheusRule")
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    proc = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_metrics_selector_for_pods_of_another_chart():
    objs = render({"deployment": {"enabled": False}, "metrics": {"selector": {"app": "storefront"}, "serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}})
    svc = one(objs, "Service")
    assert svc["spec"]["selector"] == {"app": "storefront"}
    assert one(objs, "PodMonitor")["spec"]["selector"]["matchLabels"] == {"app": "storefront"}


# ------------------------------------------------------------------------------------------------
# values.yaml, schema, README


def values_keys():
    """(dotted path, line, column) of every mapping key in values.yaml outside list items."""
    text = (CHART / "values.yaml").read_text()
    root = yaml.compose(text)
    found = []

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                path = f"{prefix}.{k.value}" if prefix else k.value
                found.append((path, k.start_mark.line, k.start_mark.column))
                walk(v, path)

    walk(root, "")
    return text.splitlines(), found


def schema_node(schema: dict, path: str):
    node = schema
    for part in path.split("."):
        props = node.get("properties")
        if not props or part not in props:
            return None
        node = props[part]
    return node


def test_every_value_is_commented_and_in_the_schema():
    lines, keys = values_keys()
    schema = json.loads((CHART / "values.schema.json").read_text())
    undocumented = []
    for path, line, col in keys:
        parent_path = path.rpartition(".")[0]
        if parent_path:
            parent = schema_node(schema, parent_path)
            free_form = parent is None or parent.get("additionalProperties", True) is not False
            if free_form and schema_node(schema, path) is None:
                continue  # content of a Kubernetes object (securityContext, resources, probes)
        assert schema_node(schema, path) is not None, f"{path} is not in values.schema.json"
        above = lines[line - 1] if line else ""
        if not (above.strip().startswith("#") and len(above) - len(above.lstrip()) == col) and "#" not in lines[line]:
            undocumented.append(path)
    assert not undocumented, f"values without a comment: {undocumented}"


def test_schema_lists_only_real_values():
    """Every value the schema defines has a default in values.yaml (no stale schema entries)."""
    _, keys = values_keys()
    paths = {p for p, _, _ in keys}
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node, prefix):
        for name, sub in node.get("properties", {}).items():
            path = f"{prefix}.{name}" if prefix else name
            if path == "global" or prefix.endswith("Probe") or path.startswith("customers"):
                continue
            assert path in paths, f"{path} is in the schema but not in values.yaml"
            walk(sub, path)

    walk(schema, "")


@pytest.mark.parametrize(
    "values, where",
    [
        ({"nativeSidecar": "yes"}, "/nativeSidecar"),
        ({"output": {"mode": 640}}, "/output/mode"),
        ({"output": {"mode": "rw-r-----"}}, "/output/mode"),
        ({"output": {"uid": "1000"}}, "/output/uid"),
        ({"output": {"gid": -1}}, "/output/gid"),
        ({"output": {"gid": 4294967295}}, "/output/gid"),
        ({"admin": {"port": "9102"}}, "/admin/port"),
        ({"admin": {"port": 70000}}, "/admin/port"),
        ({"refresh": {"before_expiry": 900}}, "/refresh/before_expiry"),
        ({"magento": {"baseUrl": "https://x"}}, "/magento"),
        ({"magento": {"base_url": "shop.example.com"}}, "/magento/base_url"),
        ({"customers": []}, "/customers"),
        ({"customers": [{"name": "has space", "username": "a@b", "password": "x"}]}, "/customers/0/name"),
        ({"customers": [{"name": "a", "password": "x"}]}, "/customers/0"),
        ({"customers": [{"name": "a", "username": "a@b", "password": 1234}]}, "/customers/0/password"),
        ({"tokens": {"mountPath": "relative"}}, "/tokens/mountPath"),
        ({"sidecar": {"livenessProbe": {"enabled": "true"}}}, "/sidecar/livenessProbe/enabled"),
        ({"metrics": {"serviceMonitor": {"enabled": 1}}}, "/metrics/serviceMonitor/enabled"),
        ({"replicaCount": 2}, "replicaCount"),
        ({"app": {"env": {"A": "b"}}}, "/app/env"),
        ({"notify": {"exec": "/hooks/reload"}}, "/notify/exec"),
        ({"notify": {"webhook": "127.0.0.1:8080/x"}}, "/notify/webhook"),
        ({"notify": {"signal": {"name": "nginx"}}}, "/notify/signal"),
        ({"notify": {"shell": True}}, "/notify"),
        ({"shareProcessNamespace": "true"}, "/shareProcessNamespace"),
    ],
)
def test_schema_rejects_wrong_types(values, where):
    assert_schema_refuses(values, where)


@pytest.mark.parametrize("values", VALUE_SETS)
def test_value_sets_pass_the_schema(values):
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(load_values(values))


def readme_text() -> str:
    if not README.exists():
        pytest.fail(f"{README} is missing")
    return README.read_text()


def test_readme_parameters_table_lists_every_value():
    text = readme_text()
    table = {m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", text, re.M)}
    schema = json.loads((CHART / "values.schema.json").read_text())
    _, keys = values_keys()
    missing = []
    for path, _, _ in keys:
        node = schema_node(schema, path)
        if node is None:
            continue
        is_group = node.get("type") == "object" and node.get("additionalProperties") is False
        covered = path in table or any(path.startswith(t + ".") or t.startswith(path + ".") for t in table)
        if not is_group and not covered:
            missing.append(path)
    assert not missing, f"values missing from the README's parameters table: {missing}"


def test_readme_quick_start_has_at_most_three_commands():
    text = readme_text()
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.M | re.S)
    assert section, "no '## Quick start' section"
    blocks = re.findall(r"```(?:sh|bash|console)\n(.*?)```", section.group(1), re.S)
    commands = [l for b in blocks for l in b.splitlines() if l.strip() and not l.strip().startswith("#") and not l.rstrip().endswith("\\")]
    continued = [l for b in blocks for l in b.splitlines() if l.rstrip().endswith("\\")]
    assert 1 <= len(commands) <= 3, commands
    assert not continued, "one line per command"
    # The values file it installs with renders, with the Secret the first command creates.
    (values_block,) = re.findall(r"```yaml\n(.*?)```", section.group(1), re.S)
    values = yaml.safe_load(values_block)
    objs = render(values)
    assert not [o for o in objs if o["kind"] == "Secret"]
    assert "kubectl create secret generic " + values["existingSecret"] in section.group(1)
    spec = pod_spec(objs)
    assert spec["containers"][0]["image"] == "registry.example.com/storefront-api:2.4.1"
    assert "command" not in spec["containers"][0]
    assert spec["initContainers"][0]["image"] == "registry.example.com/magento-token-sidecar:0.1.0"


def readme_examples(prefix: str) -> dict[str, str]:
    """Files shown in the README, each a code block preceded by `<!-- file: PATH -->`."""
    text = readme_text()
    files = {}
    for m in re.finditer(r"<!-- file: (\S+) -->\s*```[a-z]*\n(.*?)```", text, re.S):
        if m.group(1).startswith(prefix):
            files[m.group(1)[len(prefix):]] = m.group(2)
    assert files, f"no README example under {prefix}"
    return files


def test_readme_example_embeds_the_sidecar_in_another_chart(tmp_path):
    parent = tmp_path / "storefront"
    for name, body in readme_examples("storefront/").items():
        (parent / name).parent.mkdir(parents=True, exist_ok=True)
        (parent / name).write_text(body)
    shutil.copytree(CHART, parent / "charts" / "magento-token-sidecar")
    for kube in KUBE_VERSIONS:
        objs = render(chart=parent, kube_version=kube)
        for obj in objs:
            kv.validate(obj, kube, strict=True)
    assert "Deployment/shop-magento-token-sidecar" not in kinds(objs)
    deploy = [o for o in objs if o["kind"] == "Deployment"]
    assert len(deploy) == 1
    spec = deploy[0]["spec"]["template"]["spec"]
    daemon = by_name(spec["initContainers"], "token-sidecar")
    assert daemon["restartPolicy"] == "Always"
    cfg = config_of(objs)
    for c in spec["containers"]:
        assert by_name(c["volumeMounts"], "magento-tokens")["mountPath"] == cfg["output"]["dir"]
    assert by_name(spec["volumes"], "magento-tokens")["emptyDir"]["medium"] == "Memory"
    ann = deploy[0]["spec"]["template"]["metadata"]["annotations"]
    assert {"checksum/config", "checksum/secret"} <= set(ann)
    # The same checksums the chart's own Deployment carries for the same values.
    sub_values = yaml.safe_load((parent / "values.yaml").read_text())["magento-token-sidecar"]
    own = one(render({**sub_values, "deployment": {"enabled": True}}), "Deployment")
    own_ann = own["spec"]["template"]["metadata"]["annotations"]
    assert {k: ann[k] for k in own_ann} == own_ann


def plain_manifest() -> list[dict]:
    files = readme_examples("plain/")
    return [d for body in files.values() for d in yaml.safe_load_all(body) if d]


def test_readme_plain_manifest_validates():
    objs = plain_manifest()
    assert {o["kind"] for o in objs} >= {"ConfigMap", "Secret", "Deployment"}
    for kube in KUBE_VERSIONS:
        for obj in objs:
            kv.validate(obj, kube, strict=True)
    spec = one(objs, "Deployment")["spec"]["template"]["spec"]
    daemon = spec["initContainers"][0]
    assert daemon["restartPolicy"] == "Always"
    assert daemon["startupProbe"]["httpGet"]["path"] == "/readyz"
    for c in spec["initContainers"] + spec["containers"]:
        for m in c["volumeMounts"]:
            assert "subPath" not in m


# ------------------------------------------------------------------------------------------------
# The real binary on what the chart renders


def materialize(config: dict, secret_files: dict[str, str], tmp: pathlib.Path) -> pathlib.Path:
    """The rendered config, runnable here: the Secret's files and the token dir under `tmp`."""
    cfg = copy.deepcopy(config)
    secrets = tmp / "secrets"
    secrets.mkdir()
    for key, value in secret_files.items():
        (secrets / key).write_text(value)
    tokens = tmp / "tokens"
    tokens.mkdir()
    cfg["output"]["dir"] = str(tokens)
    for c in cfg["customers"]:
        assert c["password_file"].startswith(SECRET_DIR + "/")
        c["password_file"] = str(secrets / c["password_file"][len(SECRET_DIR) + 1:])
    # The pod's fsGroup as the files' group: the daemon is a member of it in the pod; here only
    # root may give files to it, so another user runs with its own group.
    if "gid" in cfg["output"] and os.geteuid() != 0 and cfg["output"]["gid"] not in os.getgroups():
        cfg["output"]["gid"] = os.getegid()
    if "ca_file" in cfg["magento"]:
        bundle = pathlib.Path("/etc/ssl/certs/ca-certificates.crt")
        if not bundle.exists():
            pytest.skip("no system CA bundle to stand in for magento.ca_file")
        cfg["magento"]["ca_file"] = str(bundle)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def secret_files_for(values_name: str, objs: list[dict]) -> dict[str, str]:
    """What the pod's Secret volume would hold: the chart's Secret, or stand-ins for existingSecret."""
    secrets = [o for o in objs if o["kind"] == "Secret"]
    if secrets:
        return {k: base64.b64decode(v).decode() for k, v in secrets[0]["data"].items()}
    return {c.get("passwordKey", c["name"]): f"pw-{c['name']}\n" for c in load_values(values_name)["customers"]}


def run_bin(binary, *args, timeout=60):
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("values", VALUE_SETS)
def test_binary_check_accepts_the_rendered_config(values, binary, tmp_path):
    objs = rendered_set(values)
    path = materialize(config_of(objs), secret_files_for(values, objs), tmp_path)
    proc = run_bin(binary, "check", "--config", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_graphql_and_the_cloud_service_reach_the_daemon_and_pass_its_check(binary, tmp_path):
    """`magento.api`, `graphql_path` and `cloud_service` are the daemon's keys, passed through;
    left empty they are left out (the daemon's defaults), and `check` accepts what is rendered."""
    defaults = config_of(rendered_set("defaults"))["magento"]
    assert "api" not in defaults and "graphql_path" not in defaults
    assert defaults["cloud_service"] is False
    cloud = load_values("classic")
    cloud["magento"] = {
        "base_url": "https://na1-sandbox.api.commerce.adobe.com/Tenant1234",
        "store_code": "default",
        "cloud_service": True,
        "graphql_path": "/graphql",
    }
    objs = render(cloud)
    cfg = config_of(objs)
    assert cfg["magento"] == {**cloud["magento"], "timeout": "10s", "allow_insecure_http": False}
    proc = run_bin(binary, "check", "--config", materialize(cfg, secret_files_for("classic", objs), tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # A REST login on the Cloud Service cannot work: the chart passes it, the daemon names it.
    cloud["magento"]["api"] = "rest"
    cfg = config_of(render(cloud))
    (tmp_path / "rest").mkdir()
    proc = run_bin(binary, "check", "--config", materialize(cfg, secret_files_for("classic", objs), tmp_path / "rest"))
    assert proc.returncode == 2 and "magento.api" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "graphql" in render_error({"magento": {"base_url": "https://shop.example.com", "api": "soap"}})


def test_binary_check_rejects_a_missing_password_file(binary, tmp_path):
    """The same check a `helm test` runs in the cluster fails when a Secret key is missing."""
    objs = rendered_set("existing-secret")
    files = secret_files_for("existing-secret", objs)
    files.pop("bob-password")
    path = materialize(config_of(objs), files, tmp_path)
    proc = run_bin(binary, "check", "--config", path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "customers[1].password_file" in proc.stdout + proc.stderr


@pytest.mark.parametrize("values", ["defaults", "classic"])
def test_binary_once_writes_every_token_from_the_rendered_config(values, binary, devserver, tmp_path):
    objs = rendered_set(values)
    secret = secret_files_for(values, objs)
    cfg = config_of(objs)
    creds = []
    for c in cfg["customers"]:
        key = c["password_file"].rsplit("/", 1)[1]
        creds.append(f"{c['username']}:{secret[key]}")
    # Every store view the config names must exist on the dev server.
    stores = {cfg["magento"].get("store_code")} | {c.get("store_code") for c in cfg["customers"]}
    extra = [a for code in sorted(s for s in stores if s) for a in ("--store", code)]
    url = devserver(*creds, extra=extra)
    cfg["magento"]["base_url"] = url
    for c in cfg["customers"]:
        if "base_url" in c:
            c["base_url"] = url
    cfg["admin"]["listen"] = ""
    path = materialize(cfg, secret, tmp_path)
    proc = run_bin(binary, "once", "--config", path, "--timeout", "30s", timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tokens = tmp_path / "tokens"
    expected = sorted(c.get("file", c["name"]) for c in cfg["customers"])
    assert sorted(p.name for p in tokens.iterdir()) == expected
    mode = int(cfg["output"]["mode"], 8)
    gid = yaml.safe_load(path.read_text())["output"]["gid"]
    for c in cfg["customers"]:
        f = tokens / c.get("file", c["name"])
        assert stat.S_IMODE(f.stat().st_mode) == mode
        assert f.stat().st_gid == gid, "the token file's group is the pod's fsGroup"
        body = f.read_text()
        if cfg["output"]["format"] == "json":
            doc = json.loads(body)
            assert doc["customer"] == c["name"]
            assert B64TOKEN.match(doc["token"])
            assert doc["expires_at"] > doc["obtained_at"]
        else:
            assert B64TOKEN.match(body) and not body.endswith("\n")


def test_plain_manifest_config_passes_check(binary, tmp_path):
    objs = plain_manifest()
    cm = one(objs, "ConfigMap")
    secret = one(objs, "Secret")
    files = dict(secret.get("stringData", {}))
    files.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
    cfg = yaml.safe_load(next(iter(cm["data"].values())))
    path = materialize(cfg, files, tmp_path)
    proc = run_bin(binary, "check", "--config", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_binary_run_answers_the_probes_the_chart_sets(binary, devserver, tmp_path):
    """`run` on the rendered config: the startup probe's /readyz turns 200 once the token is
    written, the liveness probe's /healthz answers, /metrics serves, SIGTERM stops it with 0.
    The admin address moves from 0.0.0.0 to loopback (tests stay on loopback)."""
    objs = rendered_set("defaults")
    cfg = config_of(objs)
    secret = secret_files_for("defaults", objs)
    (customer,) = cfg["customers"]
    cfg["magento"]["base_url"] = devserver(f"{customer['username']}:{secret[customer['name']]}")
    host, _, port = cfg["admin"]["listen"].rpartition(":")
    assert (host, port) == ("0.0.0.0", "9102")
    port = free_loopback_port()
    cfg["admin"]["listen"] = f"127.0.0.1:{port}"
    daemon = pod_spec(objs)["initContainers"][0]
    path = materialize(cfg, secret, tmp_path)
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(binary), "run", "--config", str(path)], stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline:
            try:
                status, _ = http_get(base + daemon["startupProbe"]["httpGet"]["path"])
            except OSError:
                status = None
            if status == 200:
                break
            time.sleep(0.1)
        assert status == 200, "the startup probe never passed: " + log.read_text()
        assert (tmp_path / "tokens" / customer["name"]).exists()
        assert http_get(base + daemon["livenessProbe"]["httpGet"]["path"])[0] == 200
        code, body = http_get(base + "/metrics")
        assert code == 200 and f'magento_token_valid{{customer="{customer["name"]}"}} 1' in body
    finally:
        proc.terminate()
        try:
            rc = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
            raise
    assert rc == 0, log.read_text()


def test_every_token_format_and_the_index_reach_the_daemons_config():
    for fmt in ("raw", "json", "header", "env"):
        assert config_of(render({"output": {"format": fmt}}))["output"]["format"] == fmt
    out = config_of(render({"output": {"index": "tokens.json"}}))["output"]
    assert out["index"] == "tokens.json"
    assert "index" not in config_of(render())["output"]
    assert "/output/index" in render_error({"output": {"index": "../escape"}})


# ------------------------------------------------------------------------------------------------
# Tokens without customer passwords (`auth`, issue 22): login_as_customer with and without the
# admin's 2FA secret, cloud_service_otp. Central mode's side is in test_chart_central.py.

ADMIN_DIR = "/etc/magento-token-sidecar/admin"
IMS_DIR = "/etc/magento-token-sidecar/ims"
# A base32 Google Authenticator secret, as `check` reads auth.admin.totp_secret_file.
TOTP_SECRET = "JBSWY3DPEHPK3PXP"


def auth_values(name: str) -> dict:
    """The auth value sets: tests/python/chart_values/<name>.yaml, and login-as-customer without
    its 2FA secret."""
    if name == "login-as-customer-no-totp":
        v = load_values("login-as-customer")
        v["auth"]["admin"]["totpSecretKey"] = ""
        return v
    return load_values(name)


AUTH_SETS = ["login-as-customer", "login-as-customer-no-totp", "cloud-service-otp"]
AUTH_VOLUME = {"login_as_customer": ("magento-token-sidecar-admin", ADMIN_DIR),
               "cloud_service_otp": ("magento-token-sidecar-ims", IMS_DIR)}
EXPECTED_AUTH = {
    "login-as-customer": {
        "method": "login_as_customer",
        "admin": {"username": "token-robot", "password_file": f"{ADMIN_DIR}/password",
                  "totp_secret_file": f"{ADMIN_DIR}/totp"},
    },
    "login-as-customer-no-totp": {
        "method": "login_as_customer",
        "admin": {"username": "token-robot", "password_file": f"{ADMIN_DIR}/password"},
    },
    "cloud-service-otp": {
        "method": "cloud_service_otp",
        "ims": {"client_id": "abc123", "org_id": "ABCDEF@AdobeOrg", "client_secret_file": f"{IMS_DIR}/secret"},
    },
}


def auth_secret_name(values: dict) -> str:
    a = values["auth"]
    return (a["admin"] if a["method"] == "login_as_customer" else a["ims"])["existingSecret"]


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("values", AUTH_SETS)
def test_auth_lint_strict_and_every_object_validates(values, kube):
    assert_lints_strictly(auth_values(values), kube)
    for layout in ({}, {"nativeSidecar": False}):
        checked = validate_strictly(render({**auth_values(values), **layout}, kube_version=kube), values, kube)
        assert {"ConfigMap", "Deployment", "Pod"} <= set(checked)


def test_auth_values_pass_the_schema():
    with helm.Chart.load(CHART) as chart:
        for values in AUTH_SETS:
            chart.validate_schema(auth_values(values))


@pytest.mark.parametrize("values", AUTH_SETS)
def test_auth_section_reaches_the_config_and_customers_have_no_password(values):
    v = auth_values(values)
    cfg = config_of(render(v))
    assert set(cfg) == CONFIG_KEYS | {"auth"}
    assert cfg["auth"] == EXPECTED_AUTH[values]
    for c, given in zip(cfg["customers"], v["customers"], strict=True):
        assert "password_file" not in c and "password" not in c
        assert c == {k: given[k] for k in given}, "customers pass through as they are"
    if values == "cloud-service-otp":
        assert [c["customer_id"] for c in cfg["customers"]] == [42, 4294967296]
        cm = config_map(render(v))["data"]["config.yaml"]
        assert re.search(r"^[\s-]+customer_id: 4294967296$", cm, re.M), "an integer, not 4.294967296e+09"


def test_auth_ims_token_url_and_scopes_pass_through_when_set():
    v = auth_values("cloud-service-otp")
    assert "token_url" not in config_of(render(v))["auth"]["ims"] and "scopes" not in config_of(render(v))["auth"]["ims"]
    v["auth"]["ims"].update(token_url="https://ims-na1-stg1.adobelogin.com/ims/token/v3", scopes=["openid", "commerce.accs"])
    ims = config_of(render(v))["auth"]["ims"]
    assert ims["token_url"] == "https://ims-na1-stg1.adobelogin.com/ims/token/v3"
    assert ims["scopes"] == ["openid", "commerce.accs"]


def test_auth_password_is_the_default_and_writes_no_auth_section():
    assert render({"auth": {"method": "password"}}) == render({})
    assert "auth" not in config_of(rendered_set("defaults"))
    # The admin's or IMS values are ignored until their method is chosen.
    assert config_of(render({"auth": {"admin": {"username": "token-robot", "existingSecret": "x"}}})) == config_of(rendered_set("defaults"))


@pytest.mark.parametrize("nativeSidecar", [True, False])
@pytest.mark.parametrize("values", AUTH_SETS)
def test_auth_secret_is_mounted_like_the_passwords_and_no_password_secret_exists(values, nativeSidecar):
    v = {**auth_values(values), "nativeSidecar": nativeSidecar}
    objs = render(v)
    volume, path = AUTH_VOLUME[v["auth"]["method"]]
    assert not [o for o in objs if o["kind"] == "Secret"], "no password Secret without customer passwords"
    spec = pod_spec(objs)
    vol = by_name(spec["volumes"], volume)
    assert vol["secret"] == {"secretName": auth_secret_name(v), "defaultMode": 0o440}
    assert all(vol["name"] != "magento-token-sidecar-secrets" for vol in spec["volumes"])
    daemons = daemon_containers(spec)
    assert len(daemons) == (1 if nativeSidecar else 2)
    for c in daemons:
        assert by_name(c["volumeMounts"], volume) == {"name": volume, "mountPath": path, "readOnly": True}
        assert all(m["name"] != "magento-token-sidecar-secrets" for m in c["volumeMounts"])
    app = by_name(spec["containers"], "app")
    assert all(m["name"] != volume for m in app["volumeMounts"]), "the app never sees the admin's or IMS secret"
    # The `helm test` pod's `check` reads the same files.
    test_pod = one(objs, "Pod", hook=True)
    assert by_name(test_pod["spec"]["volumes"], volume)["secret"]["secretName"] == auth_secret_name(v)
    (check,) = test_pod["spec"]["containers"]
    assert by_name(check["volumeMounts"], volume)["mountPath"] == path
    # Every secret path of the config is inside the mounted directory, one file per key.
    auth = config_of(objs)["auth"]
    files = [p for section in ("admin", "ims") for k, p in auth.get(section, {}).items() if k.endswith("_file")]
    assert files and all(f.startswith(path + "/") and "/" not in f[len(path) + 1:] for f in files)


def test_auth_secret_rolls_the_pods_when_it_is_another_secret_or_other_keys():
    base = auth_values("login-as-customer")
    a = annotations_for(base)
    assert re.fullmatch(r"[0-9a-f]{64}", a["checksum/secret"])
    assert annotations_for(base) == a, "stable across renders"
    other = copy.deepcopy(base)
    other["auth"]["admin"]["existingSecret"] = "other-admin"
    b = annotations_for(other)
    assert b["checksum/secret"] != a["checksum/secret"] and b["checksum/config"] == a["checksum/config"]
    no_totp = annotations_for(auth_values("login-as-customer-no-totp"))
    assert no_totp["checksum/secret"] != a["checksum/secret"] and no_totp["checksum/config"] != a["checksum/config"]
    ims = auth_values("cloud-service-otp")
    c = annotations_for(ims)
    ims["auth"]["ims"]["existingSecret"] = "other-ims"
    assert annotations_for(ims)["checksum/secret"] != c["checksum/secret"]


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda v: v["customers"][0].update(password="x"), "customers[0].password"),
        (lambda v: v["customers"][1].update(passwordKey="bob"), "customers[1].passwordKey"),
        (lambda v: v.update(existingSecret="shop-customer-passwords"), "existingSecret"),
    ],
)
@pytest.mark.parametrize("values", ["login-as-customer", "cloud-service-otp"])
def test_auth_refuses_customer_passwords_rather_than_ignoring_them(values, change, key):
    v = auth_values(values)
    change(v)
    msg = render_error(v)
    assert key in msg and v["auth"]["method"] in msg and "remove it" in msg, msg


def test_auth_refuses_a_method_the_store_cannot_serve():
    lac = auth_values("login-as-customer")
    lac["magento"] = {"base_url": "https://na1.api.commerce.adobe.com/Tenant1234", "cloud_service": True}
    msg = render_error(lac)
    assert "auth.method" in msg and "cloud_service_otp" in msg, msg
    otp = auth_values("cloud-service-otp")
    otp["magento"] = {"base_url": "https://shop.example.com", "cloud_service": False}
    msg = render_error(otp)
    assert "auth.method" in msg and "magento.cloud_service" in msg, msg
    otp = auth_values("cloud-service-otp")
    del otp["customers"][1]["customer_id"]
    msg = render_error(otp)
    assert "customers[1].customer_id" in msg and "bob" in msg, msg


@pytest.mark.parametrize(
    "values, where",
    [
        ({"auth": {"method": "oauth"}}, "/auth/method"),
        ({"auth": {"method": "login_as_customer"}}, "/auth/admin/username"),
        ({"auth": {"method": "login_as_customer", "admin": {"username": "token-robot"}}}, "/auth/admin/existingSecret"),
        ({"auth": {"method": "login_as_customer", "admin": {"username": "r", "existingSecret": "Not_A_Name"}}}, "/auth/admin/existingSecret"),
        ({"auth": {"method": "login_as_customer", "admin": {"username": "r", "existingSecret": "s", "password": "x"}}}, "/auth/admin"),
        ({"auth": {"method": "cloud_service_otp"}}, "/auth/ims/client_id"),
        ({"auth": {"method": "cloud_service_otp", "ims": {"client_id": "a", "existingSecret": "s"}}}, "/auth/ims/org_id"),
        ({"auth": {"method": "cloud_service_otp", "ims": {"client_id": "a", "org_id": "o"}}}, "/auth/ims/existingSecret"),
        ({"auth": {"ims": {"scopes": "openid,email"}}}, "/auth/ims/scopes"),
        ({"auth": {"ims": {"token_url": "ims-na1.adobelogin.com"}}}, "/auth/ims/token_url"),
        ({"auth": {"admin": {"totpSecretKey": "a/b"}}}, "/auth/admin/totpSecretKey"),
        ({"customers": [{"name": "a", "username": "a@b", "customer_id": "42"}]}, "/customers/0/customer_id"),
        ({"customers": [{"name": "a", "username": "a@b", "customer_id": 0}]}, "/customers/0/customer_id"),
    ],
)
def test_schema_rejects_wrong_auth_values(values, where):
    assert_schema_refuses(values, where)


def test_auth_notes_name_the_secret_and_its_keys():
    notes = lambda values: render_raw(values)["magento-token-sidecar/templates/NOTES.txt"]
    lac = notes(auth_values("login-as-customer"))
    assert "The Secret shop-magento-admin must hold the keys: password totp" in lac
    assert '"issuer" object of /status' in lac and "change-me" not in lac
    assert "set auth.admin.totpSecretKey" in notes(auth_values("login-as-customer-no-totp"))
    otp = notes(auth_values("cloud-service-otp"))
    assert "The Secret shop-magento-ims must hold the key: secret" in otp
    # Replicas: the admin's failed logins add up in Magento as a customer's do; IMS has no such lock.
    lac3 = notes({**auth_values("login-as-customer"), "deployment": {"replicaCount": 3}})
    assert "count of the admin's failed logins" in lac3 and "WARNING: that is more than 4" in lac3
    assert "replicas each run a sidecar" not in notes({**auth_values("cloud-service-otp"), "deployment": {"replicaCount": 3}})


def materialize_auth(config: dict, tmp: pathlib.Path) -> pathlib.Path:
    """The rendered config with the auth Secret's files under `tmp` (as the pod would have them)."""
    cfg = copy.deepcopy(config)
    for section in ("admin", "ims"):
        for key, path in cfg["auth"].get(section, {}).items():
            if key.endswith("_file"):
                local = tmp / "auth" / pathlib.PurePosixPath(path).name
                local.parent.mkdir(exist_ok=True)
                local.write_text(TOTP_SECRET + "\n" if key == "totp_secret_file" else "s3cret\n")
                cfg["auth"][section][key] = str(local)
    if "dir" in cfg["output"]:  # central mode's output.kubernetes stays as rendered
        (tmp / "tokens").mkdir()
        cfg["output"]["dir"] = str(tmp / "tokens")
    if "gid" in cfg["output"] and os.geteuid() != 0 and cfg["output"]["gid"] not in os.getgroups():
        cfg["output"]["gid"] = os.getegid()
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.parametrize("values", AUTH_SETS)
def test_binary_check_accepts_the_rendered_auth_config(values, binary, tmp_path):
    """What the chart renders is what the daemon's `check` (the `helm test` pod's) accepts, with
    the files the auth Secret would provide; without them it names the key."""
    cfg = config_of(render(auth_values(values)))
    proc = run_bin(binary, "check", "--config", materialize_auth(cfg, tmp_path))
    out = proc.stdout + proc.stderr
    if "unknown field `auth`" in out:
        pytest.skip("this build of the daemon has no auth section yet")
    assert proc.returncode == 0, out
    # A key missing from the Secret: `check` names the key of the file it could not read.
    for f in (tmp_path / "auth").iterdir():
        f.unlink()
    proc = run_bin(binary, "check", "--config", tmp_path / "config.yaml")
    key = "auth.admin.password_file" if values.startswith("login") else "auth.ims.client_secret_file"
    assert proc.returncode == 2 and key in proc.stdout + proc.stderr, proc.stdout + proc.stderr
