#!/usr/bin/env python3
"""Generate charts/wirekube/values.schema.json and charts/wirekube/README.md from values.yaml.

values.yaml is the one source: its keys and defaults give the schema's shape and types, the
`# --` comment above each key its description (the README's values table and the schema's
`description`), and an optional `# @schema {...}` line in that comment adds JSON Schema keywords
the default cannot show (an enum, a range, a pattern; "$CIDR" / "$IPV4" in a string stand for
the patterns below). A few key names carry a fixed meaning wherever they appear (free-form maps
such as nodeSelector, Kubernetes objects such as resources, image and port keys): see RULES.
The `mesh:` values and each `gateways:` entry mirror the WireKubeMesh / WireKubeGateway specs,
so their schema is derived from the CRDs instead. Every object gets additionalProperties: false,
so a typo'd key fails `helm lint` / `helm install`. Rules the CRDs express in CEL (CIDRs) become
regular expressions here, because Helm's JSON Schema has no CEL.

A value without a `# --` comment is an error: every value is documented.

    python3 ci/gen-values-schema.py          # rewrite both files
    python3 ci/gen-values-schema.py --check  # exit 1 if a committed file is stale (tests do this)
"""

from __future__ import annotations

import copy
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from _generated import write_or_check_all  # ci/ is sys.path[0] when a generator runs

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "wirekube"
VALUES = CHART / "values.yaml"
SCHEMA_OUT = CHART / "values.schema.json"
README_OUT = CHART / "README.md"
GENERATOR = "ci/gen-values-schema.py"

_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
IPV4 = rf"{_OCTET}(\.{_OCTET}){{3}}"
CIDR4 = rf"{IPV4}/([0-9]|[12][0-9]|3[0-2])"
CIDR6 = r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8])"
CIDR_PATTERN = rf"^({CIDR4}|{CIDR6})$"
CIDR4_PATTERN = rf"^{CIDR4}$"
MACROS = {"$CIDR": CIDR_PATTERN, "$IPV4": rf"^{IPV4}$"}
Schema = dict[str, Any]
Path_ = tuple[str, ...]

# ---- the comments of values.yaml -------------------------------------------------------------

_KEY = re.compile(r"^(?P<key>[A-Za-z0-9_.\-/]+|\"[^\"]*\"):(?:\s|$)")


@dataclass
class Doc:
    description: str
    hints: Schema = field(default_factory=dict)


class ValuesError(Exception):
    """values.yaml breaks a documentation rule; the message names the key."""


def _expand(node: Any) -> Any:
    if isinstance(node, str):
        return MACROS.get(node, node)
    if isinstance(node, dict):
        return {k: _expand(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v) for v in node]
    return node


def parse_docs(text: str) -> dict[Path_, Doc]:
    """The `# --` comment block right above each key, by the key's path.

    A block starts with `# --`, continues over the following comment lines and ends at the key
    below it; a blank line or a key without such a block drops it. Lines inside block lists
    (`- ...`) belong to their list and are skipped."""
    docs: dict[Path_, Doc] = {}
    stack: list[tuple[int, str]] = []
    lines: list[str] | None = None
    hints: Schema = {}
    in_list_deeper_than: int | None = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if not stripped:
            lines = None
            continue
        if stripped.startswith("#"):
            body = stripped[1:].strip()
            if body.startswith("--"):
                lines, hints = [body[2:].strip()], {}
            elif lines is not None and body.startswith("@schema"):
                try:
                    hints.update(_expand(json.loads(body[len("@schema"):])))
                except json.JSONDecodeError as e:
                    raise ValuesError(f"values.yaml:{number}: @schema is not JSON: {e}") from e
            elif lines is not None:
                lines.append(body)
            continue
        if in_list_deeper_than is not None and indent > in_list_deeper_than:
            continue
        in_list_deeper_than = None
        if stripped.startswith("-"):
            in_list_deeper_than = indent
            continue
        match = _KEY.match(stripped)
        if not match:
            lines = None
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = match["key"].strip('"')
        path = tuple(k for _, k in stack) + (key,)
        if lines is not None:
            docs[path] = Doc(" ".join(part for part in lines if part), hints)
        lines = None
        stack.append((indent, key))
    return docs


# ---- the schema ------------------------------------------------------------------------------

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
    spec: Schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec


