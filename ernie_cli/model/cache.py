"""The KV cache: preallocated keys and values of every layer, and the RoPE tables for the positions
it holds. The decoder owns it and hands it to each forward; the model keeps no state between calls."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

CACHE_BLOCK = 256  # capacities are multiples of this, so few sizes (and compiled shapes) ever exist


class LayerCache(nn.Module):
    """Keys and values of one layer: [B, kv_heads, capacity, head_dim] each."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class KVCache(nn.Module):
    def __init__(self, layers: int, batch: int, kv_heads: int, positions: int, head_dim: int, dtype: torch.dtype,
                 device, rope: Callable[[int], tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        capacity = -(-positions // CACHE_BLOCK) * CACHE_BLOCK
        self.layers = nn.ModuleList(LayerCache((batch, kv_heads, capacity, head_dim), dtype, device) for _ in range(layers))
        cos, sin = rope(capacity)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if torch.device(device).type == "cuda":
            # Fixed addresses for CUDA graphs: without this, a compiled step would copy every cache
            # tensor into the graph's own input buffers before each replay.
            for t in self.buffers():
                torch._dynamo.mark_static_address(t)

    @property
    def capacity(self) -> int:
        return self.layers[0].k.shape[2] if len(self.layers) else self.rope_cos.shape[0]

    @property
    def batch(self) -> int:
        return self.layers[0].k.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].k.dtype

    def holds(self, batch: int, positions: int, dtype: torch.dtype) -> bool:
        return self.batch == batch and self.dtype == dtype and self.capacity >= positions


def cache_bytes(layers: int, kv_heads: int, head_dim: int, positions: int, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * layers * kv_heads * head_dim * positions * size
