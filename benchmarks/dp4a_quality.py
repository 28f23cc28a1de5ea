"""What rounding x to int8 (the dp4a GEMVs, ERNIE_DP4A) costs in a model's output, against the float32
reference (run it on a GPU machine).

    python benchmarks/dp4a_quality.py

Builds a small random ERNIE MoE checkpoint, quantizes it to int8 and to int4 g64, and decodes 32
one-token steps after a 64-token prefill on CUDA in bf16, with the dp4a GEMVs off and on. Every
row is compared with the float32 model on the CPU over the same tokens: KL(float32 || row), per step,
and how often the top token agrees. The unquantized bf16 row is the noise floor.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.quant_cuda_check import kl, run  # noqa: E402
from ernie_cli.kernels.triton import gemv as gpu_gemv  # noqa: E402
from ernie_cli.quant.convert import quantize_checkpoint  # noqa: E402
from ernie_cli.quant.spec import QuantSpec  # noqa: E402
from ernie_cli.weights.loader import load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the synthetic checkpoint writer lives with the tests
from synthetic import moe_config, write_synthetic_checkpoint  # noqa: E402

STEPS = 32


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on the GPU machine")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    raw = moe_config(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                     head_dim=64, vocab_size=4096, moe_num_experts=16, moe_k=4, moe_intermediate_size=256)
    ids = torch.randint(3, 4000, (1, 64 + STEPS), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        src = write_synthetic_checkpoint(Path(tmp) / "src", raw)
        _, ref = run(load_model(src, "cpu", torch.float32), ids, STEPS)
        print("| weights | x in the GEMVs | decode KL mean | KL max | same top token |")
        print("|---|---|---:|---:|---:|")
        rows = [("bf16", src, False)]
        for fmt, group in (("int8", None), ("int4", 64)):
            out = Path(tmp) / fmt
            quantize_checkpoint(src, out, QuantSpec.make(fmt, group))
            name = fmt + (f" g{group}" if group else "")
            rows += [(name, out, False), (name, out, True)]
        for name, path, dp4a in rows:
            gpu_gemv.DP4A = dp4a
            _, dec = run(load_model(path, "cuda", torch.bfloat16), ids, STEPS)
            k = kl(ref, dec)
            same = (ref.argmax(-1) == dec.argmax(-1)).double().mean()
            print(f"| {name} | {'int8 (dp4a)' if dp4a else 'bf16'} | {k.mean():.2e} | {k.max():.2e} | {100 * same:.1f}% |")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
