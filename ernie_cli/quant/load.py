"""Building a quantized ErnieForCausalLM: from an `ernie quantize` directory, or from a float
checkpoint quantized while it loads.

Either way the model is built on the meta device, and each quantized weight goes into its runtime
module as soon as it exists, so the host never holds the float model: loading a quantized
directory costs about its size on disk, quantizing while loading about the quantized size plus one
block of float32 being worked on.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ernie_cli.errors import ErnieError
from ernie_cli.kernels.ops import choose_backend
from ernie_cli.model.config import ErnieConfig
from ernie_cli.model.ernie import ErnieForCausalLM, set_param
from ernie_cli.quant import formats
from ernie_cli.quant.convert import quantize_param, read_whole
from ernie_cli.quant.spec import QuantSpec
from ernie_cli.quant.weight import QuantWeight
from ernie_cli.weights.checkpoint import Checkpoint, TensorReader


def _is_fp32(name: str) -> bool:
    return name.endswith(("mlp.gate.weight", "e_score_correction_bias"))


def model_params(cfg: ErnieConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of ErnieForCausalLM(cfg), from the meta model."""
    with torch.device("meta"):
        model = ErnieForCausalLM(cfg)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def model_bytes(cfg: ErnieConfig, spec: QuantSpec, dtype: torch.dtype) -> int:
    """Memory the quantized model's weights take (the estimate checked before loading)."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name, shape in model_params(cfg):
        fmt = spec.format_of(name)
        if fmt is not None:
            total += formats.quantized_nbytes(fmt, shape, spec.group_size)
        else:
            n = 1
            for s in shape:
                n *= s
            total += n * (4 if _is_fp32(name) else size)
    return total


def prefill_scratch_bytes(cfg: ErnieConfig, spec: QuantSpec, dtype: torch.dtype, device: torch.device) -> int:
    """Memory a CUDA prefill needs beyond the weights: gpu_dequant expands each quantized weight to
    floats in a buffer kept per shape, the largest being one layer's routed experts (1.5 GB in bf16
    for the 21B). q/k/v merged for the decode graph add one shape. Where the decode graph moves the
    shared experts into the routed stack (fuse.shared_into_experts), the stack grows by exactly
    the shared MLP's two shapes, which then need no buffer of their own, so the sum still holds.
    Nothing on other devices, where the expanded weights are temporaries or do not exist."""
    if device.type != "cuda":
        return 0
    shapes = {
        shape for name, shape in model_params(cfg)
        if spec.format_of(name) is not None and not name.startswith(("embed_tokens.", "lm_head."))  # the head sees one token
    }
    if spec.format_of("layers.0.self_attn.q_proj.weight") is not None:
        kv = cfg.num_key_value_heads * cfg.head_dim
        shapes.add((cfg.num_attention_heads * cfg.head_dim + 2 * kv, cfg.hidden_size))
    size = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(shape) for shape in shapes) * size


# ---- putting modules in place --------------------------------------------------------------------


def install(
    model: ErnieForCausalLM, name: str, fmt: str, tensors: dict[str, torch.Tensor], shape: tuple[int, ...],
    group_size: int, device: torch.device, dtype: torch.dtype, backend: str | None = None,
) -> None:
    """Put the quantized weight `name` (disk layout) into the model where its float weight would be
    (on `backend`, by default the one choose_backend picks)."""
    if name == "embed_tokens.weight" and fmt != "int8":
        raise ErnieError("the embedding can only be stored as int8; re-create the checkpoint with `ernie quantize`.")
    backend = backend or choose_backend(fmt, group_size, device, shape[-1])
    set_param(model, name, QuantWeight(fmt, shape, group_size, backend).load(tensors, device))


def finish(model: ErnieForCausalLM, spec: QuantSpec) -> ErnieForCausalLM:
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]  # a quantized weight's tensors are never meta
    if left:
        raise RuntimeError(f"parameters never loaded: {left[:3]}")
    model.quantization = spec
    model.eval()
    return model


# ---- a quantized directory -------------------------------------------------------------------------


def expected_tensors(cfg: ErnieConfig, spec: QuantSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Every tensor a quantized checkpoint of cfg holds: name -> (shape, dtype; None = any float)."""
    out: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    for name, shape in model_params(cfg):
        fmt = spec.format_of(name)
        if fmt is None:
            out[name] = (shape, None)
        else:
            for suffix, (s, dtype) in formats.quantized_shapes(fmt, shape, spec.group_size).items():
                out[f"{name}.{suffix}"] = (tuple(s), dtype)
    return out


