"""Build an ErnieForCausalLM on a device from a checkpoint directory (or from random numbers).

The model is first built on the meta device (no memory), then each parameter is allocated once on
the target device and filled piece by piece from the safetensors files (positional reads, see
checkpoint.py). At any moment the host holds the parameters loaded so far plus the one tensor being
copied: never the model twice.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path
from typing import Callable

import torch

from ernie_cli.cachedir import set_compiler_cache_env
from ernie_cli.errors import ErnieError
from ernie_cli.model.config import ErnieConfig, load_config
from ernie_cli.model.ernie import ErnieForCausalLM, set_param
from ernie_cli.parallel.shard import Shard, local_plan
from ernie_cli.weights.checkpoint import Checkpoint
from ernie_cli.weights.layout import Param, Piece, plan

DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def resolve_device(name: str = "auto") -> torch.device:
    device = _device(name)
    if device.type == "cuda":  # Triton compiles ernie's kernels on first use, compiled or not
        set_compiler_cache_env()
    return device


def start_device(device: torch.device) -> None:
    """Create the CUDA context now (a second or more), so that its cost is not counted as reading."""
    if device.type == "cuda":
        torch.zeros(1, device=device)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ErnieError(f"unknown device {name!r}: use auto, cpu or cuda[:N].") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ErnieError("CUDA was asked for but no CUDA GPU is available to torch: use --device cpu, or install a CUDA build of torch.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ErnieError(f"{name} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s).")
    elif device.type != "cpu":
        raise ErnieError(f"device {name!r} is not supported: use auto, cpu or cuda[:N].")
    return device


def resolve_dtype(name: str | None, cfg: ErnieConfig, device: torch.device) -> torch.dtype:
    """auto: the checkpoint's own float dtype (bf16 for the released models)."""
    name = _ALIASES.get(name or "auto", name or "auto")
    if name == "auto":
        name = cfg.torch_dtype if cfg.torch_dtype in DTYPE_NAMES else "bfloat16"
    if name not in DTYPE_NAMES:
        raise ErnieError(f"unknown dtype {name!r}: use auto, bfloat16, float16 or float32.")
    return DTYPE_NAMES[name]


# ---- memory ------------------------------------------------------------------------------------------


def parameter_bytes(params: list[Param], dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for p in params:
        n = 1
        for s in p.shape:
            n *= s
        total += n * (4 if p.keep_fp32 else size)
    return total


def proc_bytes(path: str, key: str) -> int | None:
    """A "key: N kB" line of a /proc file, in bytes; None where there is no such file or line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    found = proc_bytes("/proc/meminfo", "MemAvailable")
    return found if found is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def kv_cache_bytes(cfg: ErnieConfig, positions: int, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * positions * size


def activation_bytes(cfg: ErnieConfig, tokens: int, positions: int, dtype: torch.dtype) -> int:
    """Memory one forward over `tokens` new tokens (attending to `positions` keys, cached ones
    included) holds beyond the weights and the KV cache, generously, so that a refusal comes before
    the allocator fails: a layer's intermediates at their widest, all counted in float32 (RMSNorm,
    RoPE and the router compute in it), the attention mask and its float copy where new tokens
    follow a filled cache (attention itself runs in blocks: no T x S scores), and one row of logits."""
    h = cfg.hidden_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    mlp, router = cfg.intermediate_size, 0
    if cfg.is_moe:
        mlp = max(mlp, cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.num_shared_experts))
        router = 3 * cfg.num_experts + 4 * cfg.num_experts_per_tok  # logits, probabilities, ids and weights
    per_token = 4 * (8 * h + 2 * qkv + 4 * mlp + router)
    mask = tokens * positions * 5 if tokens > 1 and positions > tokens else 0
    return tokens * per_token + mask + 4 * cfg.vocab_size


def check_fits(need: int, device: torch.device, what: str) -> None:
    free = available_bytes(device)
    if need > free:
        gib = 1024**3
        raise ErnieError(
            f"{what} needs about {need / gib:.1f} GiB but only {free / gib:.1f} GiB is free on {device}: "
            "use a quantized copy (`ernie quantize SRC OUT --format int4`, about a quarter of the bf16 size), "
            "a smaller --max-context, or a device with more memory."
        )


# ---- building ----------------------------------------------------------------------------------------


def _empty_model(cfg: ErnieConfig, shard: Shard | None = None) -> ErnieForCausalLM:
    with torch.device("meta"):
        return ErnieForCausalLM(cfg, shard)


def prepare_for_decoding(model: ErnieForCausalLM, mode: str) -> ErnieForCausalLM:
    """The transforms a one-token step run as a CUDA graph wants (ernie_cli.weights.fuse: fewer,
    larger kernels), made once, before any decoder sees the model (mode: "graph" or "compile");
    eager steps keep the checkpoint's own matrices."""
    if mode in ("graph", "compile"):
        from ernie_cli.weights.fuse import fuse_for_decode

        fuse_for_decode(model)
    return model


