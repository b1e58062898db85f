"""The service's batch-size histograms from /metrics, so each run can say how the batcher behaved."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass


@dataclass
class Histogram:
    """A Prometheus histogram's cumulative bucket counts (upper bound -> count), sum and count."""

    buckets: dict[float, float]
    total: float
    count: float

    def minus(self, before: Histogram) -> Histogram:
        return Histogram({le: c - before.buckets.get(le, 0.0) for le, c in self.buckets.items()},
                         self.total - before.total, self.count - before.count)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def describe(self) -> str:
        """Non-cumulative counts per bucket as "1:120 2:40 3-4:7" (the buckets are 1, 2, 4, 8, ...)."""
        parts, below, lower = [], 0.0, 0
        for le in sorted(self.buckets):
            n = self.buckets[le] - below
            below = self.buckets[le]
            if n > 0 and le != float("inf"):
                span = f"{int(le)}" if lower + 1 >= le else f"{lower + 1}-{int(le)}"
                parts.append(f"{span}:{int(n)}")
            elif n > 0:
                parts.append(f">{lower}:{int(n)}")
            lower = int(le) if le != float("inf") else lower
        return " ".join(parts) or "-"


def scrape(url: str) -> dict:
    """/metrics -> {("nnserve_batch_size", model, batcher): Histogram}, summed over model versions."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    found: dict = {}
    for family in text_string_to_metric_families(text):
        if family.name == "nnserve_batch_size":
            for s in family.samples:
                key = ("nnserve_batch_size", s.labels["model"], s.labels["batcher"])
                hist = found.setdefault(key, Histogram({}, 0.0, 0.0))
                if s.name.endswith("_bucket"):
                    le = float(s.labels["le"])
                    hist.buckets[le] = hist.buckets.get(le, 0.0) + s.value  # summed over versions
                elif s.name.endswith("_sum"):
                    hist.total += s.value
                elif s.name.endswith("_count"):
                    hist.count += s.value
    return found


def batch_histogram(before: dict, after: dict, model: str, batcher: str) -> Histogram:
    key = ("nnserve_batch_size", model, batcher)
    empty = Histogram({}, 0.0, 0.0)
    return after.get(key, empty).minus(before.get(key, empty))
