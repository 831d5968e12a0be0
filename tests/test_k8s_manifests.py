"""Offline validation of the Kubernetes manifests in deploy/k8s (see docs/kubernetes.md).

- Built-in kinds (Deployment, Service, HPA, ...): kubernetes-validate's Python API against the schemas it ships,
  for pinned Kubernetes versions, in strict mode (an unknown field anywhere fails, so a typo fails CI).
- Custom resources (KEDA ScaledObject, InferencePool): kubernetes-validate has no schema for them; its Python API
  raises SchemaNotFoundError and its command line only prints a WARN and exits 0, i.e. they would pass unchecked.
  They are validated here against small JSON schemas for the fields we use (required fields, types, no unknown
  keys), as are the config files embedded in ConfigMaps (prometheus-adapter rules, endpoint picker config).
- Cross-references: selectors vs pod labels, probe and Service ports vs container ports, autoscaler targets,
  volumes vs mounts, server flags vs ports, grace periods and probe budgets.

Nothing here skips: kubernetes-validate is imported unconditionally, so without it the module fails to collect.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import kubernetes_validate  # the `test` extra installs it; missing means a collection error, never a skip
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "deploy" / "k8s"
DOC = ROOT / "docs" / "kubernetes.md"

# Kubernetes versions whose schemas the built-in kinds must pass: the oldest cluster we claim to support and the
# newest kubernetes-validate (>= 1.37, see pyproject.toml) ships. Keep docs/kubernetes.md in step.
KUBERNETES_VERSIONS = ("1.30", "1.37")

# What the server exports on :8002 (README / metrics docs); the autoscalers and the EPP config must use these.
SERVER_METRICS = {
    "pagedllm_num_requests_waiting", "pagedllm_num_requests_running", "pagedllm_kv_cache_usage_perc",
    "pagedllm_kv_blocks_free", "pagedllm_kv_blocks_total",
}


def _load_all() -> dict[str, list[dict]]:
    out = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return out


MANIFESTS = _load_all()
DOCS = [(name, doc) for name, docs in MANIFESTS.items() for doc in docs]


def _id(name: str, doc: dict) -> str:
    return f"{name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def _one(kind: str, api_version: str | None = None) -> dict:
    found = [d for _, d in DOCS if d["kind"] == kind and (api_version is None or d["apiVersion"] == api_version)]
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def _configmap(name: str) -> dict:
    found = [d for _, d in DOCS if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected the ConfigMap {name}"
    return found[0]


# ---------------------------------------------------------------------------------------------------------------
# JSON schemas for the custom resources and embedded configs (only what we use; unknown keys are errors).

_STR = {"type": "string"}
_STR_MAP = {"type": "object", "additionalProperties": _STR}
_DNS_NAME = {"type": "string", "maxLength": 253,
             "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
_METADATA = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {"name": _DNS_NAME, "namespace": _DNS_NAME, "labels": _STR_MAP, "annotations": _STR_MAP},
}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_NONNEG = {"type": "integer", "minimum": 0}


def _resource(api_version: str, kind: str, spec: dict) -> dict:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _METADATA,
                       "spec": spec},
    }


# KEDA v2 ScaledObject (keda.sh/v1alpha1), fields as in KEDA's ScaledObjectSpec; prometheus trigger metadata keys
# as in KEDA's prometheus scaler. The HPA behavior inside is checked against Kubernetes' own schema separately.
_PROMETHEUS_METADATA_KEYS = ["serverAddress", "query", "threshold", "activationThreshold", "namespace",
                             "queryParameters", "customHeaders", "ignoreNullValues", "unsafeSsl", "timeout",
                             "awsRegion", "identityOwner", "authModes"]
SCALED_OBJECT_SCHEMA = _resource("keda.sh/v1alpha1", "ScaledObject", {
    "type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
    "properties": {
        "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                           "properties": {"name": _DNS_NAME, "apiVersion": _STR, "kind": _STR,
                                          "envSourceContainerName": _STR}},
        "pollingInterval": {"type": "integer", "minimum": 1},
        "initialCooldownPeriod": _NONNEG, "cooldownPeriod": _NONNEG, "idleReplicaCount": _NONNEG,
        "minReplicaCount": _NONNEG, "maxReplicaCount": {"type": "integer", "minimum": 1},
        "advanced": {"type": "object", "additionalProperties": False, "properties": {
            "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                              "properties": {"name": _STR, "behavior": {"type": "object"}}},
            "restoreToOriginalReplicaCount": {"type": "boolean"},
            "scalingModifiers": {"type": "object"}}},
        "fallback": {"type": "object", "required": ["failureThreshold", "replicas"], "additionalProperties": False,
                     "properties": {"failureThreshold": _NONNEG, "replicas": _NONNEG,
                                    "behavior": {"enum": ["static", "currentReplicas", "currentReplicasIfHigher",
                                                          "currentReplicasIfLower"]}}},
        "triggers": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
            "properties": {"type": _STR, "name": _STR, "useCachedMetrics": {"type": "boolean"},
                           "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                           "authenticationRef": {"type": "object"},
                           # KEDA reads trigger metadata as map[string]string: numbers must be quoted.
                           "metadata": _STR_MAP},
            "if": {"properties": {"type": {"const": "prometheus"}}},
            "then": {"properties": {"metadata": {
                "required": ["serverAddress", "query", "threshold"],
                "propertyNames": {"enum": _PROMETHEUS_METADATA_KEYS}}}},
        }},
    },
})

# Gateway API Inference Extension InferencePool, inference.networking.k8s.io/v1 (the v1.5.0 CRD; endpointPickerRef
# is required there and optional from v1.6.0; we always set it).
INFERENCE_POOL_SCHEMA = _resource("inference.networking.k8s.io/v1", "InferencePool", {
    "type": "object", "required": ["selector", "targetPorts", "endpointPickerRef"], "additionalProperties": False,
    "properties": {
        "selector": {"type": "object", "required": ["matchLabels"], "additionalProperties": False,
                     "properties": {"matchLabels": {**_STR_MAP, "minProperties": 1, "maxProperties": 64}}},
        "targetPorts": {"type": "array", "minItems": 1, "maxItems": 8, "items": {
            "type": "object", "required": ["number"], "additionalProperties": False,
            "properties": {"number": _PORT}}},
        "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
        "endpointPickerRef": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {
                "group": _STR, "kind": _STR, "name": _DNS_NAME,
                "port": {"type": "object", "required": ["number"], "additionalProperties": False,
                         "properties": {"number": _PORT}},
                "failureMode": {"enum": ["FailOpen", "FailClose"]}},
            # The CRD's rule: a port is required when kind is Service (the default).
            "anyOf": [{"required": ["port"]},
                      {"required": ["kind"], "properties": {"kind": {"not": {"const": "Service"}}}}]},
    },
})

CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT_SCHEMA,
    ("inference.networking.k8s.io/v1", "InferencePool"): INFERENCE_POOL_SCHEMA,
}

# prometheus-adapter's --config file (discovery rules for custom.metrics.k8s.io).
ADAPTER_CONFIG_SCHEMA = {
    "type": "object", "required": ["rules"], "additionalProperties": False,
    "properties": {"rules": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["seriesQuery", "resources", "name", "metricsQuery"],
        "additionalProperties": False,
        "properties": {
            "seriesQuery": _STR, "metricsQuery": _STR,
            "seriesFilters": {"type": "array", "items": {"type": "object"}},
            "resources": {"type": "object", "additionalProperties": False, "properties": {
                "template": _STR,
                "overrides": {"type": "object", "additionalProperties": {
                    "type": "object", "required": ["resource"], "additionalProperties": False,
                    "properties": {"group": _STR, "resource": _STR}}}}},
            "name": {"type": "object", "required": ["matches"], "additionalProperties": False,
                     "properties": {"matches": _STR, "as": _STR}}}}}},
}

# The endpoint picker's EndpointPickerConfig (GIE v1.5.0), with the metrics plugins' parameters spelled out.
_ENGINE_CONFIG = {
    "type": "object", "required": ["name", "queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec"],
    "additionalProperties": False,
    "properties": {k: _STR for k in ["name", "queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec",
                                     "cacheInfoSpec", "cacheBlockSizeLabelName", "cacheNumBlocksLabelName",
                                     "cacheBlockSizeSpec", "cacheNumBlocksSpec"]},
}
EPP_CONFIG_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "plugins", "schedulingProfiles"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "inference.networking.x-k8s.io/v1alpha1"},
        "kind": {"const": "EndpointPickerConfig"},
        "featureGates": {"type": "array", "items": _STR},
        "plugins": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["type"], "additionalProperties": False,
            "properties": {"name": _STR, "type": _STR, "parameters": {"type": "object"}},
            "allOf": [
                {"if": {"properties": {"type": {"const": "core-metrics-extractor"}}},
                 "then": {"properties": {"parameters": {"additionalProperties": False, "properties": {
                     "engineLabelKey": _STR, "defaultEngine": _STR,
                     "engineConfigs": {"type": "array", "items": _ENGINE_CONFIG}}}}}},
                {"if": {"properties": {"type": {"const": "metrics-data-source"}}},
                 "then": {"properties": {"parameters": {"additionalProperties": False, "properties": {
                     "scheme": {"enum": ["http", "https"]}, "path": _STR,
                     "insecureSkipVerify": {"type": "boolean"}}}}}},
            ]}},
        "dataLayer": {"type": "object", "required": ["sources"], "additionalProperties": False, "properties": {
            "sources": {"type": "array", "items": {
                "type": "object", "required": ["pluginRef"], "additionalProperties": False,
                "properties": {"pluginRef": _STR, "extractors": {"type": "array", "items": {
                    "type": "object", "required": ["pluginRef"], "additionalProperties": False,
                    "properties": {"pluginRef": _STR}}}}}}}},
        "schedulingProfiles": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "plugins"], "additionalProperties": False,
            "properties": {"name": _STR, "plugins": {"type": "array", "items": {
                "type": "object", "required": ["pluginRef"], "additionalProperties": False,
                "properties": {"pluginRef": _STR, "weight": {"type": "number"}}}}}}},
        "saturationDetector": {"type": "object"}, "flowControl": {"type": "object"}, "parser": {"type": "object"},
    },
}


def _check(schema: dict, doc) -> None:
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(doc)


def _validate_builtin(doc: dict, version: str) -> None:
    used = kubernetes_validate.validate(doc, version, strict=True)
    # It silently falls back to an older schema set when the asked-for one is missing: insist on the pinned one.
    assert used == version, f"kubernetes-validate used the {used} schemas, not {version}"


# ---------------------------------------------------------------------------------------------------------------
# Every manifest is valid.

BUILTIN = [(n, d) for n, d in DOCS if (d.get("apiVersion"), d.get("kind")) not in CRD_SCHEMAS]
CUSTOM = [(n, d) for n, d in DOCS if (d.get("apiVersion"), d.get("kind")) in CRD_SCHEMAS]


def test_the_manifest_set():
    assert MANIFESTS, f"no manifests found in {K8S_DIR}"
    for name, doc in DOCS:
        assert isinstance(doc, dict) and {"apiVersion", "kind", "metadata"} <= doc.keys(), name
    kinds = sorted(d["kind"] for _, d in DOCS)
    for kind in ["Deployment", "Service", "PersistentVolumeClaim", "Secret", "HorizontalPodAutoscaler",
                 "ScaledObject", "InferencePool", "ConfigMap"]:
        assert kind in kinds, f"no {kind} among {kinds}"
    names = [(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")) for _, d in DOCS]
    assert len(names) == len(set(names)), "two manifests define the same object"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name,doc", BUILTIN, ids=[_id(n, d) for n, d in BUILTIN])
def test_builtin_kinds_pass_the_kubernetes_schemas(name, doc, version):
    _validate_builtin(doc, version)


@pytest.mark.parametrize("name,doc", CUSTOM, ids=[_id(n, d) for n, d in CUSTOM])
def test_custom_resources_pass_our_schemas(name, doc):
    _check(CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])], doc)


@pytest.mark.parametrize("name,doc", CUSTOM, ids=[_id(n, d) for n, d in CUSTOM])
def test_kubernetes_validate_does_not_check_custom_resources(name, doc):
    """Why the custom resources need their own schemas: the library has none for them."""
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
    # ... and its command-line path reports that as a warning with a zero status, i.e. "valid".
    rc = kubernetes_validate.utils.validate_resource(doc, name, KUBERNETES_VERSIONS[-1], strict=True,
                                                     quiet=True, no_warn=True)
    assert rc == 0


def test_embedded_configs_pass_their_schemas():
    _check(ADAPTER_CONFIG_SCHEMA, yaml.safe_load(_configmap("prometheus-adapter-pagedllm")["data"]["config.yaml"]))
    _check(EPP_CONFIG_SCHEMA, yaml.safe_load(_configmap("pagedllm-epp-config")["data"]["pagedllm-plugins.yaml"]))


def test_keda_hpa_behavior_is_a_valid_kubernetes_behavior():
    """KEDA copies advanced.horizontalPodAutoscalerConfig.behavior into the HPA it creates: check it as one."""
    behavior = _one("ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = copy.deepcopy(_one("HorizontalPodAutoscaler"))
    hpa["spec"]["behavior"] = behavior
    for version in KUBERNETES_VERSIONS:
        _validate_builtin(hpa, version)


_QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$")


def _quantities(node, path=""):
    """Resource quantities the schemas only type-check as strings/numbers: requests, limits, sizeLimit."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("requests", "limits") and isinstance(v, dict):
                yield from ((f"{path}.{k}.{r}", q) for r, q in v.items())
            elif k == "sizeLimit":
                yield f"{path}.{k}", v
            else:
                yield from _quantities(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _quantities(v, f"{path}[{i}]")


def test_resource_quantities_are_well_formed():
    found = [(f"{_id(n, d)}{p}", q) for n, d in BUILTIN for p, q in _quantities(d)]
    assert found
    bad = [(p, q) for p, q in found if not _QUANTITY.match(str(q))]
    assert not bad, bad


# ---------------------------------------------------------------------------------------------------------------
# Typos are caught.

def _deployment_with(mutate) -> dict:
    dep = copy.deepcopy(_one("Deployment"))
    mutate(dep)
    return dep


def _pod(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]


def test_a_typo_in_the_deployment_fails():
    broken = _deployment_with(lambda d: _pod(d).__setitem__("containres", _pod(d).pop("containers")))
    for version in KUBERNETES_VERSIONS:
        with pytest.raises(kubernetes_validate.ValidationError):
            _validate_builtin(broken, version)


def test_a_typo_deep_inside_a_container_fails():
    def misspell(dep):
        container = _pod(dep)["containers"][0]
        container["readinessProbe"]["httpGet"]["paht"] = container["readinessProbe"]["httpGet"].pop("path")

    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        _validate_builtin(_deployment_with(misspell), KUBERNETES_VERSIONS[-1])


def test_typos_in_custom_resources_fail():
    so = copy.deepcopy(_one("ScaledObject"))
    so["spec"]["scaleTargetref"] = so["spec"].pop("scaleTargetRef")
    with pytest.raises(jsonschema.ValidationError):
        _check(SCALED_OBJECT_SCHEMA, so)

    so = copy.deepcopy(_one("ScaledObject"))
    so["spec"]["triggers"][0]["metadata"]["treshold"] = so["spec"]["triggers"][0]["metadata"].pop("threshold")
    with pytest.raises(jsonschema.ValidationError):
        _check(SCALED_OBJECT_SCHEMA, so)

    so = copy.deepcopy(_one("ScaledObject"))
    so["spec"]["triggers"][0]["metadata"]["threshold"] = 4  # unquoted: KEDA wants strings
    with pytest.raises(jsonschema.ValidationError):
        _check(SCALED_OBJECT_SCHEMA, so)

    pool = copy.deepcopy(_one("InferencePool"))
    pool["spec"]["targetPortNumber"] = pool["spec"].pop("targetPorts")[0]["number"]  # the pre-v1 field
    with pytest.raises(jsonschema.ValidationError):
        _check(INFERENCE_POOL_SCHEMA, pool)

    pool = copy.deepcopy(_one("InferencePool"))
    del pool["spec"]["endpointPickerRef"]["port"]
    with pytest.raises(jsonschema.ValidationError):
        _check(INFERENCE_POOL_SCHEMA, pool)


# ---------------------------------------------------------------------------------------------------------------
# Cross-references.

# Looked up per test (not at import), so a broken manifest fails its own checks instead of the whole module.
def _container() -> dict:
    return _one("Deployment")["spec"]["template"]["spec"]["containers"][0]


def _pod_labels() -> dict:
    return _one("Deployment")["spec"]["template"]["metadata"]["labels"]


def _ports() -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in _container()["ports"]}


