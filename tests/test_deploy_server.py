"""The manifests against the running server: every path a probe or the ServiceMonitor uses answers 200, the
lint's list of served paths is true, and the HPA's metric is in /metrics under the name the HPA asks for."""

from __future__ import annotations

import pytest
import requests

from deploy import validate as v

pytestmark = pytest.mark.integration


def _used_paths() -> set[str]:
    paths = set()
    for objects in v.render_all().values():
        for obj in objects:
            for _, pod in v._pod_specs([obj]):
                for container in pod["containers"]:
                    paths |= {container[p]["httpGet"]["path"] for p in v.PROBE_PATHS if p in container}
            if obj["kind"] == "ServiceMonitor":
                paths |= {e["path"] for e in obj["spec"]["endpoints"]}
    return paths


def test_probe_and_scrape_paths_are_served(live_server):
    used = _used_paths()
    assert used == {"/livez", "/readyz", "/metrics"}
    for path in sorted(v.SERVED_PATHS):
        response = requests.get(live_server.http_url + path, timeout=10)
        assert response.status_code == 200, (path, response.status_code, response.text[:200])


def test_hpa_metric_is_exported_under_its_name(live_server):
    from deploy.cluster import png_digit

    # The gauge's series appear once a request has run

    requests.post(live_server.http_url + "/classify", files={"image": ("d.png", png_digit(), "image/png")},
                  timeout=30).raise_for_status()
    text = requests.get(live_server.http_url + "/metrics", timeout=10).text
    hpa = [o for o in v.render_all()["overlays/cpu"] if o["kind"] == "HorizontalPodAutoscaler"][0]
    name = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert f"\n{name}{{" in text, name
    rule = v.adapter_rules(v.render_all())[0]
    assert rule["seriesQuery"].startswith(name + "{")
