"""The service's histograms from /metrics, so each run can say how the batchers behaved and what the server
itself measured (batch sizes, time in the queue, request time inside the handler)."""

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

    def quantile_bound(self, q: float) -> float:
        """The upper bound of the bucket holding the q-quantile (a histogram knows no finer)."""
        for le in sorted(self.buckets):
            if self.count and self.buckets[le] >= q * self.count:
                return le
        return float("nan")

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


# family -> the label that tells its series apart (besides model); summed over model versions
FAMILIES = {"nnserve_batch_size": "batcher", "nnserve_batch_wait_duration_seconds": None,
            "nnserve_request_duration_seconds": "endpoint", "nnserve_inference_duration_seconds": "batcher"}


def scrape(url: str) -> dict:
    """/metrics -> {(family, model, batcher or endpoint or None): Histogram} for the FAMILIES."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    found: dict = {}
    for family in text_string_to_metric_families(text):
        if family.name in FAMILIES:
            for s in family.samples:
                series = FAMILIES[family.name]
                key = (family.name, s.labels["model"], s.labels[series] if series else None)
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
    return histogram(before, after, ("nnserve_batch_size", model, batcher))


def histogram(before: dict, after: dict, key: tuple) -> Histogram:
    """The observations of ``key`` between two scrapes."""
    empty = Histogram({}, 0.0, 0.0)
    return after.get(key, empty).minus(before.get(key, empty))
