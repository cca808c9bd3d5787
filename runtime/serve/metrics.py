"""Server counters and histograms, rendered in the Prometheus text format (no client library).

Times are in seconds (Prometheus' base unit): ``edgevlm_ttft_seconds``,
``edgevlm_vision_seconds`` (only requests that ran the vision encoder),
``edgevlm_decode_tokens_per_second``. Cache counters come from the runtime's own caches.
"""
from __future__ import annotations

import bisect
import threading
from collections import Counter

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
VISION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
TOKS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, n in zip((*self.buckets, "+Inf"), self.counts):
            total += n
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {total}')
        return lines + [f"{self.name}_sum {self.sum:.6g}", f"{self.name}_count {self.count}"]


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (path, status) -> n
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cancelled = 0
        self.images_encoded = 0
        self.ttft = Histogram("edgevlm_ttft_seconds", "Time to first token.", TTFT_BUCKETS)
        self.vision = Histogram("edgevlm_vision_seconds", "Vision encoder time per request that ran it.",
                                VISION_BUCKETS)
        self.decode = Histogram("edgevlm_decode_tokens_per_second", "Decode speed per request.", TOKS_BUCKETS)

    def count_request(self, path: str, status: int) -> None:
        with self._lock:
            self.requests[(path, status)] += 1

    def observe(self, result) -> None:
        """Record one finished generation (a runtime GenerationResult)."""
        t = result.timings
        with self._lock:
            self.prompt_tokens += t.n_prompt_tokens + t.n_visual_tokens
            self.completion_tokens += t.n_generated
            self.cancelled += result.finish_reason == "cancelled"
            self.images_encoded += result.cache.images_encoded
            if t.n_generated:
                self.ttft.observe(t.ttft_ms / 1e3)
            if result.cache.images_encoded:
                self.vision.observe(t.vision_ms / 1e3)
            if t.decode_tok_s is not None:
                self.decode.observe(t.decode_tok_s)

    def render(self, queue_depth: int, busy: int, caches) -> str:
        with self._lock:
            lines = ["# HELP edgevlm_requests_total HTTP requests by path and status.",
                     "# TYPE edgevlm_requests_total counter"]
            lines += [f'edgevlm_requests_total{{path="{p}",status="{s}"}} {n}'
                      for (p, s), n in sorted(self.requests.items())]
            lines += _gauge("edgevlm_queue_depth", "Requests waiting behind the running one.", queue_depth)
            lines += _gauge("edgevlm_requests_running", "Generations running now (0 or 1).", busy)
            lines += _counter("edgevlm_prompt_tokens_total", "Prompt positions (text + visual).", self.prompt_tokens)
            lines += _counter("edgevlm_completion_tokens_total", "Generated tokens.", self.completion_tokens)
            lines += _counter("edgevlm_cancelled_total", "Generations stopped because the client left.",
                              self.cancelled)
            lines += _counter("edgevlm_images_encoded_total", "Images run through the vision encoder.",
                              self.images_encoded)
            lines += _cache_lines(caches)
            for h in (self.ttft, self.vision, self.decode):
                lines += h.render()
        return "\n".join(lines) + "\n"


def _gauge(name: str, help: str, value) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {value}"]


def _counter(name: str, help: str, value) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {value}"]


def _cache_lines(caches) -> list[str]:
    """The runtime's caches (runtime.generate.Caches); absent ones read 0."""
    images, prefix = caches.images, caches.prefix
    return (_counter("edgevlm_image_cache_hits_total", "Images whose embeddings came from the cache.",
                     images.hits if images else 0)
            + _counter("edgevlm_image_cache_misses_total", "Images not found in the cache.",
                       images.misses if images else 0)
            + _gauge("edgevlm_image_cache_bytes", "Bytes held by the image-embedding cache.",
                     images.n_bytes if images else 0)
            + _counter("edgevlm_prefix_cache_hits_total", "Requests that kept part of the KV cache.",
                       prefix.hits if prefix else 0)
            + _counter("edgevlm_prefix_reused_tokens_total", "Positions not prefilled again.",
                       prefix.reused_tokens if prefix else 0))
