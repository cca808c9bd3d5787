"""A real backend made slower, for scheduling tests (a request caught mid-way, a model that cannot
keep up with a video). Everything else passes through to the wrapped backend."""
from __future__ import annotations

import time

from edgevlm.runtime.backends.base import Backend


class SlowBackend(Backend):
    def __init__(self, inner: Backend, prefill_delay: float = 0.0, decode_delay: float = 0.0):
        self.inner, self.prefill_delay, self.decode_delay = inner, prefill_delay, decode_delay
        self.name, self.n_ctx, self.supports_prefix = inner.name, inner.n_ctx, inner.supports_prefix

    def encode_image(self, pixel_values):
        return self.inner.encode_image(pixel_values)

    def prefill(self, segments):
        time.sleep(self.prefill_delay)
        return self.inner.prefill(segments)

    def prefill_from(self, keep, segments):
        time.sleep(self.prefill_delay)
        return self.inner.prefill_from(keep, segments)

    def decode(self, token_id):
        time.sleep(self.decode_delay)
        return self.inner.decode(token_id)

    @property
    def n_past(self):
        return self.inner.n_past