def load_model(
    model_dir: Path | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    progress: Progress | None = None,
    reserve_bytes: int = 0,
    quantize: str | None = None,
    group_size: int | None = None,
    keep_embeddings: bool = False,
    shard: Shard | None = None,
) -> ErnieForCausalLM:
    """Load a checkpoint directory. reserve_bytes: extra memory the caller will need (KV cache).

    A directory made by `ernie quantize` (config.json has a quantization_config) loads quantized by
    itself. quantize="int8"/"int4" quantizes a float checkpoint while loading it (group_size and
    keep_embeddings as for `ernie quantize`); dtype is then the activation dtype.
    shard: one rank's part of a tensor-parallel model (parallel/shard.py), of a float checkpoint;
    only that part is read.
    """
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    device = resolve_device(device) if isinstance(device, str) else device
    if not isinstance(dtype, torch.dtype):
        dtype = resolve_dtype(dtype, cfg, device)
    if cfg.quantization is not None or quantize:
        if shard is not None:
            raise ErnieError("tensor-parallel runs load float checkpoints only: drop --quantize (or --tp), and point -m at a float checkpoint.")
        return _load_quantized(model_dir, cfg, device, dtype, progress, reserve_bytes, quantize, group_size, keep_embeddings)
    ckpt = Checkpoint(model_dir)
    params = plan(cfg, ckpt)
    copies = 1
    if shard is not None:
        params = local_plan(params, cfg, shard)
        if device.type == "cpu":
            copies = shard.group.world  # every rank's part comes out of the same host memory
    check_fits(copies * (parameter_bytes(params, dtype) + reserve_bytes), device, f"{model_dir.name} in {str(dtype).removeprefix('torch.')}")

    model = _empty_model(cfg, shard)
    total = sum(piece_bytes(ckpt, p) for param in params for p in param.pieces)
    for param in params:
        expected = tuple(model.get_parameter(param.name).shape)
        if param.shape != expected:  # set_param would take any shape; the forward would not
            raise RuntimeError(f"the load plan makes {param.name} {list(param.shape)}, the model holds {list(expected)}")
    whole = all(p.rows is None and p.cols is None for param in params for p in param.pieces)
    with torch.no_grad():
        if device.type == "cuda" and whole:
            _fill_on_gpu(model, params, ckpt, device, dtype, progress, total)
        else:
            _fill(model, params, ckpt, device, dtype, progress, total)
    ckpt.close()
    model.eval()
    return model


