"""`ernie quantize`: a float ERNIE checkpoint in, an int8/int4 checkpoint out, streamed.

Memory stays bounded whatever the model size: the output layout is planned from config.json before
any weight is read, each weight is read (with plain reads, see io.py) and quantized one block at a
time (one routed expert, or a block of rows of a large matrix), and its bytes go straight into the
output shard. The largest thing ever held is one quantized stacked-expert tensor of one layer
(0.25 GB in int4, 0.5 GB in int8 for the 21B model) plus the float32 copy of one expert.

The output is written into a hidden sibling directory and renamed at the very end, so an
interrupted run never leaves anything under OUTPUT's name. A lock file beside OUTPUT keeps a second
run from writing the same OUTPUT at the same time.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from ernie_cli.errors import ErnieError, os_reason
from ernie_cli.model.config import load_config
from ernie_cli.quant import formats
from ernie_cli.quant.io import OutTensor, ShardWriter
from ernie_cli.quant.spec import QUANT_METHOD, QuantSpec
from ernie_cli.weights.checkpoint import Checkpoint, TensorReader
from ernie_cli.weights.files import (
    CONFIG,
    SPM_COMPANIONS,
    SPM_MODEL,
    TOKENIZER_FILES,
    TOKENIZER_JSON,
)
from ernie_cli.weights.layout import Param, plan

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


def _read_finite(reader: TensorReader, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """A source tensor (or rows of it), refused if it holds NaN or Inf: those would quantize into
    scales of NaN and a model that silently answers garbage."""
    value = reader.read(name, rows=rows)
    # A NaN or Inf anywhere makes the sum non-finite; summing is ~50x cheaper than isfinite().all()
    # on the CPU. A sum that overflows on finite weights is told apart by the exact test.
    if not bool(torch.isfinite(value.sum())) and not bool(torch.isfinite(value).all()):
        raise ErnieError(
            f"tensor {name} in {reader.tensors[name].file.name} holds NaN or Inf values, so it cannot be quantized: "
            "the checkpoint is damaged or was saved from a diverged run; download or export it again."
        )
    return value


def read_block(param: Param, reader: TensorReader, unit: int | None, begin: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [begin, end) of a 2-D parameter (or of expert `unit` of a stacked one), assembled from its pieces."""
    cols = param.shape[-1]
    out = torch.empty((end - begin, cols), dtype=dtype)
    for piece in param.pieces:
        if unit is not None and piece.index == ():  # the stacked tensor is one file tensor: read this expert's rows
            first = unit * param.shape[-2]
            out.copy_(_read_finite(reader, piece.source, rows=(first + begin, first + end)))
            continue
        where = _piece_rows(param, piece, unit)
        if where is None:
            continue
        _, r0, r1 = where
        lo, hi = max(begin, r0), min(end, r1)
        if lo < hi:
            out[lo - begin : hi - begin].copy_(_read_finite(reader, piece.source, rows=(lo - r0, hi - r0)))
    return out


