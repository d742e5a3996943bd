"""Image embeddings kept between questions, so that the vision tower encodes a slice once however often it is asked.

Keyed by the image's bytes, shape, dtype and intensity rule (the same key means the same model input, hence the
same embedding); held in host memory (a real slice's 256 x 4096 embedding is 2 MiB in bfloat16), least recently
used evicted beyond the capacity.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch


class EmbeddingCache:
    """Image embeddings by image key, in host memory, least recently used evicted beyond `capacity_bytes`."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> torch.Tensor:
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: str, embedding: torch.Tensor) -> None:
        size = embedding.numel() * embedding.element_size()
        if size > self.capacity_bytes:
            return
        self._entries[key] = embedding.to("cpu", copy=True)  # a copy: not a view that pins the whole batch
        self._bytes += size
        while self._bytes > self.capacity_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.numel() * dropped.element_size()


def image_key(image: np.ndarray, kind: str) -> str:
    """Same bytes, shape, dtype and intensity rule -> same model input -> same embedding."""
    digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).hexdigest()
    return f"{kind}/{image.dtype.str}/{'x'.join(map(str, image.shape))}/{digest}"
