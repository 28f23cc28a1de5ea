"""Which part of every layer each rank holds, and the load plan that reads only that part.

- attention: the query heads are split across the ranks as evenly as they go (3 ranks over 8 heads
  hold 3, 3 and 2); each rank holds the key/value heads its query heads read (their GQA groups), so
  a key/value head whose group spans two ranks is held by both. q, k and v are column-parallel (a
  rank computes its heads' columns), o is row-parallel (a rank multiplies its heads' columns of o
  and gets a partial sum of the output);
- dense MLP and shared experts: gate and up column-parallel, down row-parallel, the same way;
- routed experts: whole experts, split across the ranks (expert parallel). The router is replicated,
  so every rank picks the same experts for every token from the same inputs with the same float32
  arithmetic, and each computes only the slots routed to its own experts;
- embedding, norms and head: replicated.

Every block of a layer so yields a partial sum per rank, and the decoder layer adds them up over
the ranks (kernels/ops.all_reduce): two collectives per layer. Uneven splits are fine: a rank's
share is whatever it holds, and the sum over ranks is the whole layer either way.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace

from ernie_cli.errors import ErnieError
from ernie_cli.model.config import ErnieConfig
from ernie_cli.parallel.group import SINGLE, Group
from ernie_cli.weights.layout import Param


@dataclass(frozen=True)
class Shard:
    group: Group
    heads: range  # the query heads held here
    # the key/value heads held here, in cache order; local query head j reads
    # kv_heads[j // (len(heads) // len(kv_heads))]
    kv_heads: tuple[int, ...]
    experts: range  # the routed experts held here (global ids)

    @property
    def leads(self) -> bool:
        """Rank 0: the one rank that adds the row-parallel products' biases (added once, not per rank)."""
        return self.group.leads

    def columns(self, n: int) -> range:
        """This rank's share of an MLP's n intermediate columns."""
        return part(n, self.group.world, self.group.rank)


def part(n: int, world: int, rank: int) -> range:
    """rank's share of n items split into `world` contiguous parts, the first n % world one larger."""
    base, extra = divmod(n, world)
    begin = rank * base + min(rank, extra)
    return range(begin, begin + base + (rank < extra))


def kv_heads_for(heads: range, group_size: int) -> tuple[int, ...]:
    """The key/value heads that query heads `heads` read (head h reads h // group_size), laid out so
    that each serves the same number of local query heads, as GQA attention expects. Where the
    heads straddle two groups unevenly (heads 3-5 with groups of 4: one of group 0, two of group 1),
    a key/value head is held twice: (0, 1, 1), one per query head."""
    counts = Counter(h // group_size for h in heads)  # groups in ascending order
    run = math.gcd(*counts.values())
    return tuple(g for g, n in counts.items() for _ in range(n // run))


def plan_shard(cfg: ErnieConfig, group: Group = SINGLE) -> Shard:
    """What rank group.rank holds; with SINGLE, the whole model."""
    heads = part(cfg.num_attention_heads, group.world, group.rank)
    kv = kv_heads_for(heads, cfg.num_attention_heads // cfg.num_key_value_heads)
    return Shard(group, heads, kv, part(cfg.num_experts, group.world, group.rank))


def check_split(cfg: ErnieConfig, world: int) -> None:
    """Refuse a split this model cannot take, before any process is started."""
    if world > cfg.num_attention_heads:
        raise ErnieError(f"--tp {world} asks for more ranks than the model's {cfg.num_attention_heads} attention heads: use --tp {cfg.num_attention_heads} or fewer.")
    if cfg.quantization is not None:
        raise ErnieError("this checkpoint is quantized, and --tp loads float checkpoints only: point -m at the float checkpoint, or drop --tp.")


# ---- the load plan of one rank ---------------------------------------------------------------------


def local_plan(params: list[Param], cfg: ErnieConfig, shard: Shard) -> list[Param]:
    """The load plan (weights/layout.plan) of one rank: each parameter at its local shape, each piece
    reading only this rank's rows or columns of its checkpoint tensor. Replicated parameters are
    unchanged; the biases of row-parallel products are loaded on rank 0 only."""
    d = cfg.head_dim
    heads = (shard.heads.start * d, shard.heads.stop * d)
    local = []
    for p in params:
        module, leaf = p.name.split(".")[-2:]
        if module == "experts":
            local.append(_experts(p, shard.experts))
        elif module == "q_proj":
            local.append(_rows(p, *heads))
        elif module in ("k_proj", "v_proj"):
            local.append(_heads(p, shard.kv_heads, d))
        elif module == "gate_up_proj":
            local.append(_gate_up(p, shard.columns(p.shape[0] // 2)))
        elif module in ("o_proj", "down_proj") and leaf == "bias":
            if shard.leads:
                local.append(p)
        elif module == "o_proj":
            local.append(_columns(p, *heads))
        elif module == "down_proj":
            cols = shard.columns(p.shape[1])
            local.append(_columns(p, cols.start, cols.stop))
        else:
            local.append(p)
    return local


def _rows(p: Param, begin: int, end: int) -> Param:
    (piece,) = p.pieces
    return replace(p, shape=(end - begin, *p.shape[1:]), pieces=(replace(piece, rows=(begin, end)),))


def _columns(p: Param, begin: int, end: int) -> Param:
    (piece,) = p.pieces
    return replace(p, shape=(*p.shape[:-1], end - begin), pieces=(replace(piece, cols=(begin, end)),))


def _heads(p: Param, kv_heads: tuple[int, ...], d: int) -> Param:
    (piece,) = p.pieces
    pieces = tuple(replace(piece, index=(slice(j * d, (j + 1) * d),), rows=(g * d, (g + 1) * d)) for j, g in enumerate(kv_heads))
    return replace(p, shape=(len(kv_heads) * d, *p.shape[1:]), pieces=pieces)


def _gate_up(p: Param, cols: range) -> Param:
    """Gate rows then up rows, each cut to this rank's columns of the intermediate width."""
    gate, up = p.pieces
    n, rows = len(cols), (cols.start, cols.stop)
    pieces = (replace(gate, index=(slice(0, n),), rows=rows), replace(up, index=(slice(n, 2 * n),), rows=rows))
    return replace(p, shape=(2 * n, *p.shape[1:]), pieces=pieces)


def _experts(p: Param, owned: range) -> Param:
    shape = (len(owned), *p.shape[1:])
    if p.pieces[0].index == ():  # one stacked checkpoint tensor [E, ...]: this rank's experts are rows of it
        (piece,) = p.pieces
        return replace(p, shape=shape, pieces=(replace(piece, rows=(owned.start, owned.stop)),))
    pieces = tuple(replace(q, index=(q.index[0] - owned.start, *q.index[1:])) for q in p.pieces if q.index[0] in owned)
    return replace(p, shape=shape, pieces=pieces)
