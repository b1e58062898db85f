"""What the tuner shows and writes: the table, the throughput-vs-p95 plot with each concurrency's Pareto
front, every measurement as JSON, and the chosen models config entry (atomically)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from loadtest.bench.common import fmt, write_atomic
from loadtest.tune.sweep import Point, Result, score
from service.settings import SettingsError, read_models_document


def table(results: list[Result], budget_ms: float | None, chosen: Result | None) -> str:
    """Markdown: one row per configuration (best first), goodput and p50/p95 per concurrency."""
    concurrencies = sorted({r.concurrency for result in results for r in result.runs})
    head = ["", "workers", "instances", "threads", "max_batch", "delay us", "variant",
            *[f"c={c} {what}" for c in concurrencies for what in ("2xx/s", "p50 ms", "p95 ms")], "gmean 2xx/s",
            "budget"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for result in results:
        p = result.point
        meets, gmean, worst = score(result, budget_ms)
        cells = []
        by_c = {r.concurrency: r for r in result.runs}
        for c in concurrencies:
            r = by_c.get(c)
            cells += ["-"] * 3 if r is None else [fmt(r.goodput) + (f" ({r.errors} err)" if r.errors else ""),
                                                  fmt(r.p50_ms), fmt(r.p95_ms)]
        verdict = result.failed or ("met" if meets else
                                    "errors" if any(r.errors for r in result.runs) else f"p95 x{worst:.2f}")
        mark = "**chosen**" if result is chosen else ""
        rows.append("| " + " | ".join([mark, str(p.workers), str(p.instances), str(p.threads), str(p.max_batch_size),
                                        str(p.delay_us), p.variant, *cells, fmt(gmean), verdict]) + " |")
    return "\n".join(rows)


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (p95, throughput) points no other point beats on both (lower p95, higher throughput), by p95."""
    front: list[tuple[float, float]] = []
    for p95, rps in sorted(points, key=lambda x: (x[0], -x[1])):
        if not front or rps > front[-1][1]:
            front.append((p95, rps))
    return front


def plot(results: list[Result], budget_ms: float | None, chosen: Result | None, path: Path, title: str) -> None:
    """Throughput vs p95, one panel per concurrency: every configuration, the Pareto front, the budget, the
    chosen one. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrencies = sorted({r.concurrency for result in results for r in result.runs})
    if not concurrencies:
        return
    fig, axes = plt.subplots(1, len(concurrencies), figsize=(5 * len(concurrencies), 4.2), squeeze=False)
    for ax, c in zip(axes[0], concurrencies, strict=True):
        runs = [(result, r) for result in results for r in result.runs if r.concurrency == c]
        for variant, marker in (("fp32", "o"), ("int8", "^")):
            xs = [r.p95_ms for result, r in runs if result.point.variant == variant]
            ys = [r.goodput for result, r in runs if result.point.variant == variant]
            if xs:
                ax.scatter(xs, ys, marker=marker, alpha=0.6, label=variant)
        front = pareto([(r.p95_ms, r.goodput) for _, r in runs])
        ax.plot([x for x, _ in front], [y for _, y in front], "k--", lw=1, label="Pareto front")
        for result, r in runs:
            if result is chosen:
                ax.scatter([r.p95_ms], [r.goodput], s=160, facecolors="none", edgecolors="red", lw=2, label="chosen")
        right = max(r.p95_ms for _, r in runs) * 1.15
        if budget_ms and budget_ms <= right:
            ax.axvline(budget_ms, color="grey", lw=1, ls=":", label=f"p95 budget {budget_ms:g} ms")
        ax.set_xlim(0, right)
        budget_note = f", budget {budget_ms:g} ms off the right" if budget_ms and budget_ms > right else ""
        ax.set_title(f"{c} client{'s' if c > 1 else ''}{budget_note}", fontsize=10)
        ax.set_xlabel("p95 latency (ms)")
        ax.set_ylabel("throughput (2xx/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def results_json(results: list[Result], extra: dict) -> str:
    return json.dumps({**extra, "results": [r.to_json() for r in results]}, indent=2)


# -- the models config entry ---------------------------------------------------------------------------------

def entry_for(point: Point, model: str) -> dict:
    """The entry written: the point's model settings. The worker count is the server's (NNSERVE_WORKERS)."""
    return point.entry(model)


def write_entry(config_path: Path, model: str, entry: dict, comment: str) -> None:
    """Put ``entry`` as ``model``'s in the models config at ``config_path`` (created if missing), keeping every
    other line: the model's old block is replaced in the text (its other entries and comments stay as they
    are), the result is checked with the server's own parser, then renamed over the file. A file whose layout
    the block cannot be found in (JSON, flow style) is rewritten whole. SettingsError if the result would not
    parse: nothing is written then."""
    line = f"  {model}: {json.dumps(entry, separators=(', ', ': '))}"
    block = [f"  # {comment}", line]
    old = config_path.read_text(encoding="utf-8") if config_path.exists() else ""
    text = _splice(old, model, block) if old else "models:\n" + "\n".join(block) + "\n"
    if text is None:  # a layout the splice does not know: parse, replace, dump (comments are lost)
        document = yaml.safe_load(old) or {}
        document.setdefault("models", {})[model] = entry
        text = yaml.safe_dump(document, sort_keys=False)
    got = read_models_document(yaml.safe_load(text), str(config_path))
    expected = read_models_document({"models": {model: entry}}, str(config_path))
    if got.get(model, {}).keys() != expected[model].keys() or any(
            got[model][k][0] != v[0] for k, v in expected[model].items()):
        raise SettingsError(f"{config_path}: the entry written for {model!r} would not read back as chosen")
    if old:
        before = read_models_document(yaml.safe_load(old), str(config_path))
        lost = [name for name in before if name not in got]
        if lost:
            raise SettingsError(f"{config_path}: writing {model!r} would lose {lost}; nothing written")
    write_atomic(config_path, text.encode())


def _splice(text: str, model: str, block: list[str]) -> str | None:
    """``text`` with ``model``'s block under a block-style ``models:`` replaced by (or extended with) ``block``;
    None if the file is not laid out that way."""
    lines = text.splitlines()
    top = next((i for i, x in enumerate(lines) if re.fullmatch(r"models:\s*(#.*)?", x)), None)
    if top is None:
        return None
    end = next((i for i in range(top + 1, len(lines)) if lines[i] and not lines[i].startswith((" ", "#"))),
               len(lines))
    start = next((i for i in range(top + 1, end) if re.match(rf"  {re.escape(model)}\s*:", lines[i])), None)
    if start is None:
        while end > top + 1 and not lines[end - 1].strip():
            end -= 1
        new = lines[:end] + block + lines[end:]
    else:
        stop = next((i for i in range(start + 1, end) if re.match(r"  \S", lines[i])), end)
        while stop > start + 1 and not lines[stop - 1].strip():
            stop -= 1
        # a comment line written by an earlier tune run just above the block goes with it
        first = start - 1 if start - 1 > top and lines[start - 1].startswith("  # tuned") else start
        new = lines[:first] + block + lines[stop:]
    return "\n".join(new) + "\n"
