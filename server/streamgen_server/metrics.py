"""Counters and a latency histogram in Prometheus' text format, without a client library to install.

Gauges (active and queued sessions, connections, model memory) are read from their owners when scraped, so they
can never drift from the truth; counters and the histogram are fed by the connections.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable

from streamgen import pipeline

# Seconds per chunk on the server: generation plus encoding (from a tiny CPU model to a GPU's 832x480 chunks).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STAGES = (*pipeline.STAGES, "send")  # the runner's stages, then handing the chunk to the socket


class Metrics:
    def __init__(
        self,
        gauges: Callable[[], dict[str, tuple[str, float]]],
        batches: Callable[[], dict[int, int]] = dict,
    ) -> None:
        """`gauges()` returns {name: (help, value)} at scrape time; `batches()` {chunks per batch: batches run}."""
        self._gauges = gauges
        self._batches = batches
        self.chunks = 0
        self.frames_sent = 0
        self.bytes_sent = 0
        self.stage_seconds: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.viewer_drops = 0
        self._latency_counts = [0] * len(LATENCY_BUCKETS)
        self._latency_sum = 0.0

    def chunk_sent(self, frames: int, nbytes: int, stages: dict[str, float]) -> None:
        self.chunks += 1
        self.frames_sent += frames
        self.bytes_sent += nbytes
        self.stage_seconds.update(stages)
        latency = sum(stages[stage] for stage in STAGES if stage != "send")
        self._latency_sum += latency
        bucket = bisect.bisect_left(LATENCY_BUCKETS, latency)
        if bucket < len(LATENCY_BUCKETS):
            self._latency_counts[bucket] += 1

    def error(self, code: str) -> None:
        self.errors[code] += 1

    def viewer_dropped(self) -> None:
        self.viewer_drops += 1

    def render(self) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            """`samples`: (suffix after the name: labels, or a histogram's `_bucket{...}`, `_sum`, `_count`; value)."""
            lines.extend((f"# HELP streamgen_{name} {help_text}", f"# TYPE streamgen_{name} {kind}"))
            lines.extend(f"streamgen_{name}{suffix} {_number(value)}" for suffix, value in samples)

        for name, (help_text, value) in self._gauges().items():
            metric(name, "gauge", help_text, [("", value)])
        metric("chunks_total", "counter", "Chunks sent to clients.", [("", self.chunks)])
        metric("frames_sent_total", "counter", "Video frames sent to clients.", [("", self.frames_sent)])
        metric("bytes_sent_total", "counter", "Media bytes sent to clients.", [("", self.bytes_sent)])
        metric(
            "chunk_stage_seconds_total",
            "counter",
            "Time spent per stage of the chunks sent.",
            [(f'{{stage="{stage}"}}', self.stage_seconds[stage]) for stage in STAGES],
        )
        metric(
            "viewer_drops_total",
            "counter",
            "Times a viewer fell behind and was dropped to the next key frame.",
            [("", self.viewer_drops)],
        )
        metric(
            "batches_total",
            "counter",
            "Batched transformer calls run (one per denoising turn and chunk shape), by chunks in the batch.",
            [(f'{{size="{size}"}}', count) for size, count in sorted(self._batches().items())],
        )
        metric(
            "errors_total",
            "counter",
            "Error messages sent to clients and refused HTTP requests, by code.",
            [(f'{{code="{code}"}}', count) for code, count in sorted(self.errors.items())],
        )
        cumulative, buckets = 0, []
        for bound, count in zip(LATENCY_BUCKETS, self._latency_counts):
            cumulative += count
            buckets.append((f'_bucket{{le="{bound:g}"}}', cumulative))
        buckets += [('_bucket{le="+Inf"}', self.chunks), ("_sum", self._latency_sum), ("_count", self.chunks)]
        metric("chunk_latency_seconds", "histogram", "Server time per chunk: generation plus encoding.", buckets)
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """Integers (counts, bytes) exactly: `:g` would round a byte count to 6 digits."""
    return str(value) if isinstance(value, int) else f"{value:g}"
