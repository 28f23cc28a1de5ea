"""Quality of a quantized model against its source, the way `llama-perplexity --kl-divergence` measures it.

Both models read the same held-out text (ernie_cli/data/heldout.txt: public-domain prose in
English, code, and classical Chinese) in chunks of `ctx` tokens. At every position but a chunk's
first, each model gives a next-token distribution; the report has

- KL(source || quantized) per position, in nats: mean, median, 99th percentile and max;
- top-1 agreement: how often both models' most likely next token is the same;
- both perplexities of the real next tokens, and the log of their ratio.

The source runs first and its log-probabilities are kept (float32, tokens x vocab: 1.9 GB for the
4,565 tokens of the text with ERNIE's 103k vocabulary), so the two models never need memory at the same time.
"""

from __future__ import annotations

import errno
import gc
import json
import math
import os
from pathlib import Path
from typing import Callable

import torch

HELDOUT = Path(__file__).resolve().parent.parent / "data" / "heldout.txt"
DEFAULT_TOKENS = None  # all of the text: about 4,600 tokens with the ERNIE tokenizer
DEFAULT_CTX = 512
REPORT_FILE = "quantization_report.json"


def heldout_text() -> str:
    return HELDOUT.read_text(encoding="utf-8")


def tokenize(text: str, model_dir: Path | None, vocab_size: int) -> tuple[list[int], str]:
    """Token ids of `text` with the model's tokenizer; without one, its UTF-8 bytes (clamped to the vocabulary)."""
    if model_dir is not None:
        try:
            from ernie_cli.errors import ErnieError
            from ernie_cli.text.tokenizer import load_tokenizer

            try:
                ids = load_tokenizer(Path(model_dir)).encode(text)
                return [min(max(int(i), 0), vocab_size - 1) for i in ids], "tokenizer"
            except ErnieError:
                pass
        except ImportError:
            pass
    return [min(b, vocab_size - 1) for b in text.encode("utf-8")], "utf-8 bytes (no tokenizer in the model directory)"


def chunks(ids: list[int], ctx: int) -> list[list[int]]:
    return [ids[i : i + ctx] for i in range(0, len(ids), ctx) if len(ids[i : i + ctx]) >= 2]


