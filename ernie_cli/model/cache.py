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

    def mark_static(self) -> None:
        """Fixed addresses for Inductor's CUDA graphs: without this, a compiled step would copy every
        cache tensor into the graph's own input buffers before each replay. (Only for compiled
        steps: importing Dynamo costs seconds.)"""
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


# ---- many sequences in one cache: the server's batches --------------------------------------------------


class Ragged:
    """Several sequences' new tokens packed into one row [1, N], each at its own positions.

    Stands where a forward takes its first position. The row may begin with one new token of each
    of G sequences that are decoding (decode: a PagedDecode of those G, attended in one kernel);
    the rest are prompt chunks, described by: positions [N - G]: each token's position in its own
    sequence; slots [N - G]: the cache slot its key and value go to; spans: per sequence, (its first
    token's offset in the row after the G, its count of new tokens, its first position, the slots
    of its positions 0..first + count - 1 in order)."""

    def __init__(self, positions: torch.Tensor, slots: torch.Tensor, spans: list[tuple[int, int, int, torch.Tensor]],
                 decode: "PagedDecode | None" = None, chunks: "PagedChunks | None" = None):
        """chunks: the same prompt chunks as block tables, for a kernel that attends to all of them at once."""
        self.positions, self.slots, self.spans, self.decode, self.chunks = positions, slots, spans, decode, chunks


class PagedChunks:
    """The prompt chunks of a Ragged row as block tables: meta [S, 4] int32 (each chunk's first row
    after the decoding tokens, its token count, its first position, a pad), table [S, W] int32 (the
    blocks of its sequence, in order). The counts stay on the host too: programs(n) cuts the chunks
    into pieces of n tokens, (chunk, first token) each, once per step for all layers. (S is no
    kernel argument: Triton would compile a kernel again for each new value that divides by 16.)"""

    def __init__(self, counts: list[int], starts: list[int], tables: list[list[int]], block: int, width: int, device):
        firsts = [sum(counts[:i]) for i in range(len(counts))]
        self.counts, self.block = counts, block
        self.meta = torch.tensor([[f, c, s, 0] for f, c, s in zip(firsts, counts, starts)], dtype=torch.int32, device=device)
        rows = [t + [0] * (width - len(t)) for t in tables]
        self.table = torch.tensor(rows, dtype=torch.int32, device=device)
        self._programs: dict[int, torch.Tensor] = {}

    def programs(self, tokens: int) -> torch.Tensor:
        if tokens not in self._programs:
            pieces = [(c, i) for c, t in enumerate(self.counts) for i in range(0, t, tokens)]
            self._programs[tokens] = torch.tensor(pieces, dtype=torch.int32, device=self.meta.device)
        return self._programs[tokens]


class PagedDecode:
    """One new token of each of B sequences in a paged cache, the decode-only step of a batch.

    Stands where a forward takes its first position, tokens [1, B]. positions [B] (long): each
    token's position; slots [B] (long): the cache slot its key and value go to; table [B, W]
    (int32): each sequence's blocks in order, of which those holding positions 0..position are
    read. Static shapes and no host value: a CUDA graph holds the step (runtime/batch.py)."""

    def __init__(self, positions: torch.Tensor, slots: torch.Tensor, table: torch.Tensor, block: int):
        self.positions, self.slots, self.table, self.block = positions, slots, table, block


class PagedKVCache(nn.Module):
    """Keys and values of many sequences in one pool of slots [slots, kv_heads, head_dim] per layer,
    handed out in blocks of `block` consecutive slots: a sequence holds a list of blocks, so its
    memory need not be one piece and is returned the moment it ends."""

    def __init__(self, layers: int, blocks: int, block: int, kv_heads: int, head_dim: int, positions: int,
                 dtype: torch.dtype, device, rope: Callable[[int], tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.block, self.blocks = block, blocks
        self.layers = nn.ModuleList(LayerCache((blocks * block, kv_heads, head_dim), dtype, device) for _ in range(layers))
        cos, sin = rope(positions)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def capacity(self) -> int:
        """The most positions one sequence may reach (the RoPE tables' length)."""
        return self.rope_cos.shape[0]

    def slots_of(self, blocks: list[int], positions: int) -> torch.Tensor:
        """The slots holding positions 0..positions-1 of a sequence that owns `blocks`, in order."""
        ids = torch.tensor(blocks, dtype=torch.long, device=self.rope_cos.device)
        return (ids[:, None] * self.block + torch.arange(self.block, device=ids.device)).flatten()[:positions]


def paged_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return cache_bytes(layers, kv_heads, head_dim, 1, dtype)
