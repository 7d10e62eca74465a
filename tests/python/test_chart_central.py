"""The chart's central mode (`mode: central`, issue 11): the daemon alone in a Deployment of
several replicas, one of which (the holder of a coordination.k8s.io Lease) writes every token
into a Secret that the app's pods mount.

What is checked, with `mode: central` on the defaults, on tests/python/chart_values/central.yaml and
with the token API on:

- `helm lint --strict` and `kubernetes-validate --strict` for Kubernetes 1.29 and 1.33;
- the objects: the Deployment (replicas, the daemon alone, POD_NAME from the downward API,
  probes, the sidecar's hardened securityContext, spread over nodes), the PodDisruptionBudget,
  the ServiceAccount (the only one with its token automounted), the Role with exactly the
  verbs the daemon uses (get, create, update, patch on its Secret and its Lease; resourceNames
  wherever Kubernetes allows them) and its RoleBinding, the password Secret mounted only there,
  the config with `output.kubernetes` and no `output.dir`, the metrics Service;
- the token API (`output.kubernetes.token_api`): off, nothing more; on, a ClusterRoleBinding of
  the daemon to system:auth-delegator and the Service `<fullname>` on the admin port, refused in
  sidecar mode and on a loopback admin.bindAddress;
- NOTES and the README show an app pod mounting the token Secret as a directory, and the
  snippet validates;
- sidecar mode (the default) renders none of it;
- the binary's `check` accepts the rendered central config (once the daemon side lands);
- without customer passwords (`auth`): the admin's or IMS credential's Secret mounted into the
  central pods and the `helm test` pod only, out of the Role's reach, the same `auth` section as
  in sidecar mode, and `check` on it.
"""
from __future__ import annotations

import copy
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import helm_python as helm
import pytest
import yaml
from kubernetes_validate import utils as kv

from test_chart import (
    CHART,
    assert_lints_strictly,
    assert_schema_refuses,
    CONFIG_FILE,
    DAEMON_UID,
    KUBE_VERSIONS,
    MONITORING_GROUP,
    NAMESPACE,
    RELEASE,
    SECRET_DIR,
    STANDARD_LABELS,
    by_name,
    config_map,
    config_of,
    kinds,
    load_values,
    one,
    pod_spec,
    validate_strictly,
    validate_with_cli,
    readme_examples,
    readme_text,
    render,
    render_error,
    render_raw,
)

FULLNAME = "shop-magento-token-sidecar"
TOKEN_SECRET = f"{FULLNAME}-tokens"
CENTRAL = {"mode": "central"}
TOKEN_API = {"mode": "central", "output": {"kubernetes": {"token_api": True}}}
CENTRAL_SETS = {"central-defaults": CENTRAL, "central": None, "central-token-api": TOKEN_API}
NOTES = "magento-token-sidecar/templates/NOTES.txt"


def central_values(name: str) -> dict:
    v = CENTRAL_SETS[name]
    return copy.deepcopy(v) if v is not None else load_values(name)


_CACHE: dict[str, list[dict]] = {}


def rendered(name: str) -> list[dict]:
    if name not in _CACHE:
        _CACHE[name] = render(central_values(name))
    return copy.deepcopy(_CACHE[name])


def daemon_of(objs: list[dict]) -> dict:
    spec = pod_spec(objs)
    assert "initContainers" not in spec, "central pods run the daemon alone"
    (c,) = spec["containers"]
    return c


# ------------------------------------------------------------------------------------------------
# Lint and schema validation


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("values", list(CENTRAL_SETS))
def test_central_lint_strict(values, kube):
    assert_lints_strictly(central_values(values), kube)


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("values", list(CENTRAL_SETS))
def test_central_objects_validate_strictly(values, kube):
    checked = set(validate_strictly(render(central_values(values), kube_version=kube), values, kube))
    assert {"Deployment", "PodDisruptionBudget", "Role", "RoleBinding", "ServiceAccount", "Service"} <= checked


def test_central_manifest_passes_the_kubernetes_validate_cli(tmp_path):
    """The `helm template` stream as a user has it, through the tool's command line."""
    validate_with_cli(central_values("central"), tmp_path)


