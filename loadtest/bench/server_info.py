"""What the nnserve server under test says about itself (models, settings) and its processes' memory."""

from __future__ import annotations

import json
import urllib.request


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def served_models(url: str) -> tuple[list[str], dict[str, str]]:
    """("name = store_tag (provider)" lines, {name: store_tag}) from ``GET /models``."""
    models = get_json(url + "/models")["models"]
    lines = [f"{m['name']} = {m.get('store_tag')} ({m.get('provider')})" for m in models]
    return lines, {m["name"]: m["store_tag"] for m in models if m.get("store_tag")}


def server_settings(url: str, env: dict[str, str]) -> dict[str, str]:
    """The settings the server reports in ``GET /models`` (lenet5's batching: the model every wrk row and
    the overload run load), and the NNSERVE_* variables the bench passed it."""
    listing = get_json(url + "/models")
    reported = {k: json.dumps(v) for k, v in listing.items() if k != "models"}
    for model in listing.get("models", []):
        if model.get("name") == "lenet5" and "batching" in model:
            reported["lenet5 batching"] = json.dumps(model["batching"])
    return {**reported, **{k: v for k, v in env.items() if k.startswith("NNSERVE_")}}


def server_memory(server) -> list[tuple[str, float]]:
    """Resident memory (MiB) of each process of the running server: the arbiter and one per service worker."""
    import psutil

    found = []
    root = psutil.Process(server.process.pid)
    for proc in [root, *root.children(recursive=True)]:
        cmdline = proc.cmdline()
        role = (cmdline[cmdline.index("--service-name") + 1] if "--service-name" in cmdline
                else "arbiter (bentoml serve)")
        found.append((role, proc.memory_info().rss / 2**20))
    return found
