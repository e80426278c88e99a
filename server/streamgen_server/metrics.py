"""The server's Prometheus metrics, kept and written by `prometheus_client`, one registry per server.

Gauges (active and queued sessions, connections, model memory) and the batch counts are read from their owners
when scraped, so they can never drift from the truth; the other counters and the latency histogram are fed by the
connections.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from streamgen import pipeline

PREFIX = "streamgen_"
# Seconds per chunk on the server: generation plus encoding (from a tiny CPU model to a GPU's 832x480 chunks).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STAGES = (*pipeline.STAGES, "send")  # the runner's stages, then handing the chunk to the socket

disable_created_metrics()  # no `_created` timestamp series beside each counter: nothing here reads them


class _Scraped:
    """The metrics read from their owners at scrape time (a `prometheus_client` custom collector)."""

    def __init__(self, gauges: Callable[[], dict[str, tuple[str, float]]], batches: Callable[[], dict[int, int]]):
        self.gauges, self.batches = gauges, batches

    def collect(self) -> Iterator[Metric]:
        for name, (help_text, value) in self.gauges().items():
            yield GaugeMetricFamily(PREFIX + name, help_text, value=value)
        batches = CounterMetricFamily(
            PREFIX + "batches",
            "Batched transformer calls run (one per denoising turn and chunk shape), by chunks in the batch.",
            labels=["size"],
        )
        for size, count in sorted(self.batches().items()):
            batches.add_metric([str(size)], count)
        yield batches


class Metrics:
    def __init__(
        self,
        gauges: Callable[[], dict[str, tuple[str, float]]],
        batches: Callable[[], dict[int, int]] = dict,
    ) -> None:
        """`gauges()` returns {name: (help, value)} at scrape time; `batches()` {chunks per batch: batches run}."""
        self.registry = CollectorRegistry()
        self.registry.register(_Scraped(gauges, batches))

        def counter(name: str, help_text: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, help_text, labels, registry=self.registry)

        self._chunks = counter("chunks", "Chunks sent to clients.")
        self._frames = counter("frames_sent", "Video frames sent to clients.")
        self._bytes = counter("bytes_sent", "Media bytes sent to clients.")
        self._stages = counter("chunk_stage_seconds", "Time spent per stage of the chunks sent.", ("stage",))
        for stage in STAGES:  # every stage listed from the start, at 0
            self._stages.labels(stage)
        self._drops = counter("viewer_drops", "Times a viewer fell behind and was dropped to the next key frame.")
        self._errors = counter("errors", "Error messages sent and HTTP requests refused, by code.", ("code",))
        self._latency = Histogram(
            PREFIX + "chunk_latency_seconds",
            "Server time per chunk: generation plus encoding.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def chunk_sent(self, frames: int, nbytes: int, stages: dict[str, float]) -> None:
        self._chunks.inc()
        self._frames.inc(frames)
        self._bytes.inc(nbytes)
        for stage in STAGES:
            self._stages.labels(stage).inc(stages.get(stage, 0.0))
        self._latency.observe(sum(stages[stage] for stage in STAGES if stage != "send"))

    def error(self, code: str) -> None:
        self._errors.labels(code).inc()

    def viewer_dropped(self) -> None:
        self._drops.inc()

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value, e.g. `value("errors_total", code="forbidden_host")` (0 if never counted)."""
        return self.registry.get_sample_value(PREFIX + name, labels) or 0.0

    @property
    def viewer_drops(self) -> int:
        return int(self.value("viewer_drops_total"))

    def render(self) -> str:
        """The Prometheus text exposition (what `/metrics` serves)."""
        return generate_latest(self.registry).decode()

    def samples(self) -> Iterator[tuple[str, str, dict[str, str], float]]:
        """(name, help, labels, value) of every sample, as `render` writes them."""
        for family in self.registry.collect():
            for sample in family.samples:
                yield sample.name, family.documentation, sample.labels, sample.value
