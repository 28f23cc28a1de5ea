"""`ernie complete`: continue a text with a base model, streamed to stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ernie_cli.commands.checks import check_compile, check_model_options, check_tp
from ernie_cli.console import byte_progress, info, warn, write_stdout
from ernie_cli.errors import UsageError, deferred_interrupts
from ernie_cli.weights.hub import DEFAULT_MODEL


def _from_shell(value: str, warned: list[bool]) -> str:
    """Command-line text as the shell gave it: bytes that are not UTF-8 arrive as surrogate escapes,
    which no tokenizer takes; they become U+FFFD, as on stdin, with one warning."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogatepass")
    if not warned:
        warn("the command line is not valid UTF-8; undecodable bytes were replaced with U+FFFD.")
        warned.append(True)
    return raw.decode("utf-8", errors="replace")


def complete(
    prompt: Annotated[Optional[str], typer.Argument(help="Text to continue. Piped stdin is prepended (see --no-stdin); '-' reads stdin.", show_default=False)] = None,
    model: Annotated[str, typer.Option("-m", "--model", help="Hub repo id or local directory.")] = DEFAULT_MODEL,
    file: Annotated[Optional[Path], typer.Option("-f", "--file", help="Read the prompt from a file.", show_default=False)] = None,
    max_tokens: Annotated[int, typer.Option("-n", "--max-tokens", help="Most tokens to generate.")] = 256,
    temperature: Annotated[Optional[float], typer.Option("-t", "--temperature", help="0 is greedy. [default: generation_config.json, else 0.8]", show_default=False)] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Keep the k most likely tokens (0: off).", show_default=False)] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling mass in (0, 1]. [default: generation_config.json]", show_default=False)] = None,
    min_p: Annotated[Optional[float], typer.Option("--min-p", help="Drop tokens below min_p x the top probability.", show_default=False)] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option("--repetition-penalty", help="transformers' rule over prompt and output (1: off).", show_default=False)] = None,
    presence_penalty: Annotated[Optional[float], typer.Option("--presence-penalty", help="OpenAI's rule over the output.", show_default=False)] = None,
    frequency_penalty: Annotated[Optional[float], typer.Option("--frequency-penalty", help="OpenAI's rule over the output.", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("-s", "--seed", help="Same seed, model, device and dtype give the same text.", show_default=False)] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop before this text (repeatable).", show_default=False)] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep going past the end-of-text token.")] = False,
    echo: Annotated[bool, typer.Option("--echo", help="Print the prompt before the completion.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object at the end instead of streaming.")] = False,
    logprobs: Annotated[Optional[int], typer.Option("--logprobs", help="With --json: the top N [id, logprob] pairs per token.", show_default=False)] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto, bfloat16, float16 or float32.")] = "auto",
    quantize: Annotated[Optional[str], typer.Option("--quantize", help="Quantize a float checkpoint while loading: int8 or int4.", show_default=False)] = None,
    max_context: Annotated[Optional[int], typer.Option("--max-context", help="Most positions (prompt + output). [default: the model's]", show_default=False)] = None,
    compile: Annotated[str, typer.Option("--compile", help="auto (graph on CUDA), graph, on or off: the decode step as one CUDA graph, captured (graph) or compiled by Inductor (on).")] = "auto",
    tp: Annotated[int, typer.Option("--tp", help="Split the model over N processes (tensor and expert parallel): one GPU each on CUDA, a share of the cores each on the CPU.")] = 1,
    no_stdin: Annotated[bool, typer.Option("--no-stdin", envvar="ERNIE_NO_STDIN", show_envvar=False, help="Never read stdin, even when it is piped: for scripts and `while read` loops (also ERNIE_NO_STDIN=1).")] = False,
    offline: Annotated[bool, typer.Option("--offline", help="Never touch the network (as HF_HUB_OFFLINE=1).")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No summary line on stderr.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Print where the time went, stage by stage, on stderr.")] = False,
    server: Annotated[Optional[str], typer.Option("--server", envvar="ERNIE_SERVER", show_envvar=False, help="Ask a running `ernie serve` at this URL instead of loading the model (also ERNIE_SERVER); its key from ERNIE_API_KEY.", show_default=False)] = None,
) -> None:
    """Continue PROMPT with the model and stream the text to stdout. Statistics go to stderr."""
    from ernie_cli.runtime.stages import Stages

    stages = Stages()
    from ernie_cli.text import prompt as prompt_module
    from ernie_cli.runtime.sampling import SamplingParams

    # Every option is checked before anything is read or loaded.
    if max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1.")
    if logprobs is not None and not 0 <= logprobs <= 20:
        raise UsageError("--logprobs must be between 0 and 20.")
    check_model_options(dtype, quantize, device, max_context)
    check_compile(compile)
    check_tp(tp, quantize, compile, device)
    chosen = dict(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
    )
    SamplingParams(**{k: v for k, v in chosen.items() if v is not None}, seed=seed).validate()
    warned: list[bool] = []
    if prompt is not None:
        prompt = _from_shell(prompt, warned)
    stops = [_from_shell(s, warned) for s in stop or []]
    if logprobs is not None and not as_json:
        warn("--logprobs has no effect without --json, which is where the logprobs are written.")
    if echo and as_json:
        warn("--echo has no effect with --json, whose \"prompt\" field already holds the prompt.")
    src = prompt_module.sources(prompt, file, no_stdin)
    if server:
        from ernie_cli.serve import client

        local = dict(device=device != "auto", dtype=dtype != "auto", quantize=quantize is not None, compile=compile != "auto", tp=tp != 1,
                     offline=offline, max_context=max_context is not None)
        unused = [f"--{k.replace('_', '-')}" for k, v in local.items() if v]
        if unused:
            warn(f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect with --server: the server's own options apply.")
        explicit = None if model == DEFAULT_MODEL else model
        client.complete(server, src, model=explicit, max_tokens=max_tokens, sampling={k: v for k, v in chosen.items() if v is not None},
                        seed=seed, stops=stops, ignore_eos=ignore_eos, echo=echo, as_json=as_json, logprobs=logprobs, quiet=quiet,
                        stages=stages, verbose=verbose)
        return

    from ernie_cli.weights.hub import resolve_model

    model_dir = resolve_model(model, offline=True if offline else None, quiet=quiet)
    gathered = prompt_module.prepare(model_dir, src, max_context)
    stages.mark("prompt")

    with deferred_interrupts():  # torch is imported here
        from ernie_cli.runtime import completion
    stages.mark("import")

    defaults = completion.generation_defaults(model_dir)
    values = {k: (v if v is not None else defaults.get(k)) for k, v in chosen.items()}
    sampling = SamplingParams(**{k: v for k, v in values.items() if v is not None}, seed=seed).validate()

    progress, stop_progress = byte_progress("loading weights", quiet)
    try:
        runtime = completion.load_runtime(model_dir, device, dtype, max_context, quantize, progress, compile, gathered.tokenizer, stages, tp)
    finally:
        stop_progress()
    text = gathered.text
    request = completion.Request(text, max_tokens, sampling, stops, ignore_eos, logprobs, max_context, gathered.ids)
    if echo and not as_json:
        write_stdout(text)
    result = completion.run_completion(runtime, request, on_text=(lambda s: None) if as_json else write_stdout)
    t = result.timings
    for name, seconds in (("prefill", t.prefill_s), ("first step", t.first_step_s), ("decode", t.decode_s)):
        stages.add(name, seconds)
    stages.mark("other")  # sampling set-up, text, output
    if as_json:
        record = {
            "model": model,
            "prompt": text,
            "text": result.text,
            "prompt_tokens": result.prompt_tokens,
            "tokens": result.tokens,
            "finish_reason": result.finish_reason,
            "logprobs": result.logprobs,
            "usage": {"prompt_tokens": len(result.prompt_tokens), "completion_tokens": len(result.tokens),
                      "total_tokens": len(result.prompt_tokens) + len(result.tokens)},
            "timings": {"load_s": runtime.load_s, "prefill_s": t.prefill_s, "first_step_s": t.first_step_s, "decode_s": t.decode_s,
                        "prefill_tokens_per_s": t.prefill_tps, "decode_tokens_per_s": t.decode_tps,
                        "stages": stages.seconds},
        }
        write_stdout(json.dumps(record, ensure_ascii=False) + "\n")
    elif result.text and not result.text.endswith("\n") and sys.stdout.isatty():
        write_stdout("\n")  # keep the shell prompt off the last line, only for a person reading
    if not quiet:
        info(
            f"{len(result.prompt_tokens)} prompt tokens, {len(result.tokens)} generated; "
            f"prefill {t.prefill_tps:.1f} tok/s, decode {t.decode_tps:.1f} tok/s; "
            f"load {runtime.load_s:.1f} s; finish: {result.finish_reason}"
        )
    if verbose:
        info(stages.table())
