"""The numbers behind the int4 defaults (refinement steps, group size): error, KL and kernel speed.

    python benchmarks/quantize_quality.py [--skip-kl] [--skip-speed]

1. Weight reconstruction error (relative MSE against float64) of one [1536, 2560] expert matrix
   (the 21B's down/up shape), Gaussian and heavy-tailed (Student-t, 4 dof) weights of std ~0.02:
   round-to-nearest, HQQ's own zero-only proximal update (mobiusml/hqq optimize_weights_proximal_legacy:
   lp 0.7, beta 10, kappa 1.01, 20 iterations with early stop), and ours (least-squares scale and
   zero, 1-4 steps), with the time each takes on one core (quantizing plus dequantizing to measure).
2. KL and top-1 of the tiny random test models (transformers-written, as in tests/) against their
   float32 reference, per format, group size and refinement.
3. Batch-1 CPU kernel time per matrix for each format (bf16 activations, --threads), over 48
   distinct [3072, 2560] gate_up matrices so the weights come from DRAM, not cache.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from ernie_cli.quant import formats  # noqa: E402


def hqq_literal(w: torch.Tensor, g: int, iters: int = 20) -> torch.Tensor:
    """HQQ's zero-point optimiser as published, on RTN's min/max scale; returns the dequantized weight."""
    r, k = w.shape
    wg = w.float().view(r, k // g, g)
    lo, hi = torch.aminmax(wg, dim=-1, keepdim=True)
    s = ((hi - lo) / 15).clamp(min=1e-10)
    z = -lo / s
    beta, best = 10.0, float("inf")
    for _ in range(iters):
        q = (wg / s + z).round().clamp(0, 15)
        e = wg - (q - z) * s
        shrunk = torch.sign(e) * torch.relu(e.abs() - (1 / beta) * (e.abs() + 1e-8).pow(0.7 - 1))
        z_new = (q - (wg - shrunk) / s).mean(-1, keepdim=True)
        beta *= 1.01
        err = e.abs().mean().item()
        if err >= best:
            break
        best, z = err, z_new
    sb, zb = s.bfloat16().float(), ((8 - z) * s).bfloat16().float()
    q = ((wg - zb) / sb + 8).round().clamp(0, 15)
    return ((q - 8) * sb + zb).view(r, k)


def rel_mse(w: torch.Tensor, d: torch.Tensor) -> float:
    ref = w.double()
    return (((d.double() - ref) ** 2).mean() / (ref**2).mean()).item()


def timed(fn, reps: int = 3):
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def weight_error() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    mats = {
        "gaussian": torch.randn(1536, 2560, generator=gen),
        "student-t4": torch.distributions.StudentT(4.0).sample((1536, 2560)),
    }
    print("## weight reconstruction: relative MSE (time for one 1536x2560 matrix, one core)")
    print(f"{'weights':<11} {'g':>4} {'RTN':>16} {'HQQ zero-only':>16} " + " ".join(f"{'ours ' + str(s):>16}" for s in (1, 2, 3, 4)))
    for name, w in mats.items():
        w = (0.02 * w / w.std()).bfloat16()
        for g in formats.GROUP_SIZES:
            cells = []
            d, t = timed(lambda: formats.dequantize("int4", formats.quantize("int4", w, g, 0), g, torch.float64))
            rtn = rel_mse(w, d)
            cells.append(f"{rtn:.5f} ({t * 1e3:3.0f}ms)")
            d, t = timed(lambda: hqq_literal(w, g))
            cells.append(f"{rel_mse(w, d):.5f} ({t * 1e3:3.0f}ms)")
            for steps in (1, 2, 3, 4):
                d, t = timed(lambda: formats.dequantize("int4", formats.quantize("int4", w, g, steps), g, torch.float64))
                cells.append(f"{rel_mse(w, d):.5f} ({t * 1e3:3.0f}ms)")
            print(f"{name:<11} {g:>4} " + " ".join(f"{c:>16}" for c in cells))
        d, t = timed(lambda: formats.dequantize("int8", formats.quantize("int8", w, 0), 0, torch.float64))
        print(f"{name:<11} int8 {rel_mse(w, d):.6f} ({t * 1e3:.0f}ms)")
    torch.set_num_threads(2)


def tiny_kl() -> None:
    from tiny_models import load_reference, write_checkpoint

    from ernie_cli.quant.convert import quantize_checkpoint
    from ernie_cli.quant.spec import QuantSpec
    from ernie_cli.weights.loader import load_model

    def kl(p, q):
        p, q = p.double().log_softmax(-1), q.double().log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1)

    print("\n## tiny random models (tests/tiny_models.py) against transformers float32: mean KL / p99 KL / top-1, 4 x 64 positions")
    ids = torch.randint(3, 500, (4, 64), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        for shape in ("moe", "dense"):
            src, _ = write_checkpoint(Path(tmp) / shape, shape)
            ref = load_reference(src)
            with torch.no_grad():
                expected = ref(ids).logits
                bf = load_model(src, "cpu", torch.bfloat16)(ids).float()
            k = kl(expected, bf)
            print(f"{shape:<6} {'bf16 (no quantization)':<26} {k.mean():.2e} / {k.quantile(0.99):.2e} / {100 * (bf.argmax(-1) == expected.argmax(-1)).double().mean():.1f}%")
            for fmt, g, steps in [("int8", None, 0)] + [("int4", g, s) for g in (32, 64, 128) for s in (0, 4)]:
                out = Path(tmp) / f"{shape}-{fmt}-{g}-{steps}"
                spec = QuantSpec.make(fmt, g, refine_steps=steps)
                quantize_checkpoint(src, out, spec)
                with torch.no_grad():
                    got = load_model(out, "cpu", torch.float32)(ids)
                k = kl(expected, got)
                label = fmt + (f" g{g} " + ("RTN" if steps == 0 else f"refined x{steps}") if g else "")
                print(f"{shape:<6} {label:<26} {k.mean():.2e} / {k.quantile(0.99):.2e} / {100 * (got.argmax(-1) == expected.argmax(-1)).double().mean():.1f}%")


def kernel_speed(threads: int = 2) -> None:
    import torch.nn.functional as F

    from ernie_cli.kernels import quantized
    from ernie_cli.quant.weight import QuantWeight

    torch.set_num_threads(threads)
    n, k, count = 3072, 2560, 48
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, k, generator=gen).bfloat16()
    print(f"\n## batch-1 CPU matmul, {count} distinct [{n}, {k}] weights, {threads} threads (median of 5 passes; µs per matrix, weight GB/s)")
    floats = [(0.02 * torch.randn(n, k, generator=gen)).bfloat16() for _ in range(count)]
    rows = [("bf16 F.linear", lambda i: F.linear(x, floats[i]), n * k * 2)]
    for fmt, g in (("int8", 64), ("int4", 32), ("int4", 64), ("int4", 128)):
        ws = [QuantWeight(fmt, (n, k), g, "cpu").load(formats.quantize(fmt, floats[i], g, 0), torch.device("cpu")) for i in range(count)]
        rows.append((fmt + (f" g{g}" if fmt == "int4" else ""), (lambda ws: lambda i: quantized.matmul(ws[i], x))(ws), ws[0].nbytes()))
    for name, fn, nbytes in rows:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for i in range(count):
                fn(i)
            times.append((time.perf_counter() - t) / count)
        med = sorted(times)[2]
        print(f"{name:<14} {med * 1e6:8.0f} µs  {nbytes / med / 1e9:6.1f} GB/s  ({nbytes / 1e6:.1f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-kl", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-error", action="store_true")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the kernel timings")
    args = ap.parse_args()
    if not args.skip_error:
        weight_error()
    if not args.skip_kl:
        tiny_kl()
    if not args.skip_speed:
        kernel_speed(args.threads)


if __name__ == "__main__":
    main()
