"""Server metrics through ``prometheus_client``, one CollectorRegistry per app (several servers in
one process, as in the tests, do not share counters).

Times are in seconds (Prometheus' base unit): ``edgevlm_ttft_seconds``,
``edgevlm_vision_seconds`` (only requests that ran the vision encoder),
``edgevlm_decode_tokens_per_second``. The queue and the runtime's caches are read when scraped
(a custom collector), so they never go stale.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
VISION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
TOKS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("edgevlm_requests", "HTTP requests by path and status.", ["path", "status"],
                                registry=r)
        self.prompt_tokens = Counter("edgevlm_prompt_tokens", "Prompt positions (text + visual).", registry=r)
        self.completion_tokens = Counter("edgevlm_completion_tokens", "Generated tokens.", registry=r)
        self.cancelled = Counter("edgevlm_cancelled", "Generations stopped because the client left.", registry=r)
        self.images_encoded = Counter("edgevlm_images_encoded", "Images run through the vision encoder.",
                                      registry=r)
        self.constrained = Counter("edgevlm_constrained_requests", "Generations under a response_format "
                                   "constraint.", registry=r)
        self.ttft = Histogram("edgevlm_ttft_seconds", "Time to first token.", buckets=TTFT_BUCKETS, registry=r)
        self.vision = Histogram("edgevlm_vision_seconds", "Vision encoder time per request that ran it.",
                                buckets=VISION_BUCKETS, registry=r)
        self.decode = Histogram("edgevlm_decode_tokens_per_second", "Decode speed per request.",
                                buckets=TOKS_BUCKETS, registry=r)

    def watch(self, worker, caches) -> None:
        """Report ``worker``'s queue and the runtime's ``caches`` at each scrape."""
        self.registry.register(_LiveCollector(worker, caches))

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(path=path, status=str(status)).inc()

    def observe(self, result) -> None:
        """Record one finished generation (a runtime GenerationResult)."""
        t = result.timings
        self.prompt_tokens.inc(t.n_prompt_tokens + t.n_visual_tokens)
        self.completion_tokens.inc(t.n_generated)
        if result.finish_reason == "cancelled":
            self.cancelled.inc()
        self.images_encoded.inc(result.cache.images_encoded)
        if t.n_generated:
            self.ttft.observe(t.ttft_ms / 1e3)
        if result.cache.images_encoded:
            self.vision.observe(t.vision_ms / 1e3)
        if t.decode_tok_s is not None:
            self.decode.observe(t.decode_tok_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    """Gauges and counters read from the worker and the runtime's caches when scraped."""

    def __init__(self, worker, caches):
        self.worker, self.caches = worker, caches

    def describe(self):
        return []  # collected lazily; nothing to check at registration

    def collect(self):
        w, images, prefix = self.worker, self.caches.images, self.caches.prefix
        yield GaugeMetricFamily("edgevlm_queue_depth", "Requests waiting behind the running one.", w.queue_depth)
        yield GaugeMetricFamily("edgevlm_requests_running", "Generations running now (0 or 1).", w.busy)
        yield CounterMetricFamily("edgevlm_image_cache_hits", "Images whose embeddings came from the cache.",
                                  images.hits if images else 0)
        yield CounterMetricFamily("edgevlm_image_cache_misses", "Images not found in the cache.",
                                  images.misses if images else 0)
        yield GaugeMetricFamily("edgevlm_image_cache_bytes", "Bytes held by the image-embedding cache.",
                                images.n_bytes if images else 0)
        yield CounterMetricFamily("edgevlm_prefix_cache_hits", "Requests that kept part of the KV cache.",
                                  prefix.hits if prefix else 0)
        yield CounterMetricFamily("edgevlm_prefix_reused_tokens", "Positions not prefilled again.",
                                  prefix.reused_tokens if prefix else 0)
