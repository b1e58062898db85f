"""Offline validation of the Kubernetes manifests in deploy/k8s: render, check schemas, lint.

1. Render each kustomization in ``TARGETS`` with deploy/render.py (no kustomize binary in CI).
2. Validate every built-in object against the Kubernetes JSON schemas of ``KUBERNETES_VERSIONS`` with
   kubernetes-validate (schemas bundled in the PyPI package, strict: unknown fields are errors).
3. CRDs (ServiceMonitor, InferenceService) are not in those schemas: ``lint`` checks their structure.
4. ``lint``: the mistakes that bite at deploy time and no schema sees (probes on paths the server does not
   serve, a container without limits, selectors that match nothing, an HPA metric nobody exports, ...).

    python -m deploy.validate          # make deploy-validate; exit 1 and one line a problem if any
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from deploy.render import render
from service.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
K8S = REPO_ROOT / "deploy" / "k8s"
TARGETS = ("overlays/cpu", "overlays/gpu", "kserve", "prometheus-adapter")
# Oldest release we support (autoscaling/v2 behavior, policy/v1, appProtocol all GA well before) and the
# newest whose schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
CRD_KINDS = {"ServiceMonitor", "InferenceService"}
HTTP_PORT, GRPC_PORT = 3000, 8001
# GET paths the server answers (docs/service.md); tests/test_deploy_server.py checks each one the
# manifests use against the running server.
SERVED_PATHS = {"/livez", "/readyz", "/metrics", "/models", "/docs.json", "/v2", "/v2/health/live",
                "/v2/health/ready"}
PROBE_PATHS = {"startupProbe": "/livez", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
LONGEST_STREAM_S = 60  # a 2000-character /generate on a busy CPU; the grace period must outlast it
# Settings the server reads (service/settings.py, the one source): a typo in the ConfigMap would be ignored.
# Per-model overrides: for each model of the repo's models.yaml (the one the image carries).
SERVED_MODELS = Settings.from_env({"NNSERVE_MODELS_CONFIG": str(REPO_ROOT / "models.yaml")}).models
KNOWN_SETTINGS = {f"NNSERVE_{f.name.upper()}" for f in fields(Settings) if f.name not in Settings.PER_MODEL} | {
    f"{model.env_prefix}{suffix}" for model in SERVED_MODELS for suffix in ("TAG", "MAX_QUEUE_DELAY_MS")}


def exported_metrics() -> set[str]:
    """Metric names the server exports, as documented in docs/metrics.md's tables (which
    tests/test_service.py keeps equal to the running server's /metrics)."""
    text = (REPO_ROOT / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\| `(nnserve_[a-z_]+)`", text, flags=re.MULTILINE))


def render_all() -> dict[str, list[dict]]:
    return {target: render(K8S / target) for target in TARGETS}


def schema_errors(objects: list[dict], versions: tuple[str, ...] = KUBERNETES_VERSIONS) -> list[str]:
    """kubernetes-validate on every object but the CRDs, for each version."""
    import kubernetes_validate

    errors = []
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                errors.append(f"{_name(obj)}: Kubernetes {version} schema: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                errors.append(f"{_name(obj)}: {e.message}")
    return errors


# -- lint ------------------------------------------------------------------------------------------------


def lint(objects: list[dict], adapter_rules: list[dict] | None = None) -> list[str]:
    """Problems in one rendered kustomization, one line each. ``adapter_rules``: the Prometheus adapter's
    rules, to check that the HPA's custom metric is one the adapter serves."""
    problems: list[str] = []
    by_kind: dict[str, list[dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    configmaps = {o["metadata"]["name"]: o for o in by_kind.get("ConfigMap", [])}
    deployments = by_kind.get("Deployment", [])

    for obj, pod in _pod_specs(objects):
        problems += _lint_pod(obj, pod, configmaps)
    for deployment in deployments:
        selector = deployment["spec"]["selector"].get("matchLabels", {})
        if not _selects(selector, deployment["spec"]["template"]["metadata"].get("labels", {})):
            problems.append(f"{_name(deployment)}: selector {selector} does not match its pod template's labels")
    pod_labels = [d["spec"]["template"]["metadata"].get("labels", {}) for d in deployments]
    for service in by_kind.get("Service", []):
        problems += _lint_service(service, deployments, pod_labels)
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not any(_selects(pdb["spec"]["selector"].get("matchLabels", {}), labels) for labels in pod_labels):
            problems.append(f"{_name(pdb)}: selector matches no Deployment's pods")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        problems += _lint_hpa(hpa, deployments, adapter_rules)
    for monitor in by_kind.get("ServiceMonitor", []):
        problems += _lint_service_monitor(monitor, by_kind.get("Service", []))
    for isvc in by_kind.get("InferenceService", []):
        problems += _lint_inference_service(isvc)
    for configmap in configmaps.values():
        if configmap["metadata"]["name"].startswith("nnserve-settings"):
            unknown = set(configmap.get("data", {})) - KNOWN_SETTINGS
            if unknown:
                problems.append(f"{_name(configmap)}: settings the server does not read: {sorted(unknown)}")
        if configmap["metadata"].get("labels", {}).get("grafana_dashboard"):
            problems += _lint_dashboard(configmap)
    return problems


def _lint_pod(obj: dict, pod: dict, configmaps: dict[str, dict]) -> list[str]:
    problems = []
    where = _name(obj)
    preStop_s = 0
    for container in pod.get("containers", []):
        c = f"{where} container {container['name']}"
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        if set(ports.values()) != {HTTP_PORT, GRPC_PORT}:
            problems.append(f"{c}: ports {sorted(ports.values())}, want HTTP {HTTP_PORT} and gRPC {GRPC_PORT}")
        for probe_name, want_path in PROBE_PATHS.items():
            probe = container.get(probe_name)
            if probe is None:
                problems.append(f"{c}: no {probe_name}")
                continue
            get = probe.get("httpGet", {})
            port = ports.get(get.get("port"), get.get("port"))
            if get.get("path") not in SERVED_PATHS:
                problems.append(f"{c}: {probe_name} path {get.get('path')!r} is not a path the server serves")
            elif get["path"] != want_path:
                problems.append(f"{c}: {probe_name} on {get['path']}, want {want_path}")
            if port != HTTP_PORT or port not in ports.values():
                problems.append(f"{c}: {probe_name} port {get.get('port')!r} is not the container's HTTP port")
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(resources.get(kind, {}))
            if missing:
                problems.append(f"{c}: no {kind} for {sorted(missing)}")
        threads = [e for e in container.get("env", []) if e["name"] == "NNSERVE_CPUS"]
        ref = threads[0].get("valueFrom", {}).get("resourceFieldRef", {}) if threads else {}
        if ref.get("resource") != "limits.cpu" or ref.get("containerName") != container["name"]:
            problems.append(f"{c}: NNSERVE_CPUS must come from its own limits.cpu (downward API)")
        for source in container.get("envFrom", []):
            name = source.get("configMapRef", {}).get("name")
            if name is not None and name not in configmaps:
                problems.append(f"{c}: envFrom names ConfigMap {name!r}, not among the rendered ones "
                                f"{sorted(configmaps)}")
        command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        if len(command) == 2 and command[0] == "sleep" and command[1].isdigit():
            preStop_s = max(preStop_s, int(command[1]))
        else:
            problems.append(f"{c}: no preStop sleep (endpoint removal must reach the load balancers first)")
        problems += _lint_token_files(c, container, pod)
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace < preStop_s + LONGEST_STREAM_S:
        problems.append(f"{where}: terminationGracePeriodSeconds {grace} < preStop {preStop_s} s + "
                        f"{LONGEST_STREAM_S} s for the longest stream")
    return problems


def _lint_token_files(c: str, container: dict, pod: dict) -> list[str]:
    """A token file (service/auth.py) must come from a Secret: a file each pod generated itself would differ
    between replicas. Mounted so the server accepts it: readable by nobody but the pod (a mode with no other
    bits, group read only through fsGroup, as a non-root server reads a root-owned Secret file)."""
    problems = []
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    security = pod.get("securityContext", {})
    for env in container.get("env", []):
        if env["name"] not in ("NNSERVE_MANAGEMENT_TOKEN_FILE", "NNSERVE_INFERENCE_TOKEN_FILE"):
            continue
        path = env.get("value", "")
        mounts = [m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
        if not mounts:
            problems.append(f"{c}: {env['name']}={path!r} is in no volume mounted in the container")
            continue
        secret = volumes.get(mounts[0]["name"], {}).get("secret")
        if secret is None:
            problems.append(f"{c}: {env['name']} must be in a volume from a Secret (one token for every replica), "
                            f"not {sorted(set(volumes.get(mounts[0]['name'], {})) - {'name'})}")
            continue
        mode = secret.get("defaultMode", 0o644)  # Kubernetes' default: readable by all
        if mode & 0o037:
            problems.append(f"{c}: {env['name']}'s Secret volume has defaultMode {mode:04o}: others could read the "
                            "token and the server refuses such a file; use 0400 or 0440")
        if security.get("runAsUser", 0) != 0 and "fsGroup" not in security:
            problems.append(f"{c}: a non-root pod reads {env['name']}'s root-owned Secret file only through "
                            "securityContext.fsGroup (and defaultMode 0440)")
    return problems


def _lint_service(service: dict, deployments: list[dict], pod_labels: list[dict]) -> list[str]:
    problems = []
    selector = service["spec"].get("selector", {})
    matched = [d for d, labels in zip(deployments, pod_labels, strict=True) if _selects(selector, labels)]
    if not matched:
        return [f"{_name(service)}: selector {selector} matches no Deployment's pods"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    want = {"http": (HTTP_PORT, "http"), "grpc": (GRPC_PORT, "kubernetes.io/h2c")}
    for name, (number, protocol) in want.items():
        port = ports.get(name)
        if port is None or port["port"] != number or port.get("appProtocol") != protocol:
            problems.append(f"{_name(service)}: want port {name} {number} with appProtocol {protocol}")
    container_ports = {p.get("name"): p["containerPort"]
                       for d in matched for c in d["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    for port in ports.values():
        target = port.get("targetPort", port["port"])
        if target not in container_ports and target not in container_ports.values():
            problems.append(f"{_name(service)}: targetPort {target!r} is no container port of its pods")
    return problems


def _lint_hpa(hpa: dict, deployments: list[dict], adapter_rules: list[dict] | None) -> list[str]:
    problems = []
    target = hpa["spec"]["scaleTargetRef"]
    if not any(d["metadata"]["name"] == target["name"] and target["kind"] == "Deployment" for d in deployments):
        problems.append(f"{_name(hpa)}: scaleTargetRef {target['kind']}/{target['name']} is not rendered here")
    metrics = hpa["spec"].get("metrics", [])
    pods_metrics = [m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"]
    if not pods_metrics:
        problems.append(f"{_name(hpa)}: no per-pod serving metric")
    exported = exported_metrics()
    served = {rule["name"]["as"] for rule in adapter_rules or []} if adapter_rules is not None else None
    for name in pods_metrics:
        if name not in exported:
            problems.append(f"{_name(hpa)}: metric {name!r} is not one the server exports ({sorted(exported)})")
        if served is not None and name not in served:
            problems.append(f"{_name(hpa)}: metric {name!r} is served by no Prometheus adapter rule")
    if not any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics):
        problems.append(f"{_name(hpa)}: no CPU metric as the fallback")
    return problems


def _lint_service_monitor(monitor: dict, services: list[dict]) -> list[str]:
    """Structure (no schema for the CRD here) and references of a Prometheus Operator ServiceMonitor."""
    problems = _require(monitor, "monitoring.coreos.com/v1", ["spec.selector.matchLabels", "spec.endpoints"])
    if problems:
        return problems
    selector = monitor["spec"]["selector"]["matchLabels"]
    matched = [s for s in services if _selects(selector, s["metadata"].get("labels", {}))]
    if not matched:
        return [f"{_name(monitor)}: selector {selector} matches no Service's labels"]
    port_names = {p["name"] for s in matched for p in s["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        if endpoint.get("port") not in port_names:
            problems.append(f"{_name(monitor)}: endpoint port {endpoint.get('port')!r} not in {sorted(port_names)}")
        if endpoint.get("path") != "/metrics" or "/metrics" not in SERVED_PATHS:
            problems.append(f"{_name(monitor)}: endpoint path {endpoint.get('path')!r}, want /metrics")
    return problems


def _lint_inference_service(isvc: dict) -> list[str]:
    """Structure of a KServe v1beta1 InferenceService with a custom predictor container."""
    problems = _require(isvc, "serving.kserve.io/v1beta1", ["spec.predictor.containers"])
    if problems:
        return problems
    containers = isvc["spec"]["predictor"]["containers"]
    if [c["name"] for c in containers] != ["kserve-container"]:
        problems.append(f"{_name(isvc)}: a custom predictor is one container named kserve-container")
    for container in containers:
        names = {p.get("name") for p in container.get("ports", [])}
        if not names <= {"http1", "h2c"}:
            problems.append(f"{_name(isvc)}: KServe port names are http1 (REST) and h2c (gRPC), not {names}")
    return problems


def _lint_dashboard(configmap: dict) -> list[str]:
    """The dashboard ConfigMap carries docs/grafana-dashboard.json as it is, parseable."""
    dashboard = (REPO_ROOT / "docs" / "grafana-dashboard.json").read_text()
    values = list(configmap.get("data", {}).values())
    if values != [dashboard]:
        return [f"{_name(configmap)}: data is not docs/grafana-dashboard.json"]
    json.loads(values[0])
    return []


# -- helpers ---------------------------------------------------------------------------------------------


def _pod_specs(objects: list[dict]) -> Iterator[tuple[dict, dict]]:
    """(object, pod spec) for every object that runs pods here: Deployments and KServe predictors."""
    for obj in objects:
        if obj["kind"] == "Deployment":
            yield obj, obj["spec"]["template"]["spec"]
        elif obj["kind"] == "InferenceService":
            yield obj, obj["spec"]["predictor"]


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _require(obj: dict, api_version: str, paths: list[str]) -> list[str]:
    problems = []
    if obj.get("apiVersion") != api_version:
        problems.append(f"{_name(obj)}: apiVersion {obj.get('apiVersion')}, want {api_version}")
    for path in paths:
        node: Any = obj
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if not node:
            problems.append(f"{_name(obj)}: {path} missing or empty")
    return problems


def _name(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def adapter_rules(rendered: dict[str, list[dict]]) -> list[dict]:
    """The rules in the rendered prometheus-adapter ConfigMap."""
    (configmap,) = rendered["prometheus-adapter"]
    return yaml.safe_load(configmap["data"]["config.yaml"])["rules"]


def validate() -> list[str]:
    """Every problem in every target: schemas, then lint."""
    rendered = render_all()
    rules = adapter_rules(rendered)
    problems = []
    for target, objects in rendered.items():
        problems += [f"{target}: {p}" for p in schema_errors(objects) + lint(objects, rules)]
    return problems


def main() -> int:
    rendered = render_all()
    problems = validate()
    for target, objects in rendered.items():
        print(f"{target}: {len(objects)} objects ({', '.join(sorted(o['kind'] for o in objects))})")
    print(f"schemas: Kubernetes {', '.join(KUBERNETES_VERSIONS)} (kubernetes-validate, strict); "
          f"CRDs {', '.join(sorted(CRD_KINDS))}: structural lint")
    for problem in problems:
        print("PROBLEM", problem)
    print("ok" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
