"""Markdown tables from export reports: ``python -m export.summary exported/*.json`` (for docs/export.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def ms(latency: dict | None, batch: int) -> str:
    return "-" if not latency else f"{latency[f'batch_{batch}']['median_ms']:.3f}"


def parity_cell(p: dict) -> str:
    images = p.get("eval_samples", p.get("held_out_samples"))
    agreement = (f"greedy {p['greedy_steps']} chars identical: {p['greedy_identical']}" if "greedy_steps" in p
                 else f"top-1 agree {100 * p['top1_agreement']:.1f}% of {images}")
    return f"{p['max_abs']:.1e} / {p['max_rel']:.1e}; {agreement}"


def quality_cell(int8: dict | None) -> str:
    if not int8:
        return "-"
    p = int8["parity"]
    if "top1_drop_points" in p:
        return f"top-1 {100 * p['fp32_accuracy']:.2f}% -> {100 * p['int8_accuracy']:.2f}%"
    return f"bpc {p['fp32_bpc']:.3f} -> {p['int8_bpc']:.3f}"


def tables(reports: list[dict]) -> str:
    lines = ["| model | nodes before -> after folding | parity max abs / rel error | fp32 MB | int8 MB |",
             "|---|---|---|---|---|"]
    for r in reports:
        lines.append(f"| {r['name']} | {r['nodes']['before_folding']} -> {r['nodes']['after_folding']} | "
                     f"{parity_cell(r['parity'])} | {mb(r['file_bytes']['fp32'])} | "
                     f"{mb(r.get('int8', {}).get('file_bytes'))} |")
    lines += ["", "| model | fp32 b1 / b32 ms | ORT-optimized b1 / b32 ms | served | int8 b1 / b32 ms | "
                  "int8 quality (held-out) |", "|---|---|---|---|---|---|"]
    for r in reports:
        lat = r["latency_cpu"]
        lines.append(f"| {r['name']} | {ms(lat['fp32'], 1)} / {ms(lat['fp32'], 32)} | {ms(lat['optimized'], 1)} / "
                     f"{ms(lat['optimized'], 32)} | {r['optimization']['served']} | "
                     f"{ms(lat.get('int8'), 1)} / {ms(lat.get('int8'), 32)} | {quality_cell(r.get('int8'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    paths = argv if argv is not None else sys.argv[1:]
    print(tables([json.loads(Path(p).read_text()) for p in paths]))


if __name__ == "__main__":
    main()
