"""Compile the decode step of the tiny MoE on the CPU with the attention operator on, and count the
kernels Inductor writes: a look at what the graph does around the operator without a GPU.

Why: which of the graph's small kernels exist is decided by Inductor's lowering, and part of that
(realizing the operator's inputs) does not depend on the device. The attention operator runs under
the Triton interpreter; the GEMVs and the router stay in torch, so the CPU backend's count is not the
GPU's (it also fuses more), only its comparison between two settings.

Usage (Triton for the interpreter on PYTHONPATH, e.g. /tmp/tri):
    TRITON_INTERPRET=1 TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 TORCH_LOGS=output_code \\
        python benchmarks/decode_graph_on_cpu.py 2> code.log
    ERNIE_ROPE_ROWS=graph TRITON_INTERPRET=1 ... (the same) 2> code_rows.log
then count the `cpp_fused_... = async_compile` lines of each log, and those whose name has `index`.
"""
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import write_checkpoint  # noqa: E402

from ernie_cli import gpu_attention  # noqa: E402
from ernie_cli.loader import load_model  # noqa: E402

# the operator's CUDA conditions, less the device (fp16: the interpreter has no bf16)
gpu_attention.usable = lambda q, k: q.shape[0] == 1 and q.shape[2] == 1 and q.dtype == torch.float16
model = load_model(write_checkpoint(Path(tempfile.mkdtemp()) / "moe", "moe")[0], "cpu", torch.float16)
model.fuse_projections()
model.setup_cache(1, 64)
with torch.no_grad():
    model(torch.tensor([[5, 6, 7]]), 0)
    step = torch.compile(model.decode_step, fullgraph=True)
    print(step(torch.tensor([[9]]), torch.tensor([3])).shape)
