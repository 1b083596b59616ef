"""Completion counters and the accept→DONE latency histogram.

Fixed buckets since start keep memory constant however long the daemon runs;
percentiles are reported as the upper bound of the bucket that holds them.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

# Upper bounds in milliseconds; the last bucket catches everything slower.
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, math.inf)


class CompletionStats:
    def __init__(self) -> None:
        self.done = 0
        self.failed = 0
        self.by_status: Counter[int] = Counter()
        self._bucket_counts = [0] * len(LATENCY_BUCKETS_MS)
        self._max_ms = 0.0

    def record(self, status: int, latency_s: float) -> None:
        self.done += 1
        if status != 0:
            self.failed += 1
        self.by_status[status] += 1
        latency_ms = max(0.0, latency_s * 1000)
        self._max_ms = max(self._max_ms, latency_ms)
        for index, upper in enumerate(LATENCY_BUCKETS_MS):
            if latency_ms <= upper:
                self._bucket_counts[index] += 1
                break

    def _percentile(self, fraction: float) -> float | None:
        if self.done == 0:
            return None
        rank = math.ceil(fraction * self.done)
        seen = 0
        for upper, count in zip(LATENCY_BUCKETS_MS, self._bucket_counts, strict=True):
            seen += count
            if seen >= rank:
                return self._max_ms if math.isinf(upper) else float(min(upper, self._max_ms))
        return self._max_ms

    def latency(self) -> dict[str, Any]:
        return {
            "count": self.done,
            "p50": self._percentile(0.50),
            "p90": self._percentile(0.90),
            "p99": self._percentile(0.99),
            "max": round(self._max_ms, 3),
            "buckets": [
                [None if math.isinf(upper) else upper, count]
                for upper, count in zip(LATENCY_BUCKETS_MS, self._bucket_counts, strict=True)
            ],
        }

    def counters(self) -> dict[str, int]:
        return {str(status): count for status, count in sorted(self.by_status.items())}