def mesh_schema() -> Schema:
    spec = from_crd(crd_spec("wirekube.io_wirekubemeshes.yaml"))
    spec["properties"]["create"] = {"type": "boolean"}
    stun = spec["properties"]["stunServers"]
    stun.pop("minItems", None)
    stun["not"] = {"type": "array", "minItems": 1, "maxItems": 1}
    endpoint = spec["properties"]["relay"]["properties"]["external"]["properties"]["endpoint"]
    endpoint["pattern"] = "^$|" + endpoint["pattern"]
    wss = spec["properties"]["relay"]["properties"]["wssEndpoint"]  # "" in values.yaml: none (not rendered)
    wss["pattern"] = "^$|" + wss["pattern"]
    mtu = spec["properties"]["mtu"]  # int-or-string in the CRD, its rule in CEL
    mtu.pop("type", None)
    mtu["oneOf"] = [{"type": "integer", "minimum": 1280, "maximum": 9000}, {"type": "string", "enum": ["auto"]}]
    return spec


def gateway_schema() -> Schema:
    spec = from_crd(crd_spec("wirekube.io_wirekubegateways.yaml"))
    spec["properties"]["name"] = {"type": "string", "description": "the WireKubeGateway's name",
                                  "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}
    spec["required"] = ["name", *spec.get("required", [])]
    return spec


STRING_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
K8S_OBJECT: Schema = {"type": "object"}  # validated by the API server
K8S_LIST: Schema = {"type": "array", "items": {"type": "object"}}
DNS_NAME = r"^$|^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"

# Key names with one meaning wherever they appear (a value's own @schema hint still wins).
RULES: dict[str, Schema] = {
    **{k: STRING_MAP for k in ("nodeSelector", "podAnnotations", "podLabels", "annotations", "labels",
                               "commonLabels")},
    **{k: K8S_OBJECT for k in ("affinity", "resources", "securityContext", "containerSecurityContext",
                               "updateStrategy")},
    **{k: K8S_LIST for k in ("tolerations", "imagePullSecrets", "topologySpreadConstraints", "extraEnv")},
    "extraArgs": {"type": "array", "items": {"type": "string"}},
}
IMAGE_RULES: dict[str, Schema] = {
    "repository": {"type": "string", "minLength": 1},
    "tag": {"type": "string", "pattern": r"^$|^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"},
    "digest": {"type": "string", "pattern": r"^$|^sha256:[a-f0-9]{64}$"},
    "pullPolicy": {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]},
}
_SCALARS = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"))


def is_leaf(path: Path_, value: Any, docs: dict[Path_, Doc]) -> bool:
    """Whether a key is one documented value (a row) rather than a group of them."""
    hint = docs.get(path, Doc("")).hints
    return not isinstance(value, dict) or path[-1] in RULES or "type" in hint or path == ("gateways",)


def infer(path: Path_, value: Any, docs: dict[Path_, Doc]) -> Schema:
    """The schema of one values key: its rule, its default's type, then its @schema hint."""
    key = path[-1]
    hint = copy.deepcopy(docs.get(path, Doc("")).hints)
    if path == ("mesh",):
        out = mesh_schema()
        _describe_crd(out, path, value, docs)
        return out
    if path == ("gateways",):
        out = {"type": "array", "items": gateway_schema()}
    elif key in RULES:
        out = copy.deepcopy(RULES[key])
    elif len(path) >= 2 and path[-2] == "image" and key in IMAGE_RULES:
        out = copy.deepcopy(IMAGE_RULES[key])
    elif len(path) >= 2 and path[-2] == "serviceAccount" and key == "name":
        out = {"type": "string", "pattern": DNS_NAME}
    elif isinstance(value, dict) and "type" not in hint:
        out = {"type": "object", "additionalProperties": False,
               "properties": {k: infer(path + (k,), v, docs) for k, v in value.items()}}
        if key == "image":
            out["required"] = ["repository"]
    elif isinstance(value, int) and not isinstance(value, bool) and (key == "port" or key.endswith("Port")):
        out = {"type": "integer", "minimum": 1, "maximum": 65535}
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        out = {"type": "array", "items": {"type": "string"}}
    else:
        out = next(({"type": name} for kind, name in _SCALARS if isinstance(value, kind)), {})
        if not out and "type" not in hint:
            raise ValuesError(f"values.yaml: {'.'.join(path)}: no type can be inferred from its default "
                              f"{value!r}; add a `# @schema {{\"type\": ...}}` line to its comment")
    out.update(hint)
    doc = docs.get(path)
    if doc and doc.description:
        out["description"] = doc.description
    return out


