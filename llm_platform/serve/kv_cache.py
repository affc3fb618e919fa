"""The serving engine's KV cache: buffers allocated once per change of the batch, with room for the tokens to come.

`transformers`' `DynamicLayer` concatenates a new (B, H, T+1, D) tensor per layer at every decode step. A
`reserved_layer_class()` layer keeps its keys and values as views of buffers with spare columns, so a decode step
writes its column in place; `rebuild` makes a batch's buffers layer by layer from the rows that stay (at most one
layer is held twice), `rows_view` lets a prefill write its rows straight into them, and `gathered_layer` shrinks a
batch. Every allocation is sized by a `BatchShape` (scheduler.py), the same record admission counts against the
budget, so the buffers hold exactly what was admitted. On CPU, `bound_cpu_allocator` and `release_freed_memory` keep
the resident set near what is held.
"""

from __future__ import annotations

from typing import Any

import torch

from llm_platform.serve.scheduler import BatchShape


def reserved_layer_class():
    """`_ReservedLayer`, made on first use (transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    global _ReservedLayer
    if _ReservedLayer is None:
        class Reserved(DynamicLayer):
            """A `DynamicLayer` whose keys and values are views of buffers with room for the batch's remaining
            tokens: a decode step writes its column in place. `DynamicLayer.update` concatenated, allocating the
            whole layer anew at every step and leaving the old block to the allocator (on CPU, glibc kept the
            freed blocks: the resident set grew well past the cache). Past the room it concatenates again."""

            def __init__(self, kbuf: torch.Tensor, vbuf: torch.Tensor, length: int):
                super().__init__()
                self.kbuf, self.vbuf = kbuf, vbuf
                self.dtype, self.device, self.is_initialized = kbuf.dtype, kbuf.device, True
                self.keys, self.values = kbuf[:, :, :length], vbuf[:, :, :length]

            def update(self, key_states, value_states, *args, **kwargs):
                t, n = self.keys.shape[-2], key_states.shape[-2]
                if t + n > self.kbuf.shape[-2]:
                    self.kbuf = self.keys = torch.cat([self.keys, key_states], dim=-2)
                    self.vbuf = self.values = torch.cat([self.values, value_states], dim=-2)
                    return self.keys, self.values
                self.kbuf[:, :, t:t + n] = key_states
                self.vbuf[:, :, t:t + n] = value_states
                self.keys, self.values = self.kbuf[:, :, :t + n], self.vbuf[:, :, :t + n]
                return self.keys, self.values

        _ReservedLayer = Reserved
    return _ReservedLayer


_ReservedLayer = None


def _libc():
    """glibc through ctypes, or None (another C library, another OS)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018 - both must exist
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def bound_cpu_allocator() -> None:
    """Make the resident set of a CPU replica follow what it holds (called once when a CPU engine starts).

    glibc serves blocks below its mmap threshold from its heap and keeps the pages of freed ones; the threshold
    also rises by itself (up to 32 MB) each time a large block is freed. A replica's large tensors (prefill
    activations, cache layers) then stay resident after use: in the serving-memory benchmark the resident set
    sat about 0.4x the allowance above what the engine held. A fixed 8 MB threshold puts every block from 8 MB
    up in its own mapping, returned when freed; the per-step tensors (one row of logits per sequence, a few MB)
    stay in the heap, so decode steps fault in no new pages (the benchmark's time did not change)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, CPU_MMAP_THRESHOLD_BYTES)  # -3: M_MMAP_THRESHOLD


def release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's `malloc_trim`), after the batch changes shape (a
    prefill, a shrink), never per decode step."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


_LIBC = None
CPU_MMAP_THRESHOLD_BYTES = 8 << 20


def gathered_layer(parts: list[tuple[torch.Tensor, torch.Tensor, list[int] | None, int]], shape: BatchShape):
    """A reserved layer of `shape` (its rows, its width filled, its room spare) filled from `parts`: (keys, values,
    the rows to take or None for all, the column they start at), in order from row 0, each right-aligned at the
    width (left padding is zeros; rows past the parts' are filled later). Copies straight into the new buffers, so
    no intermediate concatenation or row selection is ever allocated."""
    keys = parts[0][0]
    h, d, width = keys.shape[1], keys.shape[3], shape.width
    kbuf = keys.new_zeros((shape.rows, h, shape.columns, d))
    vbuf = keys.new_zeros((shape.rows, h, shape.columns, d))
    out = 0
    for k, v, take, first in parts:
        cols = k.shape[2] - first
        if take is None:  # every row: one slice copy
            n = k.shape[0]
            kbuf[out:out + n, :, width - cols:width].copy_(k[:, :, first:])
            vbuf[out:out + n, :, width - cols:width].copy_(v[:, :, first:])
            out += n
            continue
        for r in take:
            kbuf[out, :, width - cols:width].copy_(k[r, :, first:])
            vbuf[out, :, width - cols:width].copy_(v[r, :, first:])
            out += 1
    return reserved_layer_class()(kbuf, vbuf, width)


def rebuild(parts: list[tuple[Any, int]], shape: BatchShape):
    """A cache of `shape` whose first rows come from `parts` ((cache or None, rows) in order; the rest are filled
    later), built layer by layer: each new layer is gathered, and the parts' layers dropped, so at most one layer is
    held twice."""
    from transformers import DynamicCache

    parts = [(c, n) for c, n in parts if c is not None and n]
    cache = DynamicCache()
    cache.layers = []
    for i in range(len(parts[0][0].layers)):
        sources = [c.layers[i] for c, _ in parts]
        cache.layers.append(gathered_layer([(layer.keys, layer.values, None, 0) for layer in sources], shape))
        for layer in sources:
            layer.keys = layer.values = layer.kbuf = layer.vbuf = None
    return cache


def rows_view(batch, row: int, rows: int, width: int, cols: int):
    """A cache whose layers write into rows [row, row + rows) of the batch cache, right-aligned at `width`, for
    a prefill of `cols` columns (nothing is allocated: its keys and values are views of `batch`'s)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layers = [reserved_layer_class()(layer.kbuf[row:row + rows, :, width - cols:width],
                                      layer.vbuf[row:row + rows, :, width - cols:width], 0)
                    for layer in batch.layers]
    return cache