def test_central_renders_before_kubernetes_1_29():
    """No native sidecar in central mode: the chart's own floor (1.23) holds, and the fields
    that need newer API servers (PDB unhealthyPodEvictionPolicy, spread matchLabelKeys, both on
    by default since 1.27) are left out below it."""
    objs = render(CENTRAL, kube_version="1.26.0")
    assert "unhealthyPodEvictionPolicy" not in one(objs, "PodDisruptionBudget")["spec"]
    (spread,) = pod_spec(objs)["topologySpreadConstraints"]
    assert "matchLabelKeys" not in spread
    objs = render(CENTRAL, kube_version="1.29.0")
    assert one(objs, "PodDisruptionBudget")["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pod_spec(objs)["topologySpreadConstraints"][0]["matchLabelKeys"] == ["pod-template-hash"]


# ------------------------------------------------------------------------------------------------
# The objects


def test_central_objects():
    assert kinds(rendered("central-defaults")) == [
        f"ConfigMap/{FULLNAME}",
        f"Deployment/{FULLNAME}",
        f"Pod/{FULLNAME}-check",
        f"PodDisruptionBudget/{FULLNAME}",
        f"Role/{FULLNAME}",
        f"RoleBinding/{FULLNAME}",
        f"Secret/{FULLNAME}",
        f"Service/{FULLNAME}-metrics",
        f"ServiceAccount/{FULLNAME}",
    ]


def test_sidecar_mode_renders_no_central_object():
    for values in ({}, {"mode": "sidecar"}, load_values("monitoring")):
        objs = render(values)
        assert not [o for o in objs if o["kind"] in ("Role", "RoleBinding", "PodDisruptionBudget")], kinds(objs)
        assert "kubernetes" not in config_of(objs)["output"]
    assert render({"mode": "sidecar"}) == render({}), "mode: sidecar is the default"


def test_central_mode_runs_the_central_image_and_sidecar_mode_the_sidecar_image():
    """The sidecar image has no Kubernetes client (it refuses output.kubernetes): central mode's
    pods, and its `helm test` pod that runs `check` on the central config, use the image built
    with the `kubernetes` feature, the same tag with image.centralSuffix."""
    def images(values: dict) -> list[str]:
        objs = render(values)
        check = one(objs, "Pod", hook=True)["spec"]["containers"][0]["image"]
        return [c["image"] for c in pod_spec(objs)["containers"] if c["name"] != "app"] + [check]

    repo = "registry.example.com/magento-token-sidecar"
    assert images(CENTRAL) == ["magento-token-sidecar:0.1.0-central"] * 2
    assert images({**CENTRAL, "image": {"repository": repo, "tag": "1.2.3"}}) == [f"{repo}:1.2.3-central"] * 2
    assert images({**CENTRAL, "image": {"repository": repo, "centralSuffix": ""}}) == [f"{repo}:0.1.0"] * 2
    digest = "sha256:" + "a" * 64
    assert images({**CENTRAL, "image": {"repository": repo, "digest": digest}}) == [f"{repo}@{digest}"] * 2
    assert images({"image": {"repository": repo, "tag": "1.2.3"}})[-1] == f"{repo}:1.2.3", "sidecar mode: no suffix"
    assert "centralSuffix" in render_error({**CENTRAL, "image": {"repository": repo, "centralSuffix": "/x"}})


@pytest.mark.parametrize("values", list(CENTRAL_SETS))
def test_central_standard_labels(values):
    for o in rendered(values):
        labels = o["metadata"]["labels"]
        assert STANDARD_LABELS <= set(labels), (o["kind"], labels)
        assert labels["app.kubernetes.io/instance"] == RELEASE
        if o["kind"] == "ClusterRoleBinding":
            assert "namespace" not in o["metadata"], "cluster-scoped"
        else:
            assert o["metadata"]["namespace"] == NAMESPACE



def test_customers_in_secrets_of_their_own_are_in_the_config_and_the_role():
    customers = [
        {"name": "alice", "username": "alice@example.com", "password": "pw-a", "secret": "shop-a-tokens"},
        {"name": "bob", "username": "bob@example.com", "password": "pw-b", "secret": "shop-a-tokens"},
        {"name": "carol", "username": "carol@example.com", "password": "pw-c"},
    ]
    objs = render({**CENTRAL, "customers": customers})
    config = config_of(objs)
    assert [c.get("secret") for c in config["customers"]] == ["shop-a-tokens", "shop-a-tokens", None]
    # Every Secret written is named once, the release's token Secret first.
    rules = one(objs, "Role")["rules"]
    assert rules[0]["resourceNames"] == [TOKEN_SECRET, "shop-a-tokens"]
    # Sidecar mode writes files: a Secret there is refused by name, and the schema wants a name.
    error = render_error({"customers": customers})
    assert "customers[0].secret: applies only to mode: central" in error, error
    assert_schema_refuses({**CENTRAL, "customers": [{**customers[0], "secret": "Shop_A"}]}, "/customers/0/secret")

def test_central_role_grants_exactly_the_daemons_verbs():
    objs = rendered("central-defaults")
    role = one(objs, "Role")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [TOKEN_SECRET], "verbs": ["get", "update", "patch"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [TOKEN_SECRET], "verbs": ["get", "update", "patch"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    ]
    # The names follow the config the daemon reads.
    kube = config_of(objs)["output"]["kubernetes"]
    assert (kube["secret"], kube["lease"]) == (TOKEN_SECRET, TOKEN_SECRET)
    # Other names: the Secret's and the Lease's rules follow them.
    objs = render({**CENTRAL, "output": {"kubernetes": {"secret": "tokens", "lease": "writer"}}})
    rules = one(objs, "Role")["rules"]
    assert rules[0]["resourceNames"] == ["tokens"] and rules[2]["resourceNames"] == ["writer"]
    assert config_of(objs)["output"]["kubernetes"] == {"secret": "tokens", "namespace": NAMESPACE, "lease": "writer", "lease_duration": "15s"}


def test_central_role_binding_binds_the_pods_service_account():
    objs = rendered("central-defaults")
    binding = one(objs, "RoleBinding")
    sa = one(objs, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": one(objs, "Role")["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    assert pod_spec(objs)["serviceAccountName"] == sa["metadata"]["name"]
    # A service account of the user's: bound, not created.
    objs = render({**CENTRAL, "serviceAccount": {"create": False, "name": "token-writer"}})
    assert not [o for o in objs if o["kind"] == "ServiceAccount"]
    assert one(objs, "RoleBinding")["subjects"][0]["name"] == "token-writer"
    assert pod_spec(objs)["serviceAccountName"] == "token-writer"


def test_only_the_central_pods_automount_the_service_account_token():
    objs = rendered("central-defaults")
    assert pod_spec(objs)["automountServiceAccountToken"] is True
    assert one(objs, "ServiceAccount")["automountServiceAccountToken"] is True
    # The `helm test` pod runs `check`, which does not talk to the API.
    assert one(objs, "Pod", hook=True)["spec"]["automountServiceAccountToken"] is False
    # Sidecar mode, as before: nowhere.
    for values in ({}, load_values("classic")):
        objs = render(values)
        assert pod_spec(objs)["automountServiceAccountToken"] is False
        assert one(objs, "ServiceAccount")["automountServiceAccountToken"] is False


@pytest.mark.parametrize("values", list(CENTRAL_SETS))
def test_central_deployment_runs_the_daemon_alone(values):
    v = central_values(values)
    objs = rendered(values)
    deploy = one(objs, "Deployment")
    assert deploy["spec"]["replicas"] == v.get("central", {}).get("replicas", 2)
    daemon = daemon_of(objs)
    assert daemon["name"] == "token-sidecar"
    assert daemon["args"] == ["run", "--config", CONFIG_FILE]
    assert "restartPolicy" not in daemon
    assert daemon["ports"] == [{"name": "admin", "containerPort": 9102, "protocol": "TCP"}]
    assert daemon["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert daemon["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    # The sidecar's hardened context, unchanged.
    sidecar = pod_spec(render({}))["initContainers"][0]
    assert daemon["securityContext"] == sidecar["securityContext"]
    assert daemon["securityContext"]["runAsUser"] == DAEMON_UID
    assert daemon["securityContext"]["readOnlyRootFilesystem"] is True
    assert daemon["resources"] == sidecar["resources"]
    spec = pod_spec(objs)
    assert spec["securityContext"] == pod_spec(render({}))["securityContext"]
    # No token directory: the tokens go to the Secret.
    assert [vol["name"] for vol in spec["volumes"]] == ["magento-token-sidecar-config", "magento-token-sidecar-secrets"]
    assert [m["name"] for m in daemon["volumeMounts"]] == ["magento-token-sidecar-config", "magento-token-sidecar-secrets"]
    for m in daemon["volumeMounts"]:
        assert m["readOnly"] is True and "subPath" not in m
    ann = deploy["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", ann["checksum/config"]) and re.fullmatch(r"[0-9a-f]{64}", ann["checksum/secret"])


@pytest.mark.parametrize("values", list(CENTRAL_SETS))
def test_central_pod_name_comes_from_the_downward_api(values):
    env = daemon_of(rendered(values))["env"]
    assert by_name(env, "POD_NAME") == {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    # The namespace: POST /refresh through the Service as <service>.<namespace> names the daemon.
    namespace = {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    assert by_name(env, "POD_NAMESPACE") == namespace
    # sidecar.extraEnv comes after them.
    env = daemon_of(render({**CENTRAL, "sidecar": {"extraEnv": [{"name": "RUST_LOG", "value": "debug"}]}}))["env"]
    assert [e["name"] for e in env] == ["POD_NAME", "POD_NAMESPACE", "RUST_LOG"]


@pytest.mark.parametrize("values", list(CENTRAL_SETS))
def test_central_passwords_are_mounted_into_the_central_pods_only(values):
    v = central_values(values)
    objs = rendered(values)
    secret_name = v.get("existingSecret") or FULLNAME
    vol = by_name(pod_spec(objs)["volumes"], "magento-token-sidecar-secrets")
    assert vol["secret"] == {"secretName": secret_name, "defaultMode": 0o440}
    mount = by_name(daemon_of(objs)["volumeMounts"], "magento-token-sidecar-secrets")
    assert mount == {"name": "magento-token-sidecar-secrets", "mountPath": SECRET_DIR, "readOnly": True}
    # The password Secret is not the token Secret, and no Role rule reaches it.
    kube = config_of(objs)["output"]["kubernetes"]
    assert kube["secret"] != secret_name
    for rule in one(objs, "Role")["rules"]:
        assert secret_name not in rule.get("resourceNames", [])


def test_central_config_writes_to_the_secret_not_a_directory():
    objs = rendered("central-defaults")
    cfg = config_of(objs)
    assert cfg["output"] == {
        "kubernetes": {"secret": TOKEN_SECRET, "namespace": NAMESPACE, "lease": TOKEN_SECRET, "lease_duration": "15s"},
        "format": "raw",
    }
    assert cfg["admin"]["listen"] == "0.0.0.0:9102"
    assert cfg["customers"] == [{"name": "demo", "username": "demo@example.com", "password_file": f"{SECRET_DIR}/demo"}]
    cfg = config_of(rendered("central"))
    assert cfg["output"] == {
        "kubernetes": {"secret": "storefront-magento-tokens", "namespace": NAMESPACE, "lease": "storefront-magento-tokens", "lease_duration": "20s"},
        "format": "json",
    }
    assert cfg["customers"][1]["password_file"] == f"{SECRET_DIR}/bob-password"
    assert cfg["customers"][1]["file"] == "bob-de.token"
    # Valid YAML for the daemon, with the duration a string.
    assert re.search(r"^\s+lease_duration: 20s$", config_map(rendered("central"))["data"]["config.yaml"], re.M)


@pytest.mark.parametrize(
    "values, key",
    [
        ({"output": {"index": "tokens.json"}}, "output.index"),
        ({"output": {"uid": DAEMON_UID}}, "output.uid"),
        ({"output": {"gid": 1000}}, "output.gid"),
    ],
)
def test_central_refuses_the_file_only_output_settings(values, key):
    msg = render_error({**CENTRAL, **values})
    assert key in msg and "Secret" in msg, msg


def test_central_pod_disruption_budget_and_spread():
    objs = rendered("central-defaults")
    pdb = one(objs, "PodDisruptionBudget")
    selector = {"app.kubernetes.io/name": "magento-token-sidecar", "app.kubernetes.io/instance": RELEASE}
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": selector}, "unhealthyPodEvictionPolicy": "AlwaysAllow"}
    assert one(objs, "Deployment")["spec"]["selector"]["matchLabels"] == selector
    assert pod_spec(objs)["topologySpreadConstraints"] == [{
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": selector},
        "matchLabelKeys": ["pod-template-hash"],
    }]
    spread = pod_spec(render({**CENTRAL, "central": {"topologySpread": {"whenUnsatisfiable": "DoNotSchedule"}}}))["topologySpreadConstraints"]
    assert spread[0]["whenUnsatisfiable"] == "DoNotSchedule"
    # The user's own constraints replace the default; the budget can be turned off.
    own = [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": selector}}]
    objs = render({**CENTRAL, "topologySpreadConstraints": own, "central": {"podDisruptionBudget": {"enabled": False}}})
    assert pod_spec(objs)["topologySpreadConstraints"] == own
    assert not [o for o in objs if o["kind"] == "PodDisruptionBudget"]


def test_central_service_exposes_the_admin_port():
    objs = rendered("central-defaults")
    svc = one(objs, "Service")
    assert svc["metadata"]["name"] == f"{FULLNAME}-metrics"
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9102, "targetPort": 9102, "protocol": "TCP"}]
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()


def test_central_monitoring_objects():
    objs = rendered("central")
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    sm = one(objs, "ServiceMonitor")
    pm = one(objs, "PodMonitor")
    svc = one(objs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "admin"
    # Two releases in one namespace hold two Leases: the leader alerts group by the release,
    # which both monitors copy from the pods (as app_kubernetes_io_instance).
    for monitor in (sm, pm):
        assert monitor["spec"]["podTargetLabels"] == ["app.kubernetes.io/instance"]
        assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert "app.kubernetes.io/instance" in pod_labels
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    assert one(objs, "PrometheusRule")["spec"] == {"groups": alerts["groups"]}
    # Sidecar mode's monitors stay as they were.
    sidecar = render(load_values("monitoring"))
    assert "podTargetLabels" not in one(sidecar, "ServiceMonitor")["spec"]
    assert "podTargetLabels" not in one(sidecar, "PodMonitor")["spec"]


def test_central_helm_test_pod_runs_check_without_a_token_directory():
    objs = rendered("central")
    pod = one(objs, "Pod", hook=True)
    (c,) = pod["spec"]["containers"]
    assert c["args"] == ["check", "--config", CONFIG_FILE]
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["magento-token-sidecar-config", "magento-token-sidecar-secrets"]
    assert by_name(pod["spec"]["volumes"], "magento-token-sidecar-secrets")["secret"]["secretName"] == "shop-customer-passwords"


# ------------------------------------------------------------------------------------------------
# The token API (output.kubernetes.token_api): the daemon bound to system:auth-delegator and the
# admin port behind the Service <fullname>, only when it is on.


def test_token_api_off_renders_neither_the_binding_nor_the_service():
    for values in ("central-defaults", "central"):
        objs = rendered(values)
        assert not [o for o in objs if o["kind"] == "ClusterRoleBinding"], kinds(objs)
        assert [o["metadata"]["name"] for o in objs if o["kind"] == "Service"] == [f"{FULLNAME}-metrics"]
        assert "token_api" not in config_of(objs)["output"]["kubernetes"]
        assert "Token API" not in render_raw(central_values(values))[NOTES]


def test_token_api_on_binds_the_daemon_to_auth_delegator_and_exposes_the_admin_port():
    objs = rendered("central-token-api")
    assert kinds(objs) == sorted(kinds(rendered("central-defaults")) + [
        f"ClusterRoleBinding/{NAMESPACE}-{FULLNAME}-auth-delegator",
        f"Service/{FULLNAME}",
    ])
    binding = one(objs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator"}
    sa = one(objs, "ServiceAccount")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    # The Role is unchanged: the reviews are the binding's, nothing more in the namespace.
    assert one(objs, "Role")["rules"] == one(rendered("central-defaults"), "Role")["rules"]
    (svc,) = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == FULLNAME]
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 9102, "targetPort": "admin", "protocol": "TCP"}]
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert "admin" in [p["name"] for p in daemon_of(objs)["ports"]]
    # Not the metrics Service: a ServiceMonitor does not scrape the pods twice through it.
    assert svc["metadata"]["labels"]["app.kubernetes.io/component"] == "token-api"
    # The daemon's config turns it on, and listens on the pod's address.
    cfg = config_of(objs)
    assert cfg["output"]["kubernetes"]["token_api"] is True
    assert cfg["admin"]["listen"] == "0.0.0.0:9102"
    # A release's own service account is bound too, and the port follows admin.port.
    objs = render({**TOKEN_API, "serviceAccount": {"create": False, "name": "token-writer"}, "admin": {"port": 9200}})
    assert one(objs, "ClusterRoleBinding")["subjects"][0]["name"] == "token-writer"
    (svc,) = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == FULLNAME]
    assert svc["spec"]["ports"][0]["port"] == 9200


def test_token_api_is_refused_where_it_cannot_work():
    msg = render_error({"output": {"kubernetes": {"token_api": True}}})
    assert "output.kubernetes.token_api" in msg and "mode: central" in msg, msg
    msg = render_error({**TOKEN_API, "admin": {"bindAddress": "127.0.0.1"}})
    assert "admin.bindAddress" in msg and "loopback" in msg, msg


def test_token_api_notes_show_the_request_through_the_service():
    notes = render_raw(TOKEN_API)[NOTES]
    assert "Token API" in notes
    assert "/var/run/secrets/kubernetes.io/serviceaccount/token" in notes
    assert f"http://{FULLNAME}.{NAMESPACE}.svc:9102/refresh/demo" in notes
    assert f"get secret/{TOKEN_SECRET}" in notes


def test_readme_token_api_example_validates():
    """The README's Role and RoleBinding that let an app's service account have the token."""
    files = readme_examples("central-token-api/")
    objs = [d for body in files.values() for d in yaml.safe_load_all(body) if d]
    for kube in KUBE_VERSIONS:
        for obj in objs:
            kv.validate(obj, kube, strict=True)
    role = one(objs, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [TOKEN_SECRET], "verbs": ["get"]}]
    binding = one(objs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["kind"] == "ServiceAccount"
    text = readme_text()
    assert "`output.kubernetes.token_api`" in text and "system:auth-delegator" in text


# ------------------------------------------------------------------------------------------------
# The app's side: NOTES and README


def mount_snippet(notes: str) -> dict:
    """The indented YAML block of NOTES that starts with `spec:`."""
    m = re.search(r"^( +)spec:\n((?:\1 .*\n|\n)+)", notes, re.M)
    assert m, notes
    block = textwrap.dedent(m.group(0))
    return yaml.safe_load(block)


def app_pod(snippet_spec: dict) -> dict:
    spec = copy.deepcopy(snippet_spec)
    for c in spec["containers"]:
        c.setdefault("image", "registry.example.com/storefront-api:2.4.1")
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app", "namespace": NAMESPACE}, "spec": spec}


def test_central_notes_show_how_an_app_mounts_the_token_secret():
    notes = render_raw(CENTRAL)[NOTES]
    for expected in (
        f"kubectl -n {NAMESPACE} rollout status deployment/{FULLNAME}",
        f"kubectl -n {NAMESPACE} get lease {TOKEN_SECRET}",
        f"kubectl -n {NAMESPACE} describe secret {TOKEN_SECRET}",
        f"port-forward svc/{FULLNAME}-metrics 9102:9102",
        "about a minute",
        "subPath",
        "/var/run/magento-tokens/demo",
    ):
        assert expected in notes, expected
    assert "replicas each run a sidecar" not in render_raw({**CENTRAL, "central": {"replicas": 3}})[NOTES]
    spec = mount_snippet(notes)["spec"]
    vol = by_name(spec["volumes"], "magento-tokens")
    assert vol["secret"] == {"secretName": TOKEN_SECRET, "optional": False, "defaultMode": 0o440}
    (app,) = spec["containers"]
    mount = by_name(app["volumeMounts"], "magento-tokens")
    assert mount == {"name": "magento-tokens", "mountPath": "/var/run/magento-tokens", "readOnly": True}
    assert spec["securityContext"]["fsGroup"]
    pod = app_pod(spec)
    for kube in KUBE_VERSIONS:
        kv.validate(pod, kube, strict=True)
    # The names follow the values.
    notes = render_raw({**CENTRAL, "output": {"kubernetes": {"secret": "tokens"}}, "tokens": {"mountPath": "/run/t"}})[NOTES]
    spec = mount_snippet(notes)["spec"]
    assert by_name(spec["volumes"], "magento-tokens")["secret"]["secretName"] == "tokens"
    assert by_name(spec["containers"][0]["volumeMounts"], "magento-tokens")["mountPath"] == "/run/t"


def test_sidecar_notes_do_not_mention_the_token_secret():
    notes = render_raw({})[NOTES]
    assert TOKEN_SECRET not in notes and "get lease" not in notes


def test_readme_central_mode_example_validates():
    """The README's app Deployment mounting the token Secret is valid and mounts it whole."""
    files = readme_examples("central/")
    objs = [d for body in files.values() for d in yaml.safe_load_all(body) if d]
    deploy = one(objs, "Deployment")
    for kube in KUBE_VERSIONS:
        for obj in objs:
            kv.validate(obj, kube, strict=True)
    spec = deploy["spec"]["template"]["spec"]
    vol = by_name(spec["volumes"], "magento-tokens")
    assert vol["secret"]["secretName"] == TOKEN_SECRET
    assert vol["secret"]["defaultMode"] == 0o440
    assert "optional" in vol["secret"]
    for c in spec["containers"]:
        for m in c["volumeMounts"]:
            assert "subPath" not in m
    text = readme_text()
    section = re.search(r"^## Central mode.*?(?=^## )", text, re.M | re.S)
    assert section, "no '## Central mode' section"
    for expected in ("about a minute", "subPath", "before_expiry", "resourceNames", "create"):
        assert expected in section.group(0), expected


# ------------------------------------------------------------------------------------------------
# Schema


@pytest.mark.parametrize(
    "values, where",
    [
        ({"mode": "hub"}, "/mode"),
        ({"central": {"replicas": "2"}}, "/central/replicas"),
        ({"central": {"topologySpread": {"whenUnsatisfiable": "Never"}}}, "/central/topologySpread/whenUnsatisfiable"),
        ({"central": {"podDisruptionBudget": {"maxUnavailable": 0}}}, "/central/podDisruptionBudget/maxUnavailable"),
        ({"output": {"kubernetes": {"secret": "Not_A_Name"}}}, "/output/kubernetes/secret"),
        ({"output": {"kubernetes": {"lease_duration": 15}}}, "/output/kubernetes/lease_duration"),
        ({"output": {"kubernetes": {"namespace": "shop"}}}, "/output/kubernetes"),
        ({"output": {"kubernetes": {"token_api": "yes"}}}, "/output/kubernetes/token_api"),
    ],
)
def test_schema_rejects_wrong_central_values(values, where):
    assert_schema_refuses(values, where)


def test_central_value_set_passes_the_schema():
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(load_values("central"))


# ------------------------------------------------------------------------------------------------
# The real binary on what the chart renders


@pytest.mark.parametrize("values", list(CENTRAL_SETS))
def test_binary_check_accepts_the_rendered_central_config(values, binary, tmp_path):
    cfg = config_of(rendered(values))
    assert "dir" not in cfg["output"]
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for c in cfg["customers"]:
        assert c["password_file"].startswith(SECRET_DIR + "/")
        key = c["password_file"][len(SECRET_DIR) + 1:]
        (secrets / key).write_text(f"pw-{c['name']}\n")
        c["password_file"] = str(secrets / key)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = check_without_a_cluster(binary, path, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def check_without_a_cluster(binary, path, tmp_path) -> subprocess.CompletedProcess:
    """`check` on a central config, with a kubeconfig pointing at a closed loopback port, should
    `check` look for one: nothing here may reach a real cluster."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "none",
        "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "none", "user": {"token": "none"}}],
        "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none", "namespace": NAMESPACE}}],
    }))
    env = {k: v for k, v in os.environ.items() if k != "MAGENTO_TOKEN_SIDECAR_CONFIG"}
    env.update(KUBECONFIG=str(kubeconfig), POD_NAME=f"{FULLNAME}-0")
    return subprocess.run([str(binary), "check", "--config", str(path)], capture_output=True, text=True, timeout=60, env=env)


# ------------------------------------------------------------------------------------------------
# Tokens without customer passwords (`auth`) in central mode: the auth Secret is mounted into the
# central pods (and the `helm test` pod) only, the config carries the same `auth` section as in
# sidecar mode, and no Role rule reaches the auth Secret.

from test_chart import (  # noqa: E402
    AUTH_SETS,
    AUTH_VOLUME,
    EXPECTED_AUTH,
    auth_secret_name,
    auth_values,
    materialize_auth,
)


def central_auth(name: str) -> dict:
    return {**auth_values(name), **CENTRAL}


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("values", AUTH_SETS)
def test_central_auth_lint_strict_and_every_object_validates(values, kube):
    assert_lints_strictly(central_auth(values), kube)
    checked = set(validate_strictly(render(central_auth(values), kube_version=kube), values, kube))
    assert {"Deployment", "Role", "RoleBinding", "Pod", "ConfigMap"} <= checked


@pytest.mark.parametrize("values", AUTH_SETS)
def test_central_auth_secret_is_mounted_into_the_central_pods_only(values):
    v = central_auth(values)
    objs = render(v)
    volume, path = AUTH_VOLUME[v["auth"]["method"]]
    secret = auth_secret_name(v)
    assert not [o for o in objs if o["kind"] == "Secret"], "no password Secret without customer passwords"
    spec = pod_spec(objs)
    assert [vol["name"] for vol in spec["volumes"]] == ["magento-token-sidecar-config", volume]
    assert by_name(spec["volumes"], volume)["secret"] == {"secretName": secret, "defaultMode": 0o440}
    daemon = daemon_of(objs)
    assert [m["name"] for m in daemon["volumeMounts"]] == ["magento-token-sidecar-config", volume]
    assert by_name(daemon["volumeMounts"], volume) == {"name": volume, "mountPath": path, "readOnly": True}
    pod = one(objs, "Pod", hook=True)
    assert [vol["name"] for vol in pod["spec"]["volumes"]] == ["magento-token-sidecar-config", volume]
    # The daemon reads it from the mount, not through the API: no Role rule names it.
    for rule in one(objs, "Role")["rules"]:
        assert secret not in rule.get("resourceNames", [])
    assert config_of(objs)["output"]["kubernetes"]["secret"] != secret


@pytest.mark.parametrize("values", AUTH_SETS)
def test_central_auth_config_writes_the_auth_section_and_the_secret_output(values):
    cfg = config_of(render(central_auth(values)))
    assert cfg["auth"] == EXPECTED_AUTH[values]
    assert "dir" not in cfg["output"] and cfg["output"]["kubernetes"]["secret"] == TOKEN_SECRET
    assert all("password_file" not in c for c in cfg["customers"])
    # The same config as in sidecar mode but for the output.
    sidecar = config_of(render(auth_values(values)))
    assert {k: v for k, v in cfg.items() if k != "output"} == {k: v for k, v in sidecar.items() if k != "output"}


def test_central_auth_refuses_customer_passwords_too():
    v = central_auth("login-as-customer")
    v["existingSecret"] = "shop-customer-passwords"
    msg = render_error(v)
    assert "existingSecret" in msg and "login_as_customer" in msg, msg


@pytest.mark.parametrize("values", AUTH_SETS)
def test_binary_check_accepts_the_rendered_central_auth_config(values, binary, tmp_path):
    path = materialize_auth(config_of(render(central_auth(values))), tmp_path)
    proc = check_without_a_cluster(binary, path, tmp_path)
    out = proc.stdout + proc.stderr
    if "unknown field `auth`" in out:
        pytest.skip("this build of the daemon has no auth section yet")
    assert proc.returncode == 0, out
