"""deploy/k8s, offline: every kustomization renders (deploy/render.py, equal to ``kubectl kustomize`` where
one is installed), every object passes the Kubernetes schemas (kubernetes-validate) and the lint, and the
lint catches the mistakes it is there for."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess

import pytest
import yaml

from deploy import render as renderer
from deploy import validate as v


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return v.render_all()


def _one(objects: list[dict], kind: str) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


def _key(obj: dict) -> tuple:
    return obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]


def test_every_target_passes_schemas_and_lint():
    assert v.validate() == []


def test_the_targets_hold_what_the_issue_asks_for(rendered):
    kinds = sorted(o["kind"] for o in rendered["overlays/cpu"])
    assert kinds == ["ConfigMap", "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                     "Service", "ServiceMonitor"]
    assert sorted(o["kind"] for o in rendered["overlays/gpu"]) == kinds
    assert sorted(o["kind"] for o in rendered["kserve"]) == ["ConfigMap", "InferenceService"]
    cpu, gpu = _one(rendered["overlays/cpu"], "Deployment"), _one(rendered["overlays/gpu"], "Deployment")
    assert cpu["spec"]["template"]["spec"]["containers"][0]["image"] == "nnserve:latest"
    gpu_container = gpu["spec"]["template"]["spec"]["containers"][0]
    assert gpu_container["image"] == "nnserve-gpu:latest"
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert all(o["metadata"]["namespace"] == "nnserve" for o in rendered["overlays/cpu"])


def test_every_pod_reads_the_management_token_from_one_secret(rendered):
    """One Secret for every replica (a token each pod generated would differ), mounted 0440 for the non-root
    server through fsGroup: what service/auth.py accepts (a root-owned, group-readable file)."""
    isvc = _one(rendered["kserve"], "InferenceService")["spec"]["predictor"]
    pods = [_pod(_one(rendered[t], "Deployment")) for t in ("overlays/cpu", "overlays/gpu")] + [isvc]
    for pod in pods:
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "management-token"]
        assert env["NNSERVE_MANAGEMENT_TOKEN_FILE"].startswith(mount["mountPath"] + "/") and mount["readOnly"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "management-token"]
        assert volume["secret"] == {"secretName": "nnserve-management-token", "defaultMode": 0o440}
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"] == 1034
        assert "NNSERVE_INFERENCE_TOKEN_FILE" not in env  # inference stays open by default
    gpu = _pod(_one(rendered["overlays/gpu"], "Deployment"))
    assert {v["name"] for v in gpu["volumes"]} == {"management-token", "tensorrt-cache"}  # appended, not replaced


def test_settings_configmap_is_hashed_and_referenced(rendered):
    """A changed setting must roll the pods: the ConfigMap's name carries a content hash, and the
    Deployment (and the KServe predictor, a CRD kustomize needs told about) name that exact ConfigMap."""
    for target in ("overlays/cpu", "overlays/gpu", "kserve"):
        names = [o["metadata"]["name"] for o in rendered[target] if o["metadata"]["name"].startswith("nnserve-sett")]
        (name,) = names
        assert len(name) == len("nnserve-settings-") + 10
        text = yaml.safe_dump(rendered[target])
        assert text.count(name) == 2, target  # the ConfigMap and the one reference
    cpu = _one([o for o in rendered["overlays/cpu"] if "settings" in o["metadata"]["name"]], "ConfigMap")
    gpu = _one([o for o in rendered["overlays/gpu"] if "settings" in o["metadata"]["name"]], "ConfigMap")
    assert gpu["data"]["NNSERVE_WORKERS"] == cpu["data"]["NNSERVE_WORKERS"]  # merged, not replaced
    assert "NNSERVE_PROVIDERS" in gpu["data"] and "NNSERVE_PROVIDERS" not in cpu["data"]


def test_dashboard_configmap_is_generated_from_the_docs_file(rendered):
    dashboard = [o for o in rendered["overlays/cpu"] if o["metadata"].get("labels", {}).get("grafana_dashboard")]
    assert [o["data"]["nnserve.json"] for o in dashboard] == [(v.REPO_ROOT / "docs" / "grafana-dashboard.json")
                                                              .read_text()]


def test_configmap_hash_is_kustomizes():
    # `kubectl kustomize` (kustomize v5.5.0) names this generator's output demo-kh7f5d858d; the value has
    # the characters Go's JSON encoder escapes.
    assert renderer.configmap_hash({"kind": "ConfigMap", "data": {"A": "1", "B": "<x&y>"}}) == "kh7f5d858d"


def kustomize_major() -> int | None:
    """The major version of the kustomize inside ``kubectl`` (None: no kubectl, or it does not say)."""
    if shutil.which("kubectl") is None:
        return None
    out = subprocess.run(["kubectl", "version", "--client"], capture_output=True, text=True, timeout=30).stdout
    found = re.search(r"Kustomize Version: v(\d+)", out)
    return int(found.group(1)) if found else None


# Debian 12's kubernetes-client (kubectl 1.20.2) embeds kustomize v2.0.3, which cannot load these
# kustomizations ("'../../base' must be a file"): comparing with it would test kustomize's age, not ours.
@pytest.mark.skipif((kustomize_major() or 0) < 5, reason="needs kubectl with kustomize v5+ on PATH (not installed, "
                    "or too old: Debian 12's kubernetes-client 1.20 has kustomize v2.0.3)")
@pytest.mark.parametrize("target", v.TARGETS)
def test_render_equals_kubectl_kustomize(target):
    real = subprocess.run(["kubectl", "kustomize", str(v.K8S / target)], capture_output=True, text=True,
                          timeout=60)
    assert real.returncode == 0, real.stderr
    theirs = {_key(o): o for o in yaml.safe_load_all(real.stdout) if o}
    ours = {_key(o): o for o in renderer.render(v.K8S / target)}
    assert ours == theirs


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("namePrefix: x-\n")
    with pytest.raises(renderer.UnsupportedError):
        renderer.render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("configMapGenerator:\n- name: a\n  files:\n  - ../outside\n")
    with pytest.raises(renderer.UnsupportedError, match="not in or below"):
        renderer.render(tmp_path)


# -- the lint catches the mistakes that bite ---------------------------------------------------------------


def _broken(rendered, target: str, kind: str, change) -> list[str]:
    objects = copy.deepcopy(rendered[target])
    change(_one(objects, kind))
    return v.lint(objects, v.adapter_rules(rendered))


def _container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


@pytest.mark.parametrize(("kind", "change", "message"), [
    ("Deployment", lambda d: _container(d)["readinessProbe"]["httpGet"].update(path="/healthz"),
     "not a path the server serves"),
    ("Deployment", lambda d: _container(d)["livenessProbe"]["httpGet"].update(path="/readyz"), "want /livez"),
    ("Deployment", lambda d: _container(d)["startupProbe"]["httpGet"].update(port=8080), "HTTP port"),
    ("Deployment", lambda d: _container(d)["readinessProbe"]["httpGet"].update(port="grpc"), "HTTP port"),
    ("Deployment", lambda d: _container(d)["resources"].pop("limits"), "no limits"),
    ("Deployment", lambda d: _container(d)["env"].clear(), "NNSERVE_CPUS"),
    ("Deployment", lambda d: _container(d)["envFrom"][0]["configMapRef"].update(name="nnserve-settings"),
     "not among the rendered"),
    ("Deployment", lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=30),
     "terminationGracePeriodSeconds"),
    ("Deployment", lambda d: _container(d).pop("lifecycle"), "no preStop"),
    ("Deployment", lambda d: d["spec"]["selector"]["matchLabels"].update(app="other"), "does not match"),
    ("Service", lambda s: s["spec"]["selector"].update({"app.kubernetes.io/name": "nnserv"}), "matches no"),
    ("Service", lambda s: s["spec"]["ports"][1].pop("appProtocol"), "appProtocol"),
    ("Service", lambda s: s["spec"]["ports"][0].update(targetPort="web"), "targetPort"),
    ("PodDisruptionBudget", lambda p: p["spec"]["selector"]["matchLabels"].update(tier="x"), "matches no"),
    ("HorizontalPodAutoscaler", lambda h: h["spec"]["metrics"][0]["pods"]["metric"].update(name="in_flight"),
     "not one the server exports"),
    ("HorizontalPodAutoscaler", lambda h: h["spec"]["metrics"].pop(1), "fallback"),
    ("HorizontalPodAutoscaler", lambda h: h["spec"]["scaleTargetRef"].update(name="nnserve-v2"), "not rendered"),
    ("ServiceMonitor", lambda m: m["spec"]["endpoints"][0].update(port="metrics"), "endpoint port"),
    ("ServiceMonitor", lambda m: m["spec"]["endpoints"][0].update(path="/prometheus"), "want /metrics"),
    ("ServiceMonitor", lambda m: m.update(apiVersion="monitoring.coreos.com/v1beta1"), "apiVersion"),
    # the management token: from a Secret, mounted where the variable points, unreadable by others
    ("Deployment", lambda d: _pod(d)["volumes"].__setitem__(0, {"name": "management-token", "emptyDir": {}}),
     "from a Secret"),
    ("Deployment", lambda d: _pod(d)["volumes"][0]["secret"].update(defaultMode=0o444), "others could read"),
    ("Deployment", lambda d: _pod(d)["volumes"][0]["secret"].pop("defaultMode"), "others could read"),
    ("Deployment", lambda d: _pod(d)["securityContext"].pop("fsGroup"), "fsGroup"),
    ("Deployment", lambda d: _container(d)["volumeMounts"].clear(), "no volume mounted"),
])
def test_lint_catches(rendered, kind, change, message):
    problems = _broken(rendered, "overlays/cpu", kind, change)
    assert any(message in p for p in problems), problems


def test_lint_catches_a_metric_the_adapter_does_not_serve(rendered):
    rules = copy.deepcopy(v.adapter_rules(rendered))
    rules[0]["name"]["as"] = "nnserve_in_flight"
    assert any("no Prometheus adapter rule" in p for p in v.lint(rendered["overlays/cpu"], rules))


def test_lint_catches_inference_service_mistakes(rendered):
    def change(isvc):
        isvc["spec"]["predictor"]["containers"][0]["name"] = "nnserve"
        isvc["spec"]["predictor"]["containers"][0]["ports"][1]["name"] = "grpc"
    problems = _broken(rendered, "kserve", "InferenceService", change)
    assert any("kserve-container" in p for p in problems) and any("h2c" in p for p in problems), problems


def test_lint_catches_an_unknown_setting(rendered):
    objects = copy.deepcopy(rendered["overlays/cpu"])
    settings = [o for o in objects if o["metadata"]["name"].startswith("nnserve-settings")][0]
    settings["data"]["NNSERVE_MAX_BATCHSIZE"] = "8"
    assert any("NNSERVE_MAX_BATCHSIZE" in p for p in v.lint(objects))


def test_schema_validation_catches_a_wrong_field(rendered):
    deployment = copy.deepcopy(_one(rendered["overlays/cpu"], "Deployment"))
    _container(deployment)["ports"][0]["containerPort"] = "3000"
    assert v.schema_errors([deployment], ("1.37.0",))
    hpa = copy.deepcopy(_one(rendered["overlays/cpu"], "HorizontalPodAutoscaler"))
    hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] = {"value": 8}
    assert v.schema_errors([hpa], ("1.37.0",))


def test_hpa_metric_is_the_servers_gauge(rendered):
    hpa = _one(rendered["overlays/cpu"], "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "nnserve_in_flight_requests"
    assert "nnserve_in_flight_requests" in v.exported_metrics()
