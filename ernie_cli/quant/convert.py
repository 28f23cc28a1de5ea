"""`ernie quantize`: a float ERNIE checkpoint in, an int8/int4 checkpoint out, streamed.

Memory stays bounded whatever the model size: the output layout is planned from config.json before
any weight is read, each weight is read (with plain reads, see io.py) and quantized one block at a
time (one routed expert, or a block of rows of a large matrix), and its bytes go straight into the
output shard. The largest thing ever held is one quantized stacked-expert tensor of one layer
(0.25 GB in int4, 0.5 GB in int8 for the 21B model) plus the float32 copy of one expert.

The output is written into a hidden sibling directory and renamed at the very end, so an
interrupted run never leaves anything under OUTPUT's name.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from ernie_cli.checkpoint import Checkpoint, TensorReader
from ernie_cli.config import load_config
from ernie_cli.errors import ErnieError
from ernie_cli.layout import Param, plan
from ernie_cli.quant import formats
from ernie_cli.quant.io import OutTensor, ShardWriter
from ernie_cli.quant.spec import QuantSpec
from ernie_cli.files import TOKENIZER_FILES

SOURCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEFAULT_SHARD_BYTES = 2 * 1024**3
BLOCK_ELEMENTS = 1 << 23  # rows of a large matrix are quantized this many weights at a time (32 MB in float32)
COPIED_FILES = (
    "generation_config.json",
    *TOKENIZER_FILES,
    "chat_template.jinja",
    "chat_template.json",
    "LICENSE",
    "LICENSE.txt",
    "LICENSE.md",
    "NOTICE",
)

Progress = Callable[[int, int], None]  # (source bytes done, source bytes total)


# ---- reading one parameter of a float checkpoint -----------------------------------------------------


def _piece_rows(param: Param, piece, unit: int | None) -> tuple[tuple, int, int] | None:
    """(index inside the unit, first row, end row) of a row-sliced piece, or None if it is not in `unit`."""
    index = piece.index
    if unit is not None:
        if index[0] != unit:
            return None
        index = index[1:]
    rows = param.shape[-2]
    if not index:
        return index, 0, rows
    s = index[0]
    return index, s.start, s.stop


def read_block(param: Param, reader: TensorReader, unit: int | None, begin: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [begin, end) of a 2-D parameter (or of expert `unit` of a stacked one), assembled from its pieces."""
    cols = param.shape[-1]
    out = torch.empty((end - begin, cols), dtype=dtype)
    for piece in param.pieces:
        if unit is not None and piece.index == ():  # the stacked tensor is one file tensor: read this expert's rows
            first = unit * param.shape[-2]
            out.copy_(reader.read(piece.source, rows=(first + begin, first + end)))
            continue
        where = _piece_rows(param, piece, unit)
        if where is None:
            continue
        _, r0, r1 = where
        lo, hi = max(begin, r0), min(end, r1)
        if lo < hi:
            out[lo - begin : hi - begin].copy_(reader.read(piece.source, rows=(lo - r0, hi - r0)))
    return out