def _allocate(param: Param, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(param.shape, dtype=torch.float32 if param.keep_fp32 else dtype, device=device)


def _fill(model, params, ckpt, device, dtype, progress, total) -> None:
    done = 0
    for param in params:
        target = _allocate(param, dtype, device)
        for piece in param.pieces:
            src = read_piece(ckpt, piece).reshape(target[piece.index].shape)
            target[piece.index].copy_(src)
            done += piece_bytes(ckpt, piece)
            del src
            if progress:
                progress(done, total)
        set_param(model, param.name, target)


def _fill_on_gpu(model, params, ckpt, device, dtype, progress, total) -> None:
    """Every piece queued at once on the staging workers (weights/staging.py); the parameters are
    allocated up front, which is the memory they take anyway."""
    from ernie_cli.weights.staging import StagedCopier

    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    with StagedCopier(ckpt.reader, device) as copier:
        for param in params:
            target = _allocate(param, dtype, device)
            for piece in param.pieces:
                copier.copy(piece.source, target[piece.index])
            set_param(model, param.name, target)
        copier.wait(advance)


def read_piece(ckpt: Checkpoint, piece: Piece) -> torch.Tensor:
    """A piece's tensor, only its rows read from the file where it names rows. Its columns are
    strided on disk, so a piece that names columns is read whole and narrowed: only the row-parallel
    o_proj and down_proj of a tensor-parallel rank take one, a few matrices a layer, one at a time."""
    shape = piece.shape
    if piece.rows is not None and len(shape) >= 2:
        begin, end = piece.rows
        inner = math.prod(shape[1:-1])  # rows of the reader's [-1, last dim] view per row of dimension 0
        t = ckpt.get(piece.source, rows=(begin * inner, end * inner)).view(end - begin, *shape[1:])
    else:
        t = ckpt.get(piece.source)
        if piece.rows is not None:
            t = t[piece.rows[0] : piece.rows[1]]
    if piece.cols is not None:
        t = t[..., piece.cols[0] : piece.cols[1]]
    return t


def piece_bytes(ckpt: Checkpoint, piece: Piece) -> int:
    """The checkpoint bytes a piece stands for (its rows and columns of the tensor)."""
    info = ckpt.tensors[piece.source]
    n = info.nbytes
    if piece.rows is not None:
        n = n * (piece.rows[1] - piece.rows[0]) // info.shape[0]
    if piece.cols is not None:
        n = n * (piece.cols[1] - piece.cols[0]) // info.shape[-1]
    return n


def _load_quantized(model_dir, cfg, device, dtype, progress, reserve_bytes, quantize, group_size, keep_embeddings):
    from ernie_cli.quant import load as qload
    from ernie_cli.quant.spec import QuantSpec

    if cfg.quantization is not None:
        if quantize:
            raise ErnieError(f"{model_dir.name} is already quantized (its config.json has a quantization_config): drop --quantize.")

        def fits(need: int) -> None:
            check_fits(need + reserve_bytes, device, f"{model_dir.name} (quantized)")

        return qload.load_quantized_dir(model_dir, cfg, device, dtype, progress, fits)
    spec = QuantSpec.make(quantize, group_size, keep_embeddings)
    ckpt = Checkpoint(model_dir)
    params = plan(cfg, ckpt)
    need = qload.model_bytes(cfg, spec, dtype) + qload.prefill_scratch_bytes(cfg, spec, dtype, device)
    check_fits(need + reserve_bytes, device, f"{model_dir.name} quantized to {quantize}")
    return qload.quantize_while_loading(model_dir, cfg, ckpt, params, spec, device, dtype, progress)


def random_model(cfg: ErnieConfig, device: torch.device | str, dtype: torch.dtype, seed: int = 0, quantize=None,
                 shard: Shard | None = None) -> ErnieForCausalLM:
    """The architecture with random weights generated directly on the device (for sizing and
    benchmarks). quantize: a quant.spec.QuantSpec; each weight is then quantized as it is drawn, so
    memory never holds more than the quantized model and one float weight. shard: one rank's part
    of a split model, each weight drawn from a seed of its own name, so that the replicated ones
    (the router above all: every rank must route alike) are the same on every rank."""
    if quantize is not None:
        from ernie_cli.quant.load import finish, quantize_weight
    device = torch.device(device)
    model = _empty_model(cfg, shard)
    gen = torch.Generator(device=device).manual_seed(seed)
    split = shard is not None and shard.group.world > 1
    with torch.no_grad():
        for name, meta in list(model.named_parameters()):
            keep_fp32 = name.endswith(("mlp.gate.weight", "e_score_correction_bias"))
            value = torch.empty(meta.shape, dtype=torch.float32 if keep_fp32 else dtype, device=device)
            if name.endswith("norm.weight"):
                value.fill_(1.0)
            elif name.endswith("e_score_correction_bias") or name.endswith(".bias"):
                value.zero_()
            else:
                if split:
                    gen.manual_seed(seed + zlib.crc32(name.encode()))
                value.normal_(0.0, 0.02, generator=gen)
            if quantize is None or not quantize_weight(model, name, value, quantize, device, dtype):
                set_param(model, name, value)
            del value
    model.eval()
    return model if quantize is None else finish(model, quantize)

