"""supervisor/stats.py: completion counters and the latency histogram."""

from __future__ import annotations

from tlshd.supervisor.stats import CompletionStats


def test_stats_buckets_and_percentiles() -> None:
    stats = CompletionStats()
    for ms in (3, 3, 3, 40, 900):
        stats.record(0, ms / 1000)
    stats.record(13, 20.0)
    assert (stats.done, stats.failed) == (6, 1)
    assert stats.counters() == {"0": 5, "13": 1}
    latency = stats.latency()
    assert latency["count"] == 6
    assert latency["p50"] == 5.0  # bucket upper bound
    assert latency["p99"] == latency["max"] == 20000.0
    assert latency["buckets"][-1] == [None, 1]  # the overflow bucket
    assert sum(count for _, count in latency["buckets"]) == 6
