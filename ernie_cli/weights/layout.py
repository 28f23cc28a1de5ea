"""Where each model parameter comes from in a checkpoint.

Two layouts exist for the same weights (../shared/docs/ernie-architecture.md §3):
- the hub layout (transformers 4.x module names, what `save_pretrained` writes): one tensor per
  expert and per projection, the correction bias under `mlp.moe_statics`;
- the transformers-5 in-memory layout: `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first),
  `mlp.experts.down_proj` [E, H, I], the bias under `mlp.gate.moe_statics`.
Our parameters are fused/stacked (gate+up in one matrix, experts in one tensor), so a parameter is
assembled from one or more pieces, each copied into a slice of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ernie_cli.errors import ErnieError
from ernie_cli.model.config import ErnieConfig
from ernie_cli.weights.checkpoint import Checkpoint

P = "model."


@dataclass(frozen=True)
class Piece:
    source: str  # tensor name in the checkpoint
    index: tuple  # where it lands in the parameter: a tuple of ints/slices (empty = all of it)
    shape: tuple[int, ...]  # the shape the checkpoint must hold
    # Only part of the tensor, for one rank of a tensor-parallel run (parallel/shard.py):
    rows: tuple[int, int] | None = None  # [begin, end) along its first dimension
    cols: tuple[int, int] | None = None  # [begin, end) along its last dimension


@dataclass(frozen=True)
class Param:
    name: str  # our state_dict key
    shape: tuple[int, ...]
    keep_fp32: bool  # the router stays float32 whatever the model dtype
    pieces: tuple[Piece, ...]


def _whole(name: str, source: str, shape: tuple[int, ...], keep_fp32: bool = False) -> Param:
    return Param(name, shape, keep_fp32, (Piece(source, (), shape),))


def _gate_up(name: str, gate: str, up: str, rows: int, cols: int | None) -> Param:
    """Fuse a gate and an up projection (weight [rows, cols] or bias [rows]) into one, gate first."""
    part = (rows,) if cols is None else (rows, cols)
    shape = (2 * rows,) if cols is None else (2 * rows, cols)
    return Param(name, shape, False, (Piece(gate, (slice(0, rows),), part), Piece(up, (slice(rows, 2 * rows),), part)))


def _mlp(ours: str, theirs: str, hidden: int, inter: int, bias: bool) -> list[Param]:
    params = [
        _gate_up(f"{ours}.gate_up_proj.weight", f"{theirs}.gate_proj.weight", f"{theirs}.up_proj.weight", inter, hidden),
        _whole(f"{ours}.down_proj.weight", f"{theirs}.down_proj.weight", (hidden, inter)),
    ]
    if bias:
        params += [
            _gate_up(f"{ours}.gate_up_proj.bias", f"{theirs}.gate_proj.bias", f"{theirs}.up_proj.bias", inter, None),
            _whole(f"{ours}.down_proj.bias", f"{theirs}.down_proj.bias", (hidden,)),
        ]
    return params


def _experts(cfg: ErnieConfig, i: int, ckpt: Checkpoint) -> list[Param]:
    e, h, n = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    ours, theirs = f"layers.{i}.mlp.experts", f"{P}layers.{i}.mlp.experts"
    if f"{theirs}.gate_up_proj" in ckpt.tensors:  # transformers-5 fused names
        return [
            _whole(f"{ours}.gate_up_proj", f"{theirs}.gate_up_proj", (e, 2 * n, h)),
            _whole(f"{ours}.down_proj", f"{theirs}.down_proj", (e, h, n)),
        ]
    gate_up = []
    down = []
    for j in range(e):
        gate_up.append(Piece(f"{theirs}.{j}.gate_proj.weight", (j, slice(0, n)), (n, h)))
        gate_up.append(Piece(f"{theirs}.{j}.up_proj.weight", (j, slice(n, 2 * n)), (n, h)))
        down.append(Piece(f"{theirs}.{j}.down_proj.weight", (j,), (h, n)))
    return [
        Param(f"{ours}.gate_up_proj", (e, 2 * n, h), False, tuple(gate_up)),
        Param(f"{ours}.down_proj", (e, h, n), False, tuple(down)),
    ]


def _router(cfg: ErnieConfig, i: int, ckpt: Checkpoint) -> list[Param]:
    ours, theirs = f"layers.{i}.mlp.gate", f"{P}layers.{i}.mlp"
    bias_source = f"{theirs}.moe_statics.e_score_correction_bias"
    if bias_source not in ckpt.tensors and f"{theirs}.gate.moe_statics.e_score_correction_bias" in ckpt.tensors:
        bias_source = f"{theirs}.gate.moe_statics.e_score_correction_bias"
    bias_shape = ckpt.tensors[bias_source].shape if bias_source in ckpt.tensors else (1, cfg.num_experts)
    if bias_shape == (cfg.num_experts,):  # some converters squeeze the [1, E] bias
        bias_shape = (cfg.num_experts,)
    else:
        bias_shape = (1, cfg.num_experts)
    bias = Param(f"{ours}.e_score_correction_bias", (cfg.num_experts,), True, (Piece(bias_source, (), bias_shape),))
    return [_whole(f"{ours}.weight", f"{theirs}.gate.weight", (cfg.num_experts, cfg.hidden_size), keep_fp32=True), bias]


def plan(cfg: ErnieConfig, ckpt: Checkpoint) -> list[Param]:
    """Every parameter of ErnieForCausalLM(cfg) and its pieces in `ckpt`, validated against the files."""
    h, d, bias = cfg.hidden_size, cfg.head_dim, cfg.use_bias
    params = [_whole("embed_tokens.weight", f"{P}embed_tokens.weight", (cfg.vocab_size, h))]
    for i in range(cfg.num_hidden_layers):
        ours, theirs = f"layers.{i}", f"{P}layers.{i}"
        params += [
            _whole(f"{ours}.input_layernorm.weight", f"{theirs}.input_layernorm.weight", (h,)),
            _whole(f"{ours}.post_attention_layernorm.weight", f"{theirs}.post_attention_layernorm.weight", (h,)),
        ]
        for proj, out_dim in (("q", cfg.num_attention_heads * d), ("k", cfg.num_key_value_heads * d), ("v", cfg.num_key_value_heads * d)):
            params.append(_whole(f"{ours}.self_attn.{proj}_proj.weight", f"{theirs}.self_attn.{proj}_proj.weight", (out_dim, h)))
            if bias:
                params.append(_whole(f"{ours}.self_attn.{proj}_proj.bias", f"{theirs}.self_attn.{proj}_proj.bias", (out_dim,)))
        params.append(_whole(f"{ours}.self_attn.o_proj.weight", f"{theirs}.self_attn.o_proj.weight", (h, cfg.num_attention_heads * d)))
        if bias:
            params.append(_whole(f"{ours}.self_attn.o_proj.bias", f"{theirs}.self_attn.o_proj.bias", (h,)))
        if cfg.is_moe_layer(i):
            params += _router(cfg, i, ckpt)
            params += _experts(cfg, i, ckpt)
            shared = cfg.moe_intermediate_size * cfg.num_shared_experts
            if shared:
                params += _mlp(f"{ours}.mlp.shared_experts", f"{theirs}.mlp.shared_experts", h, shared, bias)
        else:
            params += _mlp(f"{ours}.mlp", f"{theirs}.mlp", h, cfg.intermediate_size, bias)
    params.append(_whole("norm.weight", f"{P}norm.weight", (h,)))
    if not cfg.tie_word_embeddings:
        params.append(_whole("lm_head.weight", "lm_head.weight", (cfg.vocab_size, h)))
    _validate(params, cfg, ckpt)
    return params


def _ignored(name: str, cfg: ErnieConfig) -> bool:
    """Tensors every ERNIE loader skips: the multi-token-prediction block, and a head that is tied."""
    return "mtp" in name or (name == "lm_head.weight" and cfg.tie_word_embeddings)


def _validate(params: list[Param], cfg: ErnieConfig, ckpt: Checkpoint) -> None:
    used = set()
    for param in params:
        for piece in param.pieces:
            info = ckpt.tensors.get(piece.source)
            if info is None:
                where = ckpt.files[0].name if len(ckpt.files) == 1 else f"{ckpt.dir.name}'s {len(ckpt.files)} shards"
                raise ErnieError(f"tensor {piece.source} is missing from {where}: the checkpoint does not match config.json; re-download the model.")
            if info.shape != piece.shape:
                raise ErnieError(
                    f"{info.file.name}: tensor {piece.source} has shape {list(info.shape)}, config.json implies {list(piece.shape)}; "
                    "the checkpoint and its config do not match."
                )
            if not info.dtype.is_floating_point:
                raise ErnieError(f"{info.file.name}: tensor {piece.source} is {info.dtype}, not a float; quantized checkpoints need their quantization_config.")
            used.add(piece.source)
    for name, info in ckpt.tensors.items():
        if name not in used and not _ignored(name, cfg):
            raise ErnieError(f"{info.file.name}: unexpected tensor {name} for this config.json; the checkpoint and its config do not match.")