def _validate(ckpt: Checkpoint, expected: dict) -> None:
    where = ckpt.files[0].name if len(ckpt.files) == 1 else f"{ckpt.dir.name}'s {len(ckpt.files)} shards"
    for name, (shape, dtype) in expected.items():
        info = ckpt.tensors.get(name)
        if info is None:
            raise ErnieError(f"tensor {name} is missing from {where}: the quantized checkpoint is incomplete or does not match its config.json; re-create it with `ernie quantize`.")
        if info.shape != shape:
            raise ErnieError(f"{info.file.name}: tensor {name} has shape {list(info.shape)}, config.json implies {list(shape)}; the checkpoint and its config do not match.")
        ok = info.dtype.is_floating_point if dtype is None else info.dtype == dtype
        if not ok:
            want = "a float" if dtype is None else str(dtype).removeprefix("torch.")
            raise ErnieError(f"{info.file.name}: tensor {name} is {str(info.dtype).removeprefix('torch.')}, its quantization_config says {want}; re-create the checkpoint with `ernie quantize`.")
    for name, info in ckpt.tensors.items():
        if name not in expected:
            raise ErnieError(f"{info.file.name}: unexpected tensor {name} for this config.json; the checkpoint and its config do not match.")


def load_quantized_dir(model_dir: Path, cfg: ErnieConfig, device: torch.device, dtype: torch.dtype, progress=None, check_fits=None) -> ErnieForCausalLM:
    spec = QuantSpec.from_config(cfg.quantization, f"{model_dir}/config.json")
    ckpt = Checkpoint(model_dir)
    expected = expected_tensors(cfg, spec)
    _validate(ckpt, expected)
    if check_fits:
        check_fits(model_bytes(cfg, spec, dtype) + prefill_scratch_bytes(cfg, spec, dtype, device))
    with torch.device("meta"):
        model = ErnieForCausalLM(cfg)
    reader = TensorReader(ckpt)
    total, done = sum(info.nbytes for info in ckpt.tensors.values()), 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    copier = None
    if device.type == "cuda":  # every tensor queued at once on the staging workers
        from ernie_cli.weights.staging import StagedCopier

        copier = StagedCopier(reader, device)
    try:
        with torch.no_grad():
            for name, shape in model_params(cfg):
                fmt = spec.format_of(name)
                if fmt is None:
                    target = torch.float32 if _is_fp32(name) else dtype
                    if copier is not None:
                        set_param(model, name, copier.tensor(name, target))
                        continue
                    value = reader.read(name)
                    set_param(model, name, value.to(device=device, dtype=target))
                    advance(value.nbytes)
                else:
                    # The native CPU kernels read the file layout, at any alignment: their weights stay
                    # views of the mapped files (TensorReader.map). torch's int kernels want their own
                    # aligned, repacked copies; on CUDA the file layout lands on the GPU as it is.
                    backend = choose_backend(fmt, spec.group_size, device, shape[-1])
                    get = copier.tensor if copier is not None else reader.map if backend == "native" else reader.read
                    tensors = {s: get(f"{name}.{s}") for s in formats.quantized_shapes(fmt, shape, spec.group_size)}
                    install(model, name, fmt, tensors, shape, spec.group_size, device, dtype, backend)
                    if copier is None:
                        advance(sum(t.nbytes for t in tensors.values()))
                    del tensors
            if copier is not None:
                copier.wait(advance)
    finally:
        if copier is not None:
            copier.close()
        reader.close()
    return finish(model, spec)


