"""Programmatic dependent launch (kernels/triton/overlap.py): a kernel that starts before the one it
follows has finished must still see every write of it. The reference is the same kernels launched
one after another, which is how CUDA orders a stream by itself: the results must be equal to the
bit, since only the timing of the launches differs."""

import pytest
import torch

from ernie_cli.kernels.triton import gemv as gpu_gemv

needs_hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and gpu_gemv.triton is not None and torch.cuda.get_device_capability()[0] >= 9),
    reason="needs a CUDA GPU of compute capability 9 or later (programmatic dependent launch) and Triton",
)


def test_off_for_the_cpu():
    from ernie_cli.kernels.triton import overlap

    assert overlap.launch_args(torch.zeros(1)) == {"PDL": False}


@needs_hopper
def test_a_chain_of_dependent_kernels_in_a_graph_reads_each_result(monkeypatch):
    """200 fused additions and norms, each reading both results of the one before, captured in one
    CUDA graph: a kernel that read its inputs before the previous kernel wrote them would change the
    result."""
    from ernie_cli.kernels.triton import elementwise, overlap

    gen = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.randn(1, 2560, device="cuda", dtype=torch.bfloat16, generator=gen)
    n0 = torch.randn(1, 2560, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight = torch.rand(2560, device="cuda", dtype=torch.bfloat16, generator=gen) + 0.5

    def chain():
        x, normed = x0, n0
        for _ in range(200):
            x, normed = elementwise.add_rms_norm(x, normed, weight, 1e-5)
        return torch.cat([x, normed])

    results = {}
    for enabled in (False, True):
        monkeypatch.setattr(overlap, "ENABLED", enabled)
        chain()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
        graph.replay()
        torch.cuda.synchronize()
        results[enabled] = out.clone()
    assert torch.equal(results[True], results[False])


@needs_hopper
@pytest.mark.parametrize("quantize", [None, "int4", "int8"])
def test_the_captured_decode_step_gives_the_same_logits_to_the_bit(checkpoints, monkeypatch, quantize):
    from ernie_cli.kernels.triton import overlap
    from ernie_cli.runtime.decoder import Decoder
    from ernie_cli.weights.loader import load_model, prepare_for_decoding

    path, _ = checkpoints("moe")
    kwargs = {"quantize": quantize} if quantize else {}
    model = prepare_for_decoding(load_model(path, "cuda", torch.bfloat16, **kwargs), "graph")
    ids = torch.randint(3, 500, (1, 40), generator=torch.Generator().manual_seed(3)).cuda()
    logits = {}
    for enabled in (False, True):
        monkeypatch.setattr(overlap, "ENABLED", enabled)
        decoder = Decoder(model, "graph")  # captured afresh, with or without the launch attribute
        decoder.reserve(64)
        with torch.no_grad():
            decoder.prefill(ids[:, :8])
            logits[enabled] = torch.stack([decoder(ids[:, i : i + 1], i) for i in range(8, 40)]).float()
        assert decoder.graph.graph is not None
    assert torch.isfinite(logits[False]).all()
    assert torch.equal(logits[True], logits[False])
