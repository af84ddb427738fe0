"""Request and latency metrics of a serving process, in Prometheus' text format."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

#: Latency buckets, seconds.
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


class Metrics:
    """Counters and latency histograms; thread-safe, cheap enough for every request."""

    def __init__(self, prefix: str = "fedps_serving") -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self._hist: dict[tuple, list[float]] = {}
        self._hist_sum: dict[tuple, float] = defaultdict(float)
        self.info: dict[str, str] = {}

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._counters[name][key] += value

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            counts = self._hist.setdefault(key, [0.0] * (len(BUCKETS) + 1))
            counts[bisect.bisect_left(BUCKETS, seconds)] += 1
            self._hist_sum[key] += seconds

    def value(self, name: str, **labels: str) -> float:
        """A counter's value (summed over the labels not given)."""
        want = set(labels.items())
        with self._lock:
            return sum(v for k, v in self._counters.get(name, {}).items() if want <= set(k))

    def render(self) -> str:
        lines = []
        with self._lock:
            if self.info:
                lines.append(f"# TYPE {self.prefix}_info gauge")
                lines.append(f"{self.prefix}_info{_labels(tuple(sorted(self.info.items())))} 1")
            for name, series in sorted(self._counters.items()):
                lines.append(f"# TYPE {self.prefix}_{name} counter")
                for labels, value in sorted(series.items()):
                    lines.append(f"{self.prefix}_{name}{_labels(labels)} {value:g}")
            for (name, labels), counts in sorted(self._hist.items()):
                full = f"{self.prefix}_{name}"
                lines.append(f"# TYPE {full} histogram")
                total = 0.0
                for bound, count in zip((*BUCKETS, float("inf")), counts):
                    total += count
                    le = "+Inf" if bound == float("inf") else f"{bound:g}"
                    lines.append(f"{full}_bucket{_labels((*labels, ('le', le)))} {total:g}")
                lines.append(f"{full}_sum{_labels(labels)} {self._hist_sum[(name, labels)]:.6f}")
                lines.append(f"{full}_count{_labels(labels)} {total:g}")
        return "\n".join(lines) + "\n"
