"""The PNGs next to docs/bench.md (docs/img/bench-*.png), each written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from loadtest.bench.common import write_atomic
from loadtest.bench.inprocess import BATCHES, IMAGE_MODELS, Case
from loadtest.bench.stacks import StackRun
from loadtest.bench.targets import find


def plot(cases: list[Case], runs: list[StackRun], labels: dict[str, str], generate: list[dict],
         img_dir: Path) -> list[str]:
    """Write the PNGs (only for the parts that ran); returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name: str) -> str:
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        write_atomic(img_dir / name, buffer.getvalue())
        return name

    written = []
    if cases:
        fig, axes = plt.subplots(1, len(IMAGE_MODELS), figsize=(11, 4))
        for ax, name in zip(np.atleast_1d(axes), IMAGE_MODELS, strict=True):
            variants = list(dict.fromkeys(c.variant for c in cases if c.model == name))
            for i, batch in enumerate(BATCHES):
                medians = [next(c.median_ms for c in cases if (c.model, c.variant, c.batch) == (name, v, batch))
                           for v in variants]
                ax.bar(np.arange(len(variants)) + 0.4 * i - 0.2, medians, 0.4, label=f"batch {batch}")
            ax.set_xticks(np.arange(len(variants)), variants, rotation=25, ha="right", fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel("median latency per call (ms, log)")
            ax.set_title(f"{name}, CPU, in process")
            ax.legend()
        written.append(save(fig, "bench-ort.png"))
    if runs:
        endpoints = list(dict.fromkeys(r.endpoint for r in runs))
        fig, axes = plt.subplots(2, len(endpoints), figsize=(5 * len(endpoints), 8), squeeze=False)
        for col, endpoint in enumerate(endpoints):
            mine = [r for r in runs if r.endpoint == endpoint]
            servers = list(dict.fromkeys(r.server for r in mine))
            levels = sorted({r.result.connections for r in mine})
            width = 0.8 / len(levels)
            for i, c in enumerate(levels):
                # medians over the rounds, whiskers min-max (targets.find: the sweep's rows left out)
                rows = [find(runs, s, endpoint, c) for s in servers]
                x = np.arange(len(servers)) + width * (i - (len(levels) - 1) / 2)
                rps = [r.rps if r else 0 for r in rows]
                spread = np.array([[r.rps - min(r.ok_rps), max(r.ok_rps) - r.rps] if r else [0, 0] for r in rows]).T
                axes[0, col].bar(x, rps, width, yerr=spread, capsize=3, label=f"{c} client(s), 2xx")
                axes[1, col].bar(x, [r.p50 if r else 0 for r in rows], width, label=f"p50, {c} client(s)")
                axes[1, col].scatter(x, [r.p95 if r else np.nan for r in rows], marker="_", s=200, color="k",
                                     zorder=3, label="p95" if i == 0 else None)
            names = [labels.get(s, s) for s in servers]
            for row, ylabel in ((0, "requests/s"), (1, "latency (ms)")):
                axes[row, col].set_xticks(np.arange(len(servers)), names, rotation=20, ha="right", fontsize=8)
                axes[row, col].set_ylabel(ylabel)
                axes[row, col].legend(fontsize=8)
            axes[0, col].set_title(f"{endpoint}: throughput")
            axes[1, col].set_title(f"{endpoint}: latency")
        written.append(save(fig, "bench-stacks.png"))
    if generate:
        stream_labels = [f"{r['streams']} stream{'s' if r['streams'] > 1 else ''}" for r in generate]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        left.bar(stream_labels, [r["chars_per_s"] for r in generate])
        left.set_ylabel("characters/s (all streams)")
        left.set_title("/generate throughput")
        positions = np.arange(len(generate))
        right.bar(positions - 0.2, [r["first_p50"] for r in generate], 0.4, label="first char p50")
        right.bar(positions + 0.2, [r["full_p50"] for r in generate], 0.4, label="full stream p50")
        right.set_xticks(positions, stream_labels)
        right.set_ylabel("ms")
        right.set_title("/generate latency per stream")
        right.legend()
        written.append(save(fig, "bench-generate.png"))
    return written