def _args() -> dict[str, str]:
    out = {}
    for arg in _container()["args"]:
        assert arg.startswith("--") and "=" in arg, f"write server flags as --name=value: {arg}"
        key, value = arg[2:].split("=", 1)
        out[key] = value
    return out


def _resolve_port(port) -> int:
    ports = _ports()
    if isinstance(port, str):
        assert port in ports, f"port name {port!r} is not a container port ({sorted(ports)})"
        return ports[port]
    assert port in ports.values(), f"port {port} is not a container port"
    return port


def _subset(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_deployment_selector_matches_its_pods():
    dep = _one("Deployment")
    assert len(dep["spec"]["template"]["spec"]["containers"]) == 1
    assert _subset(dep["spec"]["selector"]["matchLabels"], _pod_labels())


def test_service_selects_the_pods_and_maps_every_port():
    svc = _one("Service")
    assert _subset(svc["spec"]["selector"], _pod_labels())
    by_port = {p["port"]: _resolve_port(p["targetPort"]) for p in svc["spec"]["ports"]}
    assert by_port == {8000: 8000, 8001: 8001, 8002: 8002, 9000: 9000}


def test_server_flags_agree_with_the_ports():
    args = _args()
    assert _resolve_port("http") == int(args["http-port"]) == 8000
    assert _resolve_port("grpc") == int(args["grpc-port"]) == 8001
    assert _resolve_port("metrics") == int(args["metrics-port"]) == 8002
    assert _resolve_port("openai") == int(args["openai-port"]) == 9000
    assert args["model"] == "/models/checkpoint"
    annotations = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == _ports()["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_probes():
    probes = {k: _container()[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, probe in probes.items():
        assert _resolve_port(probe["httpGet"]["port"]) == _ports()["http"], kind
    assert probes["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = probes["startupProbe"]
    budget = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    # Generous (big checkpoints load for minutes) and no shorter than the server's own wait for the model.
    assert budget >= 900 and budget >= float(_args()["startup-timeout"])


def test_shutdown_grace_fits_in_the_termination_grace_period():
    pod = _one("Deployment")["spec"]["template"]["spec"]
    pre_stop = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(_args()["shutdown-grace-secs"]) + int(pre_stop[1])


def test_volumes():
    volumes = {v["name"]: v for v in _one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in _container()["volumeMounts"]}
    for mount in mounts.values():
        assert mount["name"] in volumes, f"mount of undefined volume {mount['name']}"
    assert len({m["name"] for m in mounts.values()}) == len(mounts)

    shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"]

    checkpoint = mounts["/models/checkpoint"]
    assert checkpoint["readOnly"] is True
    claim = volumes[checkpoint["name"]]["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    assert claim["claimName"] == _one("PersistentVolumeClaim")["metadata"]["name"]


def test_gpu_and_resources():
    resources = _container()["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    if "nvidia.com/gpu" in resources.get("requests", {}):  # extended resources: requests must equal limits
        assert resources["requests"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]


def test_api_key_comes_from_the_secret():
    env = {e["name"]: e for e in _container()["env"]}
    ref = env["PAGEDLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
    secret = _one("Secret")
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    assert not ref.get("optional", False), "a missing key must stop the pod, not serve without auth"
    assert "placeholder" in secret["stringData"][ref["key"]].lower()


def _targets_the_deployment(ref: dict) -> None:
    assert ref["name"] == _one("Deployment")["metadata"]["name"]
    assert ref.get("kind", "Deployment") == "Deployment"
    assert ref.get("apiVersion", "apps/v1") == "apps/v1"


def test_hpa_scales_the_deployment_on_waiting_requests():
    hpa = _one("HorizontalPodAutoscaler")
    _targets_the_deployment(hpa["spec"]["scaleTargetRef"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "pagedllm_num_requests_waiting"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_prometheus_adapter_serves_the_hpa_metric():
    hpa_metric = _one("HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    (rule,) = yaml.safe_load(_configmap("prometheus-adapter-pagedllm")["data"]["config.yaml"])["rules"]
    assert rule["seriesQuery"].startswith(hpa_metric + "{")
    assert re.fullmatch(rule["name"]["matches"], hpa_metric)
    assert re.sub(rule["name"]["matches"], rule["name"].get("as") or hpa_metric, hpa_metric) == hpa_metric
    assert {o["resource"] for o in rule["resources"]["overrides"].values()} == {"namespace", "pod"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]


def test_keda_scales_the_deployment_on_waiting_requests():
    so = _one("ScaledObject")
    _targets_the_deployment(so["spec"]["scaleTargetRef"])
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert re.fullmatch(r"sum\(pagedllm_num_requests_waiting(\{[^}]*\})?\)", trigger["metadata"]["query"])
    assert float(trigger["metadata"]["threshold"]) > 0
    assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]


def test_inference_pool_selects_the_pods_on_the_openai_port():
    pool = _one("InferencePool")
    assert _subset(pool["spec"]["selector"]["matchLabels"], _pod_labels())
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [_ports()["openai"]]


def test_epp_config_maps_our_metric_names():
    config = yaml.safe_load(_configmap("pagedllm-epp-config")["data"]["pagedllm-plugins.yaml"])
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    extractor = next(p for p in plugins.values() if p["type"] == "core-metrics-extractor")["parameters"]
    engines = {e["name"]: e for e in extractor["engineConfigs"]}
    engine = engines[_pod_labels()[extractor.get("engineLabelKey", "inference.networking.k8s.io/engine-type")]]
    assert extractor["defaultEngine"] == engine["name"]
    assert engine["queuedRequestsSpec"] == "pagedllm_num_requests_waiting"
    assert engine["runningRequestsSpec"] == "pagedllm_num_requests_running"
    assert engine["kvUsageSpec"] == "pagedllm_kv_cache_usage_perc"
    specs = [v for k, v in engine.items() if k.endswith("Spec") and v]
    assert {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", s).group() for s in specs} <= SERVER_METRICS
    refs = [s["pluginRef"] for s in config["dataLayer"]["sources"]]
    refs += [e["pluginRef"] for s in config["dataLayer"]["sources"] for e in s.get("extractors", [])]
    refs += [p["pluginRef"] for prof in config["schedulingProfiles"] for p in prof["plugins"]]
    assert set(refs) <= plugins.keys(), f"references to undefined plugins: {set(refs) - plugins.keys()}"


def test_kustomization():
    kust = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kust["kind"] == "Kustomization"
    resources = kust["resources"]
    assert len(resources) == len(set(resources))
    for res in resources:
        assert res in MANIFESTS, f"kustomization lists {res}, which is not a manifest here"
    kinds = {d["kind"] for r in resources for d in MANIFESTS[r]}
    assert {"Deployment", "Service", "PersistentVolumeClaim"} <= kinds
    assert "Secret" not in kinds, "apply -k must never overwrite a real API key with the placeholder"
    # Custom resources would make `apply -k` fail on clusters without KEDA / the inference extension.
    assert not {(d["apiVersion"], d["kind"]) for r in resources for d in MANIFESTS[r]} & CRD_SCHEMAS.keys()


def test_docs_cover_every_manifest_and_the_versions():
    text = DOC.read_text()
    for name in [*MANIFESTS, "kustomization.yaml"]:
        assert name in text, f"docs/kubernetes.md does not mention {name}"
    for version in KUBERNETES_VERSIONS:
        assert version in text, f"docs/kubernetes.md does not name Kubernetes {version}"
    assert "What was and was not tried" in text


def test_the_deployment_args_are_flags_pagedllm_serve_takes():
    """The container's arguments go to `pagedllm serve` (the image's entry point): its parser must accept them
    all, with the values the docs promise."""
    from pagedllm.cli import build_parser

    args = build_parser().parse_args(["serve", *_container()["args"]])
    assert args.openai_port == 9000 and args.shutdown_grace_secs == 30 and args.model == "/models/checkpoint"
    env = {e["name"] for e in _container().get("env", [])}
    assert "PAGEDLLM_API_KEY" in env  # what --api-key falls back to
