"""`ernie quantize`: make an int8 or int4 copy of a bf16 ERNIE checkpoint, offline, in bounded memory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ernie_cli.console import byte_progress, info, warn, write_stdout
from ernie_cli.errors import UsageError


def quantize(
    source: Annotated[str, typer.Argument(help="bf16/fp16/fp32 ERNIE 4.5 model: a directory or a Hub repo id.", show_default=False)],
    output: Annotated[Path, typer.Argument(help="New directory for the quantized model.", show_default=False)],
    format: Annotated[str, typer.Option("--format", help="int8 (per-channel) or int4 (group-wise, ~1/4 of bf16).", show_default=False)] = "",
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="int4 weights per scale and zero: 32, 64 or 128 (default 64).", show_default=False)] = None,
    keep_embeddings: Annotated[bool, typer.Option("--keep-embeddings", help="Keep the embedding/lm_head in bf16 instead of int8.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it is an ERNIE checkpoint or an earlier output (only once the new copy is complete).")] = False,
    allow_no_tokenizer: Annotated[bool, typer.Option("--allow-no-tokenizer", help="Quantize a SOURCE that has no tokenizer files (the copy then needs them added before `ernie complete`).")] = False,
    evaluate: Annotated[bool, typer.Option("--eval", help="Then compare it with SOURCE on the held-out text (KL, top-1, perplexity).")] = False,
    eval_only: Annotated[bool, typer.Option("--eval-only", help="Quantize nothing: compare the existing model OUTPUT with SOURCE.")] = False,
    eval_tokens: Annotated[Optional[int], typer.Option("--eval-tokens", help="Score only the first N held-out tokens.  [default: all, ~4600]", show_default=False)] = None,
    device: Annotated[str, typer.Option("--device", help="Where --eval runs the two models: auto, cpu, cuda or cuda:N.")] = "auto",
    offline: Annotated[bool, typer.Option("--offline", help="Never touch the network (as HF_HUB_OFFLINE=1).")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress or summary on stderr.")] = False,
) -> None:
    """Quantize SOURCE into OUTPUT, which `ernie complete -m OUTPUT` then loads like any model.

    Attention, dense MLP, shared and routed experts go to --format; the embedding/lm_head to int8; norms and the MoE router stay as they are.

    Streams tensor by tensor, so memory stays near 1-2 GB whatever the model size. The last line on stdout is OUTPUT's path.
    """
    from ernie_cli.quant.spec import QuantSpec

    if eval_only:
        if format or group_size is not None or keep_embeddings or force:
            raise UsageError("--eval-only quantizes nothing: drop --format, --group-size, --keep-embeddings and --force.")
    else:
        if not format:
            raise UsageError("pass --format int8 or --format int4.")
        if format not in ("int8", "int4"):
            raise UsageError(f"--format {format!r} is not one of int8, int4.")
        if format == "int8" and group_size is not None:
            raise UsageError("--group-size applies to --format int4 only (int8 has one scale per output channel).")
    if eval_tokens is not None and eval_tokens < 16:
        raise UsageError("--eval-tokens must be at least 16.")
    spec = None if eval_only else QuantSpec.make(format, group_size, keep_embeddings)
    if eval_only and not (output / "config.json").is_file():
        raise UsageError(f"--eval-only needs an existing model directory as OUTPUT; {output} has no config.json.")
    if evaluate or eval_only:
        from ernie_cli.weights.loader import resolve_device

        resolve_device(device)  # a wrong --device must not surface only after the quantization

    from ernie_cli.quant.convert import check_output, output_lock
    from ernie_cli.weights.hub import resolve_model

    # Held until the report is written too, so no other run replaces OUTPUT under the evaluation.
    with output_lock(output, required=not eval_only):
        if eval_only:
            from ernie_cli.quant.evaluate import check_report_writable

            check_report_writable(output)
        else:
            check_output(output, force)
        source_dir = resolve_model(source, offline=True if offline else None, quiet=quiet)
        if not eval_only:
            _quantize(source_dir, output, spec, force, allow_no_tokenizer, quiet)
        if evaluate or eval_only:
            from ernie_cli.quant.evaluate import (
                evaluate_dirs,
                format_report,
                write_report,
            )

            if not quiet:
                info("evaluating on the held-out text (the source model runs first, then the quantized one)...")
            report = evaluate_dirs(source_dir, output, device=device, max_tokens=eval_tokens)
            write_stdout(format_report(report) + "\n")  # first, so that a failed write loses nothing
            path = write_report(report, output)
            if eval_only:
                write_stdout(f"{path}\n")
                return
    write_stdout(f"{output}\n")


def _quantize(source_dir: Path, output: Path, spec, force: bool, allow_no_tokenizer: bool, quiet: bool) -> None:
    from ernie_cli.quant.convert import quantize_checkpoint

    update, stop = byte_progress("quantizing", quiet)
    try:
        summary = quantize_checkpoint(source_dir, output, spec, force=force, progress=update, require_tokenizer=not allow_no_tokenizer)
    finally:
        stop()
    if not summary["tokenizer"]:
        warn(f"{source_dir} has no tokenizer files, so {output} has none either: copy them into it before `ernie complete -m {output}`.")
    if not quiet:
        gb = 1e9
        info(
            f"quantized {summary['source_bytes'] / gb:.2f} GB into {summary['output_bytes'] / gb:.2f} GB "
            f"({summary['shards']} shard{'s' if summary['shards'] > 1 else ''}) in {summary['seconds']:.1f} s, "
            f"{summary['source_mb_per_s']:.0f} MB/s"
        )