# ---- a float checkpoint, quantized on the way in ----------------------------------------------------


def quantize_while_loading(
    model_dir: Path, cfg: ErnieConfig, ckpt: Checkpoint, params: list, spec: QuantSpec,
    device: torch.device, dtype: torch.dtype, progress=None,
) -> ErnieForCausalLM:
    """`params` is layout.plan(cfg, ckpt): each weight is quantized (on `device`) as it is assembled."""
    with torch.device("meta"):
        model = ErnieForCausalLM(cfg)
    reader = TensorReader(ckpt)
    total = sum(ckpt.tensors[p.source].nbytes for param in params for p in param.pieces)
    done = 0
    work = device  # quantizing is elementwise work: the GPU does it far faster than two CPU cores
    try:
        with torch.no_grad():
            for param in params:
                fmt = spec.format_of(param.name)
                size = ckpt.tensors[param.pieces[0].source].dtype.itemsize
                if fmt is None:
                    value = read_whole(param, reader)
                    target = torch.float32 if param.keep_fp32 else dtype
                    set_param(model, param.name, value.to(device=device, dtype=target))
                    done += sum(ckpt.tensors[p.source].nbytes for p in param.pieces)
                    if progress:
                        progress(done, total)
                    continue

                def advance(n: int, size=size) -> None:
                    nonlocal done
                    done += n * size
                    if progress:
                        progress(done, total)

                tensors = quantize_param(param, reader, fmt, spec.group_size, spec.refine_steps, device=work, on_block=advance)
                install(model, param.name, fmt, tensors, tuple(param.shape), spec.group_size, device, dtype)
                del tensors
    finally:
        reader.close()
    return finish(model, spec)


# ---- a float model already in memory ---------------------------------------------------------------


def _quantize_tensor(fmt: str, w: torch.Tensor, group_size: int, steps: int) -> dict[str, torch.Tensor]:
    """Quantize a float weight [out, in] or stack [E, out, in] a matrix (or a block of rows) at a time."""
    shapes = formats.quantized_shapes(fmt, tuple(w.shape), group_size)
    out = {k: torch.empty(s, dtype=d, device=w.device) for k, (s, d) in shapes.items()}
    mats = w.view(-1, *w.shape[-2:])
    rows, cols = w.shape[-2:]
    step = max(1, (1 << 23) // cols)
    for e in range(mats.shape[0]):
        for begin in range(0, rows, step):
            q = formats.quantize(fmt, mats[e, begin : begin + step], group_size, steps)
            for key, value in q.items():
                target = out[key].view(-1, *out[key].shape[-2:])[e] if key == "qweight" or fmt == "int4" else out[key].view(-1, rows)[e]
                target[begin : begin + step] = value
    return out


@torch.no_grad()
def quantize_in_place(model: ErnieForCausalLM, spec: QuantSpec) -> ErnieForCausalLM:
    """Quantize a float model in place (random weights for benchmarks, say), one weight at a time so
    each float weight is freed as soon as its quantized form replaces it."""
    device, dtype = model.device, model.dtype
    for name, w in list(model.named_parameters()):
        quantize_weight(model, name, w, spec, device, dtype)
        del w
    return finish(model, spec)


def quantize_weight(model: ErnieForCausalLM, name: str, w: torch.Tensor, spec: QuantSpec, device, dtype) -> bool:
    """Put weight `name` in place quantized, where the spec quantizes it; False where it does not."""
    fmt = spec.format_of(name)
    if fmt is None:
        return False
    tensors = _quantize_tensor(fmt, w, spec.group_size, spec.refine_steps)
    install(model, name, fmt, tensors, tuple(w.shape), spec.group_size, device, dtype)
    return True

