"""`ernie bench`: llama-bench-style speed and memory figures, also without weights (--config)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ernie_cli.commands.checks import check_compile, check_model_options, check_tp
from ernie_cli.console import info, stderr_is_tty, write_stdout
from ernie_cli.errors import UsageError

MAX_REPETITIONS = 10_000  # more only narrows a std that five runs already show


def _int_list(value: str, option: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} takes comma-separated integers, got {value!r}.") from None
    if any(v < 0 for v in items):
        raise UsageError(f"{option} values must be >= 0.")
    return items


def _pairs(values: list[str]) -> list[tuple[int, int]]:
    pairs = []
    for value in values:
        items = _int_list(value, "--pg")
        if len(items) != 2 or min(items) < 1:
            raise UsageError(f"--pg takes PROMPT,GENERATE (two positive integers), got {value!r}.")
        pairs.append((items[0], items[1]))
    return pairs


def bench(
    model: Annotated[Optional[str], typer.Option("-m", "--model", help="Hub repo id or local directory to measure.", show_default=False)] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="Measure this config.json with random weights built on the device (no download).", show_default=False)] = None,
    layers: Annotated[Optional[int], typer.Option("--layers", help="With --config: override the number of layers.", show_default=False)] = None,
    prompt: Annotated[str, typer.Option("-p", "--n-prompt", help="Prefill tests (comma list; 0 skips).")] = "512",
    generate: Annotated[str, typer.Option("-n", "--n-gen", help="Decode tests (comma list; 0 skips).")] = "128",
    pg: Annotated[Optional[list[str]], typer.Option("--pg", help="Prefill+decode test PROMPT,GENERATE (repeatable).", show_default=False)] = None,
    depth: Annotated[str, typer.Option("-d", "--depth", help="Tokens already in the KV cache (comma list).")] = "0",
    repetitions: Annotated[int, typer.Option("-r", "--repetitions", help="Timed runs per test, after one warm-up.")] = 5,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto, bfloat16, float16 or float32.")] = "auto",
    quantize: Annotated[Optional[str], typer.Option("--quantize", help="Quantize float weights while loading: int8 or int4.", show_default=False)] = None,
    threads: Annotated[Optional[int], typer.Option("-t", "--threads", help="CPU threads. [default: torch's, usually the physical cores]", show_default=False)] = None,
    compile: Annotated[str, typer.Option("--compile", help="auto (graph on CUDA), graph, on or off: the decode step as one CUDA graph, captured from the eager step (graph) or compiled by Inductor (on).")] = "auto",
    tp: Annotated[int, typer.Option("--tp", help="Split the model over N processes (tensor and expert parallel): one GPU each on CUDA, a share of the cores each on the CPU.")] = 1,
    output: Annotated[str, typer.Option("-o", "--output", help="md, json or csv.")] = "md",
    offline: Annotated[bool, typer.Option("--offline", help="Never touch the network.")] = False,
) -> None:
    """Measure prefill (pp), decode (tg) and both (pg) speed, time to first token and peak memory.

    Inputs are synthetic token ids; tokenization and sampling are outside the timed region. Each
    test is warmed up once, then timed REPETITIONS times; tok/s is reported as mean +- std.
    """
    if (model is None) == (config is None):
        raise UsageError("pass exactly one of -m MODEL or --config CONFIG.json.")
    if output not in ("md", "json", "csv"):
        raise UsageError(f"-o {output!r} is not one of md, json, csv.")
    if not 1 <= repetitions <= MAX_REPETITIONS:
        raise UsageError(f"-r takes 1 to {MAX_REPETITIONS:,} timed runs, got {repetitions}.")
    if layers is not None and (config is None or layers < 1):
        raise UsageError("--layers needs --config and a positive number.")
    most_threads = 4 * (os.cpu_count() or 1)  # past that, threads only wait for cores
    if threads is not None and not 1 <= threads <= most_threads:
        raise UsageError(f"-t takes 1 to {most_threads} threads (4x this machine's {os.cpu_count() or 1} CPUs), got {threads}.")
    check_model_options(dtype, quantize)
    check_compile(compile)
    check_tp(tp, quantize, compile, device)
    if tp > 1 and threads is not None:
        raise UsageError("-t sets the threads of one process, and with --tp each rank takes its share of the cores: drop -t.")
    prompts, generates, pairs, depths = _int_list(prompt, "-p"), _int_list(generate, "-n"), _pairs(pg or []), _int_list(depth, "-d") or [0]

    import torch

    from ernie_cli.runtime import benchmark as runtime
    from ernie_cli.runtime.decoder import Decoder, prompt_graphs, step_mode
    from ernie_cli.weights.loader import (
        prepare_for_decoding,
        resolve_device,
        resolve_dtype,
    )

    if not runtime.build_tests(prompts, generates, pairs, depths):
        raise UsageError("no tests to run: give a positive -p, -n or --pg.")
    cfg, model_dir = _config(model, config, layers, offline)
    tests = runtime.plan_tests(prompts, generates, pairs, depths, cfg.max_position_embeddings)
    dev = resolve_device(device)
    # Before the weights: a test that cannot fit even alone is refused at once, not after a long load.
    runtime.check_memory(cfg, tests, resolve_dtype(dtype, cfg, dev), dev)
    if threads:
        torch.set_num_threads(threads)
    if tp > 1:  # rank 0's part is the model measured here: its bytes, its bandwidth
        from ernie_cli.parallel.launch import Weights, load_split

        decoder = load_split(Weights(cfg, resolve_dtype(dtype, cfg, dev), model_dir), tp, dev)
        model_obj, (name, size), quant = decoder.model, _describe(model, model_dir, config, cfg), None
        name = f"{name}, split over {tp} ranks"
    else:
        model_obj, name, size, quant = _load(model, model_dir, config, cfg, dev, dtype, quantize)
    runtime.check_memory(cfg, tests, model_obj.dtype, dev)  # and beside the weights, before any test runs
    context = runtime.run_context(model_obj, name, size, quant)
    if tp == 1:
        mode = step_mode(compile, dev)
        model_obj = prepare_for_decoding(model_obj, mode)
        # a benchmark runs prompts of each length again and again: their graphs pay back, whatever the step
        decoder = Decoder(model_obj, mode, prompt_graphs(model_obj))
    context["step"] = decoder.mode
    show = stderr_is_tty()
    rows = []
    for spec in tests:
        if show:
            info(f"running {spec.name} ...")
        result = runtime.run_test(model_obj, spec, repetitions, decoder=decoder)
        rows.append(runtime.result_row(context, result))
    write_stdout(FORMATS[output](rows, context))


def _config(model, config, layers, offline):
    """(the config to measure, the model directory or None for --config), read without any weights."""
    from ernie_cli.model.config import load_config, parse_config

    if config is None:
        from ernie_cli.weights.hub import resolve_model

        model_dir = resolve_model(model, offline=True if offline else None)
        return load_config(model_dir), model_dir
    try:
        raw = json.loads(Path(config).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read --config {config}: {exc}.") from None
    cfg = parse_config(raw)
    if layers:
        if layers > cfg.num_hidden_layers:
            raise UsageError(f"--layers takes 1 to {cfg.num_hidden_layers} (the layers of {Path(config).name}), got {layers}.")
        cfg = cfg.replace(num_hidden_layers=layers, moe_layer_end_index=min(cfg.moe_layer_end_index, layers - 1))
    return cfg, None


def _describe(model, model_dir, config, cfg) -> tuple[str, int | None]:
    """(the name the table shows, the checkpoint's bytes on disk or None for random weights)."""
    if model_dir is None:
        return f"{Path(config).name} (random weights, {cfg.num_hidden_layers} layers)", None
    return model, sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def _load(model, model_dir, config, cfg, device, dtype, quantize):
    from ernie_cli.weights.loader import (
        check_fits,
        load_model,
        random_model,
        resolve_dtype,
    )

    name, size = _describe(model, model_dir, config, cfg)
    if model_dir is None:
        torch_dtype = resolve_dtype(dtype, cfg, device)
        check_fits(cfg.parameter_counts()["total"] * torch_dtype.itemsize, device, f"{Path(config).name} with random weights")
        if quantize:
            from ernie_cli.quant.load import quantize_in_place
            from ernie_cli.quant.spec import QuantSpec

            return quantize_in_place(random_model(cfg, device, torch_dtype), QuantSpec.make(quantize)), name, None, quantize
        return random_model(cfg, device, torch_dtype), name, None, None

    kwargs = {"quantize": quantize} if quantize else {}
    loaded = load_model(model_dir, device, dtype, **kwargs)
    quant = quantize or (cfg.quantization or {}).get("format")
    return loaded, name, size, quant


# ---- output formats ------------------------------------------------------------------------------------


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024**3:.2f} GiB"