def read_whole(param: Param, reader: TensorReader, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A parameter assembled as the float loader does it (used for the small unquantized ones)."""
    dtype = dtype or reader.tensors[param.pieces[0].source].dtype
    out = torch.empty(param.shape, dtype=dtype)
    for piece in param.pieces:
        out[piece.index].copy_(reader.read(piece.source).reshape(out[piece.index].shape))
    return out


def _blocks(rows: int, cols: int):
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    for begin in range(0, rows, step):
        yield begin, min(rows, begin + step)


_POOL: ThreadPoolExecutor | None = None


def _worker_init() -> None:
    torch.set_num_threads(1)  # per thread: one single-threaded worker per core beats two-thread ops on small blocks


def worker_pool() -> ThreadPoolExecutor:
    """Workers that quantize blocks side by side (torch ops release the GIL), one per core."""
    global _POOL
    if _POOL is None:
        workers = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)))
        _POOL = ThreadPoolExecutor(workers, thread_name_prefix="ernie-quant", initializer=_worker_init)
    return _POOL


def quantize_param(
    param: Param,
    reader: TensorReader,
    fmt: str,
    group_size: int,
    steps: int,
    device: torch.device | None = None,
    on_block: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """One weight of a float checkpoint quantized block by block: {"qweight", "scales"[, "zeros"]} in the disk layout.

    On the CPU the blocks (one expert, or up to BLOCK_ELEMENTS weights of rows) are read and
    quantized by the worker pool, one block per core; on a GPU one after the other.
    """
    device = device or torch.device("cpu")
    shapes = formats.quantized_shapes(fmt, param.shape, group_size)
    out = {k: torch.empty(s, dtype=d, device=device) for k, (s, d) in shapes.items()}
    stacked = len(param.shape) == 3
    rows, cols = param.shape[-2:]
    units = range(param.shape[0]) if stacked else [None]
    blocks = [(unit, begin, end) for unit in units for begin, end in _blocks(rows, cols)]

    def work(block) -> int:
        unit, begin, end = block
        w = read_block(param, reader, unit, begin, end, torch.float32).to(device)
        for key, value in formats.quantize(fmt, w, group_size, steps).items():
            (out[key][unit] if stacked else out[key])[begin:end] = value
        return (end - begin) * cols

    results = worker_pool().map(work, blocks) if device.type == "cpu" and len(blocks) > 1 else map(work, blocks)
    for n in results:
        if on_block:
            on_block(n)
    return out


def check_source(source: Path) -> tuple:
    """(config, checkpoint, plan) of a float ERNIE checkpoint, or a clear refusal."""
    cfg = load_config(source)
    if cfg.quantization is not None:
        raise ErnieError(
            f"{source} is already quantized (its config.json has a quantization_config): "
            "quantize the original bf16, fp16 or fp32 checkpoint instead."
        )
    ckpt = Checkpoint(source)
    for name, info in ckpt.tensors.items():
        if info.dtype not in SOURCE_DTYPES:
            raise ErnieError(
                f"{info.file.name}: tensor {name} is {str(info.dtype).removeprefix('torch.')}; "
                "`ernie quantize` needs a bf16, fp16 or fp32 ERNIE checkpoint."
            )
    return cfg, ckpt, plan(cfg, ckpt)


def output_plan(params: list[Param], ckpt: Checkpoint, spec: QuantSpec) -> list[OutTensor]:
    out = []
    for param in params:
        fmt = spec.format_of(param.name)
        if fmt is None:
            dtype = torch.float32 if param.keep_fp32 else ckpt.tensors[param.pieces[0].source].dtype
            out.append(OutTensor(param.name, dtype, tuple(param.shape)))
        else:
            for suffix, (shape, dtype) in formats.quantized_shapes(fmt, param.shape, spec.group_size).items():
                out.append(OutTensor(f"{param.name}.{suffix}", dtype, tuple(shape)))
    return out


# ---- the output directory ---------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(output: Path) -> None:
    """Leftovers of killed runs for the same OUTPUT (their process is gone) are deleted."""
    for path in output.parent.glob(f".{output.name}.incomplete-*"):
        try:
            pid = int(path.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def check_output(source: Path, output: Path, force: bool) -> None:
    src, out = source.resolve(), output.resolve()
    if out == src or src.is_relative_to(out) or out.is_relative_to(src):
        raise ErnieError(f"OUTPUT {output} overlaps SOURCE {source}: choose an OUTPUT directory outside the source model.")
    if output.exists() and not force:
        raise ErnieError(f"{output} already exists: pass --force to replace it, or choose another OUTPUT.")
    if output.exists() and not output.is_dir():
        raise ErnieError(f"{output} exists and is not a directory: choose another OUTPUT.")


def _check_space(directory: Path, need: int) -> None:
    free = shutil.disk_usage(directory).free
    if need > free:
        gb = 1e9
        raise ErnieError(f"the quantized model needs about {need / gb:.1f} GB but {directory} has {free / gb:.1f} GB free: free some space or choose another OUTPUT.")


def _write_config(source: Path, tmp: Path, spec: QuantSpec) -> None:
    raw = json.loads((source / "config.json").read_text(encoding="utf-8"))
    raw["quantization_config"] = spec.to_config()
    (tmp / "config.json").write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _copy_side_files(source: Path, tmp: Path) -> list[str]:
    copied = []
    for name in COPIED_FILES:
        f = source / name
        if f.is_file():
            shutil.copy2(f, tmp / name)
            copied.append(name)
    return copied


def _install(tmp: Path, output: Path) -> None:
    """Rename the finished temporary directory to OUTPUT (replacing an old one only now)."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.replaced-{os.getpid()}"
        os.rename(output, old)
    os.rename(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def quantize_checkpoint(
    source: Path | str,
    output: Path | str,
    spec: QuantSpec,
    force: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Progress | None = None,
) -> dict:
    """Quantize SOURCE into OUTPUT; returns a summary (sizes, seconds, throughput)."""
    source, output = Path(source), Path(output)
    t0 = time.perf_counter()
    cfg, ckpt, params = check_source(source)
    check_output(source, output, force)
    outs = output_plan(params, ckpt, spec)
    out_bytes = sum(t.nbytes for t in outs)
    output.parent.mkdir(parents=True, exist_ok=True)
    _check_space(output.parent, out_bytes + (64 << 20))
    _remove_stale_partials(output)

    tmp = output.parent / f".{output.name}.incomplete-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    reader = TensorReader(ckpt)
    writer = ShardWriter(tmp, outs, shard_bytes)
    total = sum(ckpt.tensors[p.source].nbytes for param in params for p in param.pieces)
    done = 0
    try:
        for param in params:
            fmt = spec.format_of(param.name)
            if fmt is None:
                value = read_whole(param, reader, torch.float32 if param.keep_fp32 else None)
                writer.write(param.name, value)
                done += sum(ckpt.tensors[p.source].nbytes for p in param.pieces)
                if progress:
                    progress(done, total)
                continue
            size = ckpt.tensors[param.pieces[0].source].dtype.itemsize

            def advance(n: int, size=size) -> None:
                nonlocal done
                done += n * size
                if progress:
                    progress(done, total)

            tensors = quantize_param(param, reader, fmt, spec.group_size, spec.refine_steps, on_block=advance)
            for suffix, value in tensors.items():
                writer.write(f"{param.name}.{suffix}", value)
            del tensors
        writer.finish()
        _write_config(source, tmp, spec)
        copied = _copy_side_files(source, tmp)
        _install(tmp, output)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        reader.close()
    seconds = time.perf_counter() - t0
    return {
        "source": str(source),
        "output": str(output),
        "source_bytes": total,
        "output_bytes": out_bytes,
        "shards": len(writer.shards),
        "seconds": seconds,
        "source_mb_per_s": total / 1e6 / seconds if seconds else 0.0,
        "copied_files": copied,
        "config": cfg,
    }
