"""CPU kernels against the CUDA path on the same quantized checkpoints (run it on a GPU machine).

    python benchmarks/quant_cuda_check.py [--device cuda] [--timing]

Builds a small random ERNIE MoE checkpoint (no transformers needed), quantizes it to int8 and to
int4 with group sizes 32/64/128, loads each copy on the CPU (torch's int kernels) and on the GPU
(dequantize-then-matmul), and compares the logits of a 4 x 96 prefill and of 16 one-token decode
steps (the graph-safe `gathered` expert path on the GPU, `selected` on the CPU). The bf16 float
model on both devices is the noise floor: the quantized rows should sit near it (KL ~1e-4 or less,
top-1 >= 97%). --timing adds batch-1 decode tokens/s on the GPU for each copy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ernie_cli.quant.convert import quantize_checkpoint  # noqa: E402
from ernie_cli.quant.spec import QuantSpec  # noqa: E402
from ernie_cli.weights.loader import load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the synthetic checkpoint writer lives with the tests
from synthetic import moe_config, write_synthetic_checkpoint  # noqa: E402


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    p, q = p.double().log_softmax(-1), q.double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


@torch.no_grad()
def run(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = ids.to(model.device)
    prefill = model(ids).float().cpu()
    cache = model.new_cache(1, ids.shape[1] + 1)
    model(ids[:1, : ids.shape[1] - steps], 0, cache)
    decode = [model(ids[:1, p : p + 1], p, cache).float().cpu() for p in range(ids.shape[1] - steps, ids.shape[1])]
    return prefill, torch.cat(decode, dim=1)


@torch.no_grad()
def tokens_per_s(model, n: int = 64) -> float:
    cache = model.new_cache(1, n + 8)
    tok = torch.tensor([[5]], device=model.device)
    model(torch.tensor([[1, 2, 3, 4]], device=model.device), 0, cache)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for p in range(4, 4 + n):
        tok = model(tok, p, cache)[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--timing", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on the GPU machine")
    dev = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(dev)}")
    raw = moe_config(hidden_size=256, intermediate_size=704, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=64, vocab_size=2048, moe_num_experts=8, moe_k=2, moe_intermediate_size=128)
    ids = torch.randint(3, 2000, (4, 96), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        src = write_synthetic_checkpoint(Path(tmp) / "src", raw)
        runs = [("bf16", src)]
        for fmt, group in (("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)):
            out = Path(tmp) / f"{fmt}-{group}"
            quantize_checkpoint(src, out, QuantSpec.make(fmt, group))
            runs.append((f"{fmt}" + (f" g{group}" if group else ""), out))
        print(f"{'model':<10} {'prefill KL mean':>15} {'KL max':>9} {'top-1':>7} {'decode KL max':>13} {'top-1':>7} {'max |dlogit|':>12}"
              + ("  GPU tok/s" if args.timing else ""))
        for name, path in runs:
            cpu = load_model(path, "cpu", torch.bfloat16)
            gpu = load_model(path, dev, torch.bfloat16)
            (pc, dc), (pg, dg) = run(cpu, ids, 16), run(gpu, ids, 16)
            k, kd = kl(pc, pg), kl(dc, dg)
            top, topd = (pc.argmax(-1) == pg.argmax(-1)).double().mean(), (dc.argmax(-1) == dg.argmax(-1)).double().mean()
            line = (f"{name:<10} {k.mean():>15.2e} {k.max():>9.2e} {100 * top:>6.1f}% {kd.max():>13.2e} {100 * topd:>6.1f}% "
                    f"{(pc - pg).abs().max():>12.4f}")
            if args.timing:
                line += f"  {tokens_per_s(gpu):>9.1f}"
            print(line)
            del cpu, gpu
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
