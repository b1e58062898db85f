"""Part 10 (issue 26): real-size models, nnserve beside every peer at its best, in interleaved rounds.

For vgg_fc7 (``/features``, the fc7 vector as .npy) and the user model EfficientNet-B0 224x224 (``/classify``,
top 5; the store entry the user-model part made, or ``--user-model-tag``), each on its own:

- first the tuner (``python -m loadtest.tune``, loadtest/tune/) on that model's image route with the same PNG
  at the same concurrencies: its best fp32 configuration is "nnserve" in the rounds (workers, instances,
  threads, batching; its own models.yaml serving only that model), on the image route and on KServe v2 in
  Triton's binary extension (the model's input tensor, preprocessed as nnserve does it, the same bytes
  tritonclient.http sends); where the tuner's overall pick serves the gated INT8 variant, that pick is one
  more server, "nnserve-int8", on the image route;
- the peers on the same store entry, each swept over its grid (``launch.grid``): plain FastAPI + ORT
  (workers 1/2 x ORT threads 1/2), LitServe (batching off / on, two waits), BentoML (adaptive batching
  off / on), all on the image route with their batching where they have it; Triton Inference Server
  (dynamic batching off / max_queue_delay 0, 1, 5 ms x 1-2 instances) on the binary v2 route;
- then ``--real-size-rounds`` (at least 5 for the record) interleaved rounds of nnserve and each peer's
  best configurations, each server alone (compare.compare), at ``--real-size-connections`` (1, 4, 32).

Targets (targets.real_size_targets, targets.triton_peer_targets) pair nnserve with each peer round by round
and judge the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.bench.common import REPO_ROOT, log
from loadtest.bench.compare import Comparison, Nnserve, compare
from loadtest.bench.stacks import CLASSIFY, FEATURES, NNSERVE, v2_binary
from loadtest.bench.wrk import RequestFiles, write_v2_binary

MODELS = {"vgg_fc7": FEATURES, "effnet_b0": CLASSIFY}  # store name -> its image route in this part
PEERS = ("fastapi", "litserve", "bentoml", "triton")
IMAGE_PEERS = ("fastapi", "litserve", "bentoml")  # the peers on the image route (Triton takes tensors)
NNSERVE_INT8 = "nnserve-int8"  # the tuner's pick where it serves the gated INT8 variant


@dataclass
class Tuned:
    """What the tuner found for one model (its results.json): the best fp32 configuration and the best of
    any variant (point + the runs it measured), the INT8 gate, its table and plot."""

    summary: dict[str, Any]
    out: Path  # the tuner's folder: table.md, pareto.png, results.json (gone with the bench's temp folder)
    exit_code: int
    table: str = ""  # its table.md

    @property
    def best_fp32(self) -> dict | None:
        return self.summary.get("best_fp32")

    @property
    def chosen(self) -> dict | None:
        return self.summary.get("chosen")

    def int8_pick(self) -> dict | None:
        """The pick with INT8 allowed, where it is INT8 (otherwise the fp32 server is that pick too)."""
        chosen = self.chosen
        return chosen if chosen and chosen["point"]["variant"] == "int8" else None

    def int8_note(self) -> str:
        """The INT8 variant's gate (accuracy drop) or why the tuner could not try it."""
        return self.summary.get("variant_gates", {}).get("int8") or \
            f"not tried: {self.summary.get('excluded_variants', {}).get('int8', 'unknown')}"

    def measured(self, pick: dict) -> dict[int, float]:
        """concurrency -> the goodput the tuner measured for ``pick``."""
        return {run["concurrency"]: run["goodput"] for run in pick["runs"]}


def tune(name: str, endpoint: str, png: Path, levels: list[int], seconds: float, folder: Path) -> Tuned:
    """``python -m loadtest.tune`` on ``name``'s ``endpoint`` with the bench's PNG at its levels, no p95 budget
    (the best geometric-mean goodput wins), its progress on the bench's output; nothing written outside
    ``folder``."""
    out = folder / "tune"
    cmd = [sys.executable, "-m", "loadtest.tune", name, "--route", endpoint.strip("/"), "--image", str(png),
           "--concurrency", ",".join(map(str, levels)), "--seconds", f"{seconds:g}", "--out", str(out),
           "--models-config", str(folder / "tuned-models.yaml")]
    log(f"real size: tuning {name} on {endpoint}: {' '.join(cmd[1:])}")
    code = subprocess.run(cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL).returncode
    results = out / "results.json"
    summary = json.loads(results.read_text()) if results.exists() else {}
    table = out / "table.md"
    return Tuned(summary, out, code, table.read_text() if table.exists() else "")


def tuned_server(pick: dict, name: str, tag: str, folder: Path, label: str) -> Nnserve:
    """nnserve serving ``pick`` (a tuner point) with its worker count; an fp32 entry pinned to the bench's
    ``tag`` (an INT8 one names the store name: the server takes the variant's latest version, as the tuner)."""
    from loadtest.tune.sweep import Point

    point = Point(**pick["point"])
    entry = {**point.entry(name), **({"tag": tag} if point.variant == "fp32" else {})}
    config = folder / f"models-{label}.yaml"
    config.write_text(json.dumps({"models": {name: entry}}, indent=2) + "\n")
    return Nnserve({"NNSERVE_MODELS_CONFIG": str(config), "NNSERVE_WORKERS": str(point.workers)},
                   f"tuned: {point.describe()}")