def _describe_crd(node: Schema, path: Path_, value: Any, docs: dict[Path_, Doc]) -> None:
    """Put the values.yaml descriptions onto the CRD-derived mesh schema."""
    doc = docs.get(path)
    if doc and doc.description:
        node["description"] = doc.description
    if isinstance(value, dict):
        for k, v in value.items():
            if k not in node.get("properties", {}):
                raise ValuesError(f"values.yaml: {'.'.join(path + (k,))} is not a field of the CRD it mirrors")
            _describe_crd(node["properties"][k], path + (k,), v, docs)


def values_schema(values: dict[str, Any], docs: dict[Path_, Doc]) -> Schema:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"WireKube Helm chart values (generated by {GENERATOR} from values.yaml; do not edit by hand)",
        "type": "object",
        "additionalProperties": False,
        "properties": {k: infer((k,), v, docs) for k, v in values.items()},
    }


# ---- the README ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    key: str
    type: str
    default: str
    description: str


def rows(values: dict[str, Any], schema: Schema, docs: dict[Path_, Doc]) -> list[Row]:
    """One row per documented value, in values.yaml's order; raises naming every undocumented one."""
    out: list[Row] = []
    missing: list[str] = []

    def walk(path: Path_, value: Any, node: Schema) -> None:
        if not is_leaf(path, value, docs):
            for k, v in value.items():
                walk(path + (k,), v, node["properties"][k])
            return
        doc = docs.get(path)
        if doc is None or not doc.description:
            missing.append(".".join(path))
            return
        out.append(Row(".".join(path), _type_name(node), _default(value), doc.description))

    for k, v in values.items():
        walk((k,), v, schema["properties"][k])
    if missing:
        raise ValuesError("\n".join(f"values.yaml: {key} has no `# --` comment (every value is documented)"
                                    for key in missing))
    return out


def _type_name(node: Schema) -> str:
    if "oneOf" in node:
        return " or ".join(_type_name(n) for n in node["oneOf"])
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    kind = node.get("type", "any")
    if isinstance(kind, list):
        return " or ".join(kind)
    if kind == "array":
        return f"list of {_type_name(node.get('items', {}))}s"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map of {_type_name(node['additionalProperties'])}s"
    return str(kind)


def _default(value: Any) -> str:
    text = json.dumps(value, separators=(", ", ": "))
    return "`" + text.replace("|", "\\|") + "`"


def readme(chart: dict[str, Any], table: list[Row]) -> str:
    head = f"""# WireKube Helm chart

<!-- Generated by {GENERATOR} from values.yaml: edit the comments there, then run it. -->

{chart['description']}.

    helm install wirekube charts/wirekube -n wirekube-system --create-namespace
    helm test wirekube -n wirekube-system   # passes when every peer reports connected

The agents run as a DaemonSet on every node (host network, NET_ADMIN and NET_RAW only), the relay
and the gateway controller as Deployments with restricted security contexts. Each component has
its own ServiceAccount and RBAC (templates/rbac-*.yaml); the `helm test` pod has a read-only one
of its own, so it works with any component turned off. The project README explains the mesh,
NAT traversal, the relay and the gateways; examples/eks-hybrid/values.yaml sets the chart up for
EKS Hybrid Nodes.

`values.schema.json` rejects unknown keys at every level (`additionalProperties: false`), so a
typo fails `helm install` and `helm lint` instead of being ignored.

## Values

| Key | Type | Default | Description |
|---|---|---|---|
"""
    body = "".join(f"| `{r.key}` | {r.type} | {r.default} | {r.description.replace('|', chr(92) + '|')} |\n"
                   for r in table)
    return head + body


# ---- main ------------------------------------------------------------------------------------


def generate() -> dict[Path, str]:
    text = VALUES.read_text()
    values = yaml.safe_load(text)
    docs = parse_docs(text)
    schema = values_schema(values, docs)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    return {SCHEMA_OUT: json.dumps(schema, indent=2) + "\n", README_OUT: readme(chart, rows(values, schema, docs))}


def main() -> int:
    try:
        outputs = generate()
    except ValuesError as e:
        print(e, file=sys.stderr)
        return 1
    return write_or_check_all(outputs, __doc__.split("\n\n")[0], GENERATOR)


if __name__ == "__main__":
    sys.exit(main())
