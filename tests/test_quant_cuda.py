"""The CUDA path (dequantize, then matmul; experts gathered by index in decode) against the CPU kernels.

Skipped without a GPU; run on the GPU machine with `pytest tests/test_quant_cuda.py`, or
`python benchmarks/quant_cuda_check.py` for a table.
"""

import pytest
import torch

from ernie_cli.quant.convert import quantize_checkpoint
from ernie_cli.quant.spec import QuantSpec
from ernie_cli.weights.loader import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _kl(p, q):
    p, q = p.double().log_softmax(-1), q.double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


@pytest.mark.parametrize("dp4a", [False, True])
@pytest.mark.parametrize("fmt, group", [("int8", None), ("int4", 32), ("int4", 64)])
def test_cuda_and_cpu_agree_on_the_same_checkpoint(checkpoints, tmp_path, fmt, group, dp4a, monkeypatch):
    """dp4a: one-token products round x to int8 (gpu_gemv.DP4A); the same bounds must hold."""
    from ernie_cli.kernels.triton import gemv as gpu_gemv

    monkeypatch.setattr(gpu_gemv, "DP4A", dp4a)
    src, _ = checkpoints("moe")
    out = tmp_path / "q"
    quantize_checkpoint(src, out, QuantSpec.make(fmt, group))
    cpu = load_model(out, "cpu", torch.bfloat16)
    gpu = load_model(out, "cuda", torch.bfloat16)
    assert gpu.layers[1].mlp.experts.gate_up_proj.backend == "dequant"
    ids = torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = cpu(ids).float()
        b = gpu(ids.cuda()).float().cpu()
        da = cpu(ids[:1, :1], 0).float()
        db = gpu(ids[:1, :1].cuda(), 0).float().cpu()  # the one-token `gathered` path
    assert _kl(a, b).mean() < 2e-3  # both sides run bf16 activations: bf16's own noise on these tiny models
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert _kl(da, db).max() < 2e-3