@dataclass
class RealSizeResult:
    model: str
    tag: str
    endpoint: str  # the image route (/features or /classify)
    png_bytes: int
    comparison: Comparison = field(default_factory=Comparison)
    tuned: Tuned | None = None
    tuner_plot: str = ""  # the tuner's pareto.png, relative to bench.md (copied by save_tuner_plot)

    def save_tuner_plot(self, out: Path) -> None:
        """Copy the tuner's plot next to the bench's (``out``/img), where bench.md links it."""
        import shutil

        source = self.tuned.out / "pareto.png" if self.tuned else None
        if source is not None and source.exists():
            (out / "img").mkdir(parents=True, exist_ok=True)
            name = f"img/tune-{self.model}.png"
            shutil.copyfile(source, out / name)
            self.tuner_plot = name


def routes(name: str, endpoint: str, peers: list[str]) -> dict[str, tuple[str, ...]]:
    """Each server's endpoints on ``name``: nnserve both, its INT8 pick, Triton the binary v2 one, the others
    the image one."""
    found: dict[str, tuple[str, ...]] = {NNSERVE: (endpoint, v2_binary(name)), NNSERVE_INT8: (endpoint,)}
    found.update({peer: (v2_binary(name),) if peer == "triton" else (endpoint,) for peer in peers})
    return found


def peer_env(name: str, tag: str, endpoint: str, lenet5_tag: str) -> dict[str, str]:
    """The peers' environment: ``name`` on ``endpoint`` (/classify serves lenet5 when ``name`` is on
    /features: every peer needs a /classify model), pinned to ``tag``, and Triton serving it."""
    from loadtest.baselines.common import tag_variable

    env = {"BENTOML_HOME": os.environ.get("BENTOML_HOME", str(Path.home() / "bentoml")),
           tag_variable(name): tag, tag_variable("lenet5"): lenet5_tag, "BASELINE_TRITON_MODELS": name}
    if endpoint == FEATURES:
        env.update(BASELINE_CLASSIFY_MODEL="lenet5", BASELINE_FEATURES_MODEL=name)
    else:
        env.update(BASELINE_CLASSIFY_MODEL=name, BASELINE_FEATURES_MODEL="")
    return env


def request_files(workdir: Path, name: str, tag: str, endpoint: str) -> RequestFiles:
    """A held-out digit as a PNG the size a client of the model uploads (RGB and upscaled for a 3-channel
    model, as the user-model part sends), and the same image preprocessed by nnserve's code as a binary v2
    body asking for the route's output (features or scores)."""
    from harness.data import held_out_digits, png_bytes
    from loadtest.baselines.common import StoreModel, output_name
    from loadtest.bench.user_model import upscaled_png

    model = StoreModel.load(name, 1, tag=tag)
    digits, labels = held_out_digits()
    channels, size = model.input_shape[0], model.input_shape[-1]
    png = workdir / f"{name}-digit.png"
    png.write_bytes(upscaled_png(digits[0], size) if channels == 3 else png_bytes(digits[0]))
    files = RequestFiles(png, str(labels[0]), classify_fields={"model": name})
    role, default = ("features", "fc7") if endpoint == FEATURES else ("scores", "logits")
    write_v2_binary(files, model.decode(png.read_bytes())[None], model.input_name,
                    output_name(model, role, default), workdir / f"{name}-v2.bin")
    return files


def bench_real_size(args: argparse.Namespace, env: dict[str, str], workdir: Path, tags: dict[str, str]) -> \
        list[RealSizeResult]:
    """Every model of ``tags`` (store name -> tag) that MODELS names, one after the other."""
    from loadtest.bench.user_model import write_models_config

    peers = [p for p in args.real_size_peers if p in PEERS]
    results = []
    for name, endpoint in MODELS.items():
        if name not in tags:
            continue
        tag, folder = tags[name], workdir / f"real-size-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        files = request_files(folder, name, tag, endpoint)
        result = RealSizeResult(name, tag, endpoint, files.png.stat().st_size)
        result.tuned = tune(name, endpoint, files.png, args.real_size_connections, args.sweep_duration, folder)
        servers = {}
        if result.tuned.best_fp32:
            servers[NNSERVE] = tuned_server(result.tuned.best_fp32, name, tag, folder, NNSERVE)
        else:  # reported in the section: the tuner's exit status and log
            log(f"real size: the tuner chose no fp32 configuration (exit {result.tuned.exit_code}): nnserve's "
                "defaults run instead")
            config = write_models_config(folder / "models.yaml", name, tag)
            servers[NNSERVE] = Nnserve({"NNSERVE_MODELS_CONFIG": str(config)},
                                       "defaults (the tuner chose no configuration)")
        if (int8 := result.tuned.int8_pick()) is not None:
            servers[NNSERVE_INT8] = tuned_server(int8, name, tag, folder, NNSERVE_INT8)
        log(f"real size: {tag} on {endpoint} and {v2_binary(name)}: {', '.join(servers)} and {', '.join(peers)}, "
            f"{args.real_size_rounds} rounds")
        result.comparison = compare(peers, files, args.real_size_connections, args.duration, args.sweep_duration,
                                    args.real_size_rounds, folder, peer_env(name, tag, endpoint, tags["lenet5"]),
                                    env, routes=routes(name, endpoint, peers), model=name, servers=servers)
        result.save_tuner_plot(args.out)
        results.append(result)
    return results


def real_size_tags(r_tags: dict[str, str], user_tag: str | None) -> dict[str, Any]:
    """lenet5 and vgg_fc7 as nnserve served them (else the store's latest), effnet_b0 the user-model entry."""
    import bentoml

    tags = {name: r_tags.get(name) or str(bentoml.models.get(f"{name}:latest").tag) for name in ("lenet5", "vgg_fc7")}
    if user_tag:
        tags[user_tag.split(":")[0]] = user_tag
    return tags
