#!/usr/bin/env python3
"""Generate charts/wirekube/values.schema.json.

The `mesh:` values and each `gateways:` entry mirror the WireKubeMesh / WireKubeGateway specs, so
their schema is derived from the CRDs (the single source of truth) instead of being written
twice; the rest of the values are described here. Every object gets additionalProperties: false,
so a typo'd key fails `helm lint` / `helm install`. Rules the CRDs express in CEL (CIDRs) become
regular expressions here, because Helm's JSON Schema has no CEL.

    python3 ci/gen-values-schema.py          # rewrite the file
    python3 ci/gen-values-schema.py --check  # exit 1 if the committed file is stale (tests do this)
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

from _generated import write_or_check  # ci/ is sys.path[0] when a generator runs

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "wirekube"
OUT = CHART / "values.schema.json"

_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
IPV4 = rf"{_OCTET}(\.{_OCTET}){{3}}"
CIDR4 = rf"{IPV4}/([0-9]|[12][0-9]|3[0-2])"
CIDR6 = r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8])"
CIDR_PATTERN = rf"^({CIDR4}|{CIDR6})$"
CIDR4_PATTERN = rf"^{CIDR4}$"
Schema = dict[str, Any]

_KEEP = ("type", "description", "enum", "pattern", "minimum", "maximum", "minLength", "maxLength",
         "minItems", "maxItems", "format")


def from_crd(node: Schema) -> Schema:
    """An OpenAPI v3 CRD schema node -> a strict JSON Schema node."""
    out: Schema = {k: copy.deepcopy(node[k]) for k in _KEEP if k in node}
    out.pop("format", None)  # int32/int64/date-time: not JSON Schema formats helm should enforce
    rules = " ".join(r.get("rule", "") for r in node.get("x-kubernetes-validations", []))
    if "isCIDR" in rules:
        out["pattern"] = CIDR4_PATTERN if "family() == 4" in rules else CIDR_PATTERN
    if "isIP(self)" in rules and "family() == 4" in rules:
        out["pattern"] = rf"^{IPV4}$"
    if "properties" in node:
        out["properties"] = {k: from_crd(v) for k, v in node["properties"].items()}
        out["additionalProperties"] = False
        if node.get("required"):
            out["required"] = list(node["required"])
    elif isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = from_crd(node["additionalProperties"])
    if "items" in node:
        out["items"] = from_crd(node["items"])
    return out


def crd_spec(filename: str) -> Schema:
    crd = yaml.safe_load((CHART / "crds" / filename).read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def obj(properties: dict[str, Schema], description: str = "", required: list[str] | None = None) -> Schema:
    out: Schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if description:
        out["description"] = description
    if required:
        out["required"] = required
    return out


def string(description: str = "", **kw: Any) -> Schema:
    return {"type": "string", **({"description": description} if description else {}), **kw}


def integer(lo: int, hi: int, description: str = "") -> Schema:
    return {"type": "integer", "minimum": lo, "maximum": hi, **({"description": description} if description else {})}


def port(description: str = "") -> Schema:
    return integer(1, 65535, description)


BOOL: Schema = {"type": "boolean"}
ANY_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
K8S_OBJECT: Schema = {"type": "object"}  # affinity, resources: validated by the API server
K8S_LIST: Schema = {"type": "array", "items": {"type": "object"}}
LABEL_MAP: Schema = ANY_MAP


def image(default_repo_hint: str) -> Schema:
    return obj(
        {
            "repository": string(f"e.g. {default_repo_hint}", minLength=1),
            "tag": string("defaults to the chart's appVersion", pattern=r"^$|^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"),
            "digest": string("sha256:... (wins over tag)", pattern=r"^$|^sha256:[a-f0-9]{64}$"),
            "pullPolicy": {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]},
        },
        required=["repository"],
    )


def service_account() -> Schema:
    return obj({"create": BOOL, "name": string(pattern=r"^$|^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"), "annotations": ANY_MAP})


def pdb() -> Schema:
    return obj({"enabled": BOOL, "minAvailable": {"type": ["integer", "string"]}})


def scheduling() -> dict[str, Schema]:
    return {"nodeSelector": ANY_MAP, "affinity": K8S_OBJECT, "tolerations": K8S_LIST, "podAnnotations": ANY_MAP,
            "extraArgs": {"type": "array", "items": {"type": "string"}}, "resources": K8S_OBJECT}


def mesh_schema() -> Schema:
    spec = from_crd(crd_spec("wirekube.io_wirekubemeshes.yaml"))
    spec["properties"]["create"] = {"type": "boolean", "description": "create the WireKubeMesh from these values"}
    stun = spec["properties"]["stunServers"]
    stun.pop("minItems", None)
    stun["not"] = {"type": "array", "minItems": 1, "maxItems": 1}
    stun["description"] = "empty, or at least two STUN servers (host:port)"
    endpoint = spec["properties"]["relay"]["properties"]["external"]["properties"]["endpoint"]
    endpoint["pattern"] = "^$|" + endpoint["pattern"]
    mtu = spec["properties"]["mtu"]  # int-or-string in the CRD, its rule in CEL
    mtu.pop("type", None)
    mtu["oneOf"] = [{"type": "integer", "minimum": 1280, "maximum": 9000}, {"type": "string", "enum": ["auto"]}]
    return spec


def gateway_schema() -> Schema:
    spec = from_crd(crd_spec("wirekube.io_wirekubegateways.yaml"))
    spec["properties"]["name"] = string("the WireKubeGateway's name", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                                        maxLength=253)
    spec["required"] = ["name", *spec.get("required", [])]
    return spec


def values_schema() -> Schema:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "WireKube Helm chart values (generated by ci/gen-values-schema.py; do not edit by hand)",
        **obj(
            {
                "nameOverride": string(),
                "fullnameOverride": string(),
                "commonLabels": LABEL_MAP,
                "imagePullSecrets": K8S_LIST,
                "crds": obj({"templated": BOOL}),
                "mesh": mesh_schema(),
                "agent": obj(
                    {
                        "image": image("ghcr.io/wirekube/wirekube-agent"),
                        "apiServer": obj({"host": string("API server host for nodes without ClusterIP routing",
                                                         pattern=r"^$|^[A-Za-z0-9.:\[\]-]+$"),
                                          "port": port()}),
                        "priorityClassName": string(),
                        "stateDir": string(pattern=r"^/"),
                        "cleanupInitContainer": BOOL,
                        "logFormat": {"type": "string", "enum": ["json", "text"]},
                        "logLevel": {"type": "string", "enum": ["trace", "debug", "info", "warning", "error"]},
                        "metrics": obj({"port": port()}),
                        "updateStrategy": K8S_OBJECT,
                        "serviceAccount": service_account(),
                        **scheduling(),
                    }
                ),
                "relay": obj(
                    {
                        "enabled": BOOL,
                        "replicas": integer(0, 100),
                        "image": image("ghcr.io/wirekube/wirekube-relay"),
                        "authorizePeers": BOOL,
                        "port": port(),
                        "stunPort": port(),
                        "natProbePort": port(),
                        "metricsPort": port(),
                        "mesh": obj({"enabled": BOOL, "port": port(), "existingSecret": string()}),
                        "drainSeconds": integer(0, 3600),
                        "maxPendingPerIP": integer(1, 100000),
                        "service": obj(
                            {
                                "type": {"type": "string", "enum": ["LoadBalancer", "NodePort", "ClusterIP"]},
                                "annotations": ANY_MAP,
                                "loadBalancerClass": string(),
                                "externalTrafficPolicy": {"type": "string", "enum": ["Cluster", "Local"]},
                                "loadBalancerSourceRanges": {"type": "array", "items": string(pattern=CIDR_PATTERN)},
                                "nodePorts": obj({"relay": integer(0, 65535), "stun": integer(0, 65535)}),
                            }
                        ),
                        "podDisruptionBudget": pdb(),
                        "serviceAccount": service_account(),
                        **scheduling(),
                    }
                ),
                "controller": obj(
                    {
                        "enabled": BOOL,
                        "replicas": integer(0, 10),
                        "image": image("ghcr.io/wirekube/wirekube-gateway"),
                        "metricsPort": port(),
                        "podDisruptionBudget": pdb(),
                        "serviceAccount": service_account(),
                        **scheduling(),
                    }
                ),
                "gateways": {"type": "array", "items": gateway_schema()},
                "admissionPolicy": obj({"enabled": BOOL}),
                "monitoring": obj(
                    {
                        "serviceMonitor": obj({"enabled": BOOL, "interval": string(pattern=r"^[0-9]+[smh]$"),
                                               "labels": LABEL_MAP}),
                        "podMonitor": obj({"enabled": BOOL, "interval": string(pattern=r"^[0-9]+[smh]$"),
                                           "labels": LABEL_MAP}),
                        "dashboard": obj({"enabled": BOOL, "labels": LABEL_MAP}),
                    }
                ),
                "tests": obj({"image": string()}),
            }
        ),
    }


def render() -> str:
    return json.dumps(values_schema(), indent=2) + "\n"


def main() -> int:
    return write_or_check(OUT, render(), __doc__.split("\n\n")[0], "ci/gen-values-schema.py")


if __name__ == "__main__":
    sys.exit(main())