def _count(n: int) -> str:
    """Parameters as llama-bench writes them: B from a billion, M below (a tiny test model is not 0.00 B)."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _markdown(rows: list[dict], context: dict) -> str:
    header = ["model", "size", "params (active)", "device", "threads", "dtype", "quant", "test", "t/s", "ttft ms", "peak mem", "GB/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 8 else "---:" for i in range(len(header))) + "|"]
    for r in rows:
        params = f"{_count(r['params_total'])} ({_count(r['params_active'])})"
        gbs = "-" if r["bandwidth_gb_s"] is None else f"{r['bandwidth_gb_s']:.1f}"
        cells = [
            r["model"], _gib(r["size_on_disk_bytes"] or r["weight_bytes_in_memory"]), params, r["device_name"], str(r["threads"]),
            r["dtype"], r["quantization"], r["test"], f"{r['mean_tokens_per_s']:.2f} ± {r['std_tokens_per_s']:.2f}",
            f"{r['median_ttft_ms']:.1f}", _gib(r["peak_memory_bytes"]), gbs,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"torch {context['torch']}, commit {context['commit'] or 'unknown'}, {context['date']}")
    return "\n".join(lines) + "\n"


def _json(rows: list[dict], context: dict) -> str:
    return json.dumps(rows, indent=2) + "\n"


_CSV_FIELDS = [
    "model", "architecture", "layers", "size_on_disk_bytes", "params_total", "params_active", "weight_bytes_in_memory",
    "device", "device_name", "threads", "dtype", "quantization", "step", "torch", "commit", "date", "test", "prompt_tokens",
    "gen_tokens", "depth", "mean_tokens_per_s", "std_tokens_per_s", "median_ttft_ms", "peak_memory_bytes",
    "weight_bytes_per_token", "bandwidth_gb_s",
]


def _csv(rows: list[dict], context: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


FORMATS = {"md": _markdown, "json": _json, "csv": _csv}
