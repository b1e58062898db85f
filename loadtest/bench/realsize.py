"""Part 10 (issue 26): real-size models, nnserve beside every peer at its best, in interleaved rounds.

For vgg_fc7 (``/features``, the fc7 vector as .npy) and the user model EfficientNet-B0 224x224 (``/classify``,
top 5; the store entry the user-model part made, or ``--user-model-tag``), each on its own:

- nnserve serving only that model (its own models.yaml: the tag, nothing else; batching as configured:
  its defaults or ``--server-env``), on the image route and on KServe v2 in Triton's binary extension
  (the model's input tensor, preprocessed as nnserve does it, the same bytes tritonclient.http sends);
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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.bench.common import log
from loadtest.bench.compare import Comparison, compare
from loadtest.bench.stacks import CLASSIFY, FEATURES, NNSERVE, v2_binary
from loadtest.bench.wrk import RequestFiles, write_v2_binary

MODELS = {"vgg_fc7": FEATURES, "effnet_b0": CLASSIFY}  # store name -> its image route in this part
PEERS = ("fastapi", "litserve", "bentoml", "triton")
IMAGE_PEERS = ("fastapi", "litserve", "bentoml")  # the peers on the image route (Triton takes tensors)


@dataclass
class RealSizeResult:
    model: str
    tag: str
    endpoint: str  # the image route (/features or /classify)
    png_bytes: int
    comparison: Comparison = field(default_factory=Comparison)


def routes(name: str, endpoint: str, peers: list[str]) -> dict[str, tuple[str, ...]]:
    """Each server's endpoints on ``name``: nnserve both, Triton the binary v2 one, the others the image one."""
    found: dict[str, tuple[str, ...]] = {NNSERVE: (endpoint, v2_binary(name))}
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
        config = write_models_config(folder / "models.yaml", name, tag)
        log(f"real size: {tag} on {endpoint} and {v2_binary(name)}: nnserve and {', '.join(peers)}, "
            f"{args.real_size_rounds} rounds")
        result = RealSizeResult(name, tag, endpoint, files.png.stat().st_size)
        result.comparison = compare(peers, files, args.real_size_connections, args.duration, args.sweep_duration,
                                    args.real_size_rounds, folder, peer_env(name, tag, endpoint, tags["lenet5"]),
                                    {**env, "NNSERVE_MODELS_CONFIG": str(config)},
                                    routes=routes(name, endpoint, peers), model=name)
        results.append(result)
    return results


def real_size_tags(r_tags: dict[str, str], user_tag: str | None) -> dict[str, Any]:
    """lenet5 and vgg_fc7 as nnserve served them (else the store's latest), effnet_b0 the user-model entry."""
    import bentoml

    tags = {name: r_tags.get(name) or str(bentoml.models.get(f"{name}:latest").tag) for name in ("lenet5", "vgg_fc7")}
    if user_tag:
        tags[user_tag.split(":")[0]] = user_tag
    return tags