@torch.no_grad()
def log_probs(model, chunk: list[int]) -> torch.Tensor:
    """log p(next token) at every position of the chunk but the last: [len-1, vocab] float32 on the CPU."""
    ids = torch.tensor([chunk], dtype=torch.long, device=model.device)
    logits = model(ids)[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def per_position(ref: torch.Tensor, test: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position KL(ref || test), top-1 match and both NLLs of the targets, in float64."""
    ref, test = ref.double(), test.double()
    kl = (ref.exp() * (ref - test)).sum(-1).clamp(min=0.0)  # clamp: rounding can leave -1e-17
    rows = torch.arange(len(targets))
    return {
        "kl": kl,
        "same_top1": (ref.argmax(-1) == test.argmax(-1)).double(),
        "nll_ref": -ref[rows, targets],
        "nll_test": -test[rows, targets],
    }


def summarize(stats: dict[str, torch.Tensor]) -> dict:
    kl, nll_ref, nll_test = stats["kl"], stats["nll_ref"], stats["nll_test"]
    return {
        "tokens": int(len(kl)),
        "kl_mean": kl.mean().item(),
        "kl_median": kl.median().item(),
        "kl_p99": torch.quantile(kl, 0.99).item(),
        "kl_max": kl.max().item(),
        "top1_agreement": stats["same_top1"].mean().item(),
        "ppl_source": math.exp(nll_ref.mean().item()),
        "ppl_quantized": math.exp(nll_test.mean().item()),
        "ln_ppl_ratio": (nll_test.mean() - nll_ref.mean()).item(),
        "mean_delta_p_target": (nll_test.neg().exp() - nll_ref.neg().exp()).mean().item(),
    }


def compare(ref: torch.Tensor, test: torch.Tensor, targets: torch.Tensor) -> dict:
    """The report's numbers for log-prob rows `test` against `ref` ([N, V] each) and the real next tokens [N]."""
    return summarize(per_position(ref, test, targets))


def evaluate_models(load_source: Callable, load_test: Callable, ids: list[int], ctx: int = DEFAULT_CTX) -> dict:
    """Run the source model (built by load_source()), free it, then the test model, on the same chunks."""
    parts = chunks(ids, ctx)
    model = load_source()
    ref = [log_probs(model, c) for c in parts]
    del model
    gc.collect()
    model = load_test()
    stats: dict[str, list[torch.Tensor]] = {}
    for c, r in zip(parts, ref):
        for key, value in per_position(r, log_probs(model, c), torch.tensor(c[1:])).items():
            stats.setdefault(key, []).append(value)
    del model, ref
    gc.collect()
    return summarize({k: torch.cat(v) for k, v in stats.items()})


def evaluate_dirs(
    source: Path | str,
    quantized: Path | str,
    device: str = "auto",
    dtype: str | None = None,
    max_tokens: int | None = DEFAULT_TOKENS,
    ctx: int = DEFAULT_CTX,
    text: str | None = None,
) -> dict:
    """The report for two model directories (the second typically made by `ernie quantize` from the first)."""
    from ernie_cli.model.config import load_config
    from ernie_cli.weights.loader import load_model, resolve_device

    source, quantized = Path(source), Path(quantized)
    cfg = load_config(source)
    ids, how = tokenize(heldout_text() if text is None else text, source, cfg.vocab_size)
    ids = ids[:max_tokens]
    dev = resolve_device(device)
    result = evaluate_models(lambda: load_model(source, dev, dtype), lambda: load_model(quantized, dev, dtype), ids, ctx)
    quant_cfg = load_config(quantized).quantization
    return {
        "source": str(source),
        "quantized": str(quantized),
        "quantization": quant_cfg,
        "text": "ernie_cli/data/heldout.txt" if text is None else "custom",
        "tokenization": how,
        "context": ctx,
        "device": str(dev),
        **result,
    }


def format_report(report: dict) -> str:
    q = report.get("quantization") or {}
    what = q.get("format", "?")
    if q.get("format") == "int4":
        what += f" g{q.get('group_size')}"
    lines = [
        f"quality of {report['quantized']} ({what}) against {report['source']}",
        f"  {report['tokens']} next-token predictions, chunks of {report['context']}, tokenized by {report['tokenization']}",
        f"  KL divergence  mean {report['kl_mean']:.5f}  median {report['kl_median']:.5f}  p99 {report['kl_p99']:.5f}  max {report['kl_max']:.5f} nats",
        f"  same top-1     {100 * report['top1_agreement']:.2f}%",
        f"  perplexity     source {report['ppl_source']:.4f}  quantized {report['ppl_quantized']:.4f}  (ln ratio {report['ln_ppl_ratio']:+.5f})",
    ]
    return "\n".join(lines)


def _report_error(path: Path, exc: OSError, after: bool) -> "ErnieError":
    from ernie_cli.errors import ErnieError, os_reason

    fix = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else f"make {path.parent} writable"
    if after:
        return ErnieError(f"could not save {path} ({os_reason(exc)}); the report is on stdout above: {fix} and run --eval-only again to save it.")
    return ErnieError(f"cannot write {path} ({os_reason(exc)}), so the evaluation would be lost: {fix}, or copy the model somewhere writable first.")


def check_report_writable(directory: Path) -> Path:
    """Make and remove a file beside the report-to-be, so that an evaluation that takes minutes to
    hours does not end with nowhere to save its result."""
    path = Path(directory) / REPORT_FILE
    probe = path.with_name(f".{REPORT_FILE}.probe-{os.getpid()}")
    try:
        with open(probe, "w", encoding="utf-8"):
            pass
        os.unlink(probe)
    except OSError as exc:
        raise _report_error(path, exc, after=False) from None
    return path


def write_report(report: dict, directory: Path) -> Path:
    """Write the report under a temporary name, then rename it: a full disk leaves no half of it."""
    path = Path(directory) / REPORT_FILE
    tmp = path.with_name(f".{REPORT_FILE}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise _report_error(path, exc, after=True) from None
    return path