def read_whole(param: Param, reader: TensorReader, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A parameter assembled as the float loader does it (used for the small unquantized ones)."""
    dtype = dtype or reader.tensors[param.pieces[0].source].dtype
    out = torch.empty(param.shape, dtype=dtype)
    for piece in param.pieces:
        out[piece.index].copy_(_read_finite(reader, piece.source).reshape(out[piece.index].shape))
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

    if device.type != "cpu" or len(blocks) == 1:
        for block in blocks:
            n = work(block)
            if on_block:
                on_block(n)
        return out
    futures = [worker_pool().submit(work, block) for block in blocks]
    try:
        for future in futures:
            n = future.result()
            if on_block:
                on_block(n)
    except BaseException:
        # Blocks still running read from `reader`, which the caller closes on the way out.
        for future in futures:
            future.cancel()
        wait(futures)
        raise
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


_HELD_LOCKS: dict[str, int] = {}  # lock file -> nesting depth in this process


def _lock_holder(fd: int) -> str:
    """The pid written in a lock file by its holder (which writes it just after locking)."""
    for _ in range(50):
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        if text:
            return text
        time.sleep(0.02)
    return "unknown"


@contextmanager
def output_lock(output: Path | str, required: bool = True) -> Iterator[None]:
    """Hold OUTPUT for this process until the block ends: a second `ernie quantize` into the same
    OUTPUT is refused, naming this one, instead of both writing and one silently losing.

    The lock is flock() on `.OUTPUT.lock` beside OUTPUT, so the kernel releases it when the holder
    dies however it dies. The file is removed on the way out; whoever locks a file that was removed
    meanwhile sees another inode under the name and locks again. Nested calls in one process share
    the outer lock. Parent directories made for the lock are removed again if the run left them empty.
    Without `required`, an OUTPUT whose parent cannot hold the lock file runs unlocked (no other
    run could rename OUTPUT there either).
    """
    output = Path(output)
    path = output.parent / f".{output.name}.lock"
    key = os.path.abspath(path)
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[key] -= 1
        return
    made = [p for p in [output.parent, *output.parent.parents] if not p.exists()]
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ErnieError(f"cannot create {output.parent} for OUTPUT ({os_reason(exc)}): choose another OUTPUT.") from None
    try:
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                if not required and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    yield
                    return
                raise ErnieError(
                    f"cannot create the lock file {path} ({os_reason(exc)}): OUTPUT must be in a writable directory; choose another OUTPUT."
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                raise ErnieError(
                    f"another `ernie quantize` (pid {holder}) is using {output}: wait for it to finish, or choose another OUTPUT."
                ) from None
            try:
                on_disk = os.stat(path)
                mine = os.fstat(fd)
                if (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        _HELD_LOCKS[key] = 0
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            del _HELD_LOCKS[key]
            try:
                os.unlink(path)
            except OSError:
                pass
            os.close(fd)
    finally:
        for directory in made:  # innermost first
            try:
                directory.rmdir()
            except OSError:
                break


def _remove_stale_partials(output: Path) -> None:
    """Leftovers of killed runs for the same OUTPUT: an unfinished new copy, or an old copy that was
    moved aside just before the new one went in. Called under the output lock, so no live run owns them."""
    for kind in ("incomplete", "replaced"):
        for path in output.parent.glob(f".{glob.escape(output.name)}.{kind}-*"):
            if path.name.rsplit("-", 1)[1] != str(os.getpid()):
                shutil.rmtree(path, ignore_errors=True)


def has_tokenizer(model_dir: Path) -> bool:
    """Whether `model_dir` holds the files one of the tokenizer's loading routes needs."""
    if (model_dir / TOKENIZER_JSON).is_file():
        return True
    return (model_dir / SPM_MODEL).is_file() and all((model_dir / name).is_file() for name in SPM_COMPANIONS)


def is_replaceable_model(directory: Path) -> bool:
    """Whether --force may delete `directory`: empty, an earlier `ernie quantize` output, or an ERNIE
    4.5 checkpoint. Anything else may hold the user's own files."""
    try:
        if not any(directory.iterdir()):
            return True
        raw = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(raw, dict):
        return False
    quant = raw.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD:
        return True
    try:
        load_config(directory)
    except ErnieError:
        return False
    return any(directory.glob("*.safetensors"))


def check_output(output: Path, force: bool, source: Path | None = None) -> None:
    """Refuse an OUTPUT that this run must not write or replace, before any work is done."""
    if source is not None:
        src, out = source.resolve(), output.resolve()
        if out == src or src.is_relative_to(out) or out.is_relative_to(src):
            raise ErnieError(f"OUTPUT {output} overlaps SOURCE {source}: choose an OUTPUT directory outside the source model.")
    if not (output.exists() or output.is_symlink()):
        return
    if not output.is_dir():
        raise ErnieError(f"{output} exists and is not a directory: choose another OUTPUT.")
    if not is_replaceable_model(output):
        raise ErnieError(
            f"{output} already exists and is neither an ERNIE 4.5 checkpoint nor an earlier `ernie quantize` output, "
            "so not even --force replaces it: choose another OUTPUT, or move its files away yourself."
        )
    if not force:
        raise ErnieError(f"{output} already exists: pass --force to replace it, or choose another OUTPUT.")
    if os.path.ismount(output):
        raise ErnieError(
            f"{output} is a mount point, which cannot be replaced by renaming: "
            f"choose a new directory inside it as OUTPUT, e.g. {output / 'model'}."
        )


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


_RENAME_REFUSED = (errno.EBUSY, errno.EXDEV, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR)


def _install(tmp: Path, output: Path) -> None:
    """Rename the finished temporary directory to OUTPUT (replacing an old one only now)."""
    old = None
    try:
        if output.exists():
            old = output.parent / f".{output.name}.replaced-{os.getpid()}"
            os.rename(output, old)
        try:
            os.rename(tmp, output)
        except OSError:
            if old is not None:
                os.rename(old, output)  # the old copy goes back where it was
            raise
    except OSError as exc:
        if exc.errno not in _RENAME_REFUSED:
            raise
        raise ErnieError(
            f"could not rename the finished model to {output} ({os_reason(exc)}), as happens when OUTPUT is a mount point "
            f"or its directory is not writable: choose a new directory as OUTPUT, e.g. {output / 'model'}."
        ) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def quantize_checkpoint(
    source: Path | str,
    output: Path | str,
    spec: QuantSpec,
    force: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Progress | None = None,
    require_tokenizer: bool = False,
) -> dict:
    """Quantize SOURCE into OUTPUT; returns a summary (sizes, seconds, throughput, whether a tokenizer came along)."""
    source, output = Path(source), Path(output)
    t0 = time.perf_counter()
    cfg, ckpt, params = check_source(source)
    tokenizer = has_tokenizer(source)
    if require_tokenizer and not tokenizer:
        raise ErnieError(
            f"{source} has no tokenizer files ({TOKENIZER_JSON}, or {SPM_MODEL} with {', '.join(SPM_COMPANIONS)}), "
            "so `ernie complete` could not use the quantized copy: add them to SOURCE, or pass --allow-no-tokenizer to quantize the weights alone."
        )
    outs = output_plan(params, ckpt, spec)
    out_bytes = sum(t.nbytes for t in outs)
    with output_lock(output):
        check_output(output, force, source)
        _check_space(output.parent, out_bytes + (64 << 20))
        _remove_stale_partials(output)
        try:
            total, shards, copied = _write_output(source, output, spec, ckpt, params, outs, shard_bytes, progress)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise ErnieError(
                f"the disk holding {output.parent} ran out of space while the quantized model was written "
                f"(it needs about {out_bytes / 1e9:.2f} GB): free some space or choose another OUTPUT."
            ) from None
    seconds = time.perf_counter() - t0
    return {
        "source": str(source),
        "output": str(output),
        "source_bytes": total,
        "output_bytes": out_bytes,
        "shards": shards,
        "seconds": seconds,
        "source_mb_per_s": total / 1e6 / seconds if seconds else 0.0,
        "copied_files": copied,
        "tokenizer": tokenizer,
        "config": cfg,
    }


def _write_output(source, output, spec, ckpt, params, outs, shard_bytes, progress) -> tuple[int, int, list[str]]:
    """Write the quantized copy into a hidden temporary directory and rename it to OUTPUT; nothing
    of it is left behind on any error."""
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
    return total, len(writer.shards), copied
