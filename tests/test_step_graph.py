"""The decode step captured as one CUDA graph from the eager code (Decoder mode "graph"), against
transformers and against the eager step on the same GPU; and which mode each --compile picks."""

import pytest
import torch

from ernie_cli.runtime.decoder import Decoder, step_mode
from ernie_cli.runtime.generate import generate
from ernie_cli.runtime.sampling import Sampler, SamplingParams
from ernie_cli.weights.loader import load_model, prepare_for_decoding

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_compile_option_to_step_mode():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert [step_mode(o, gpu) for o in ("auto", "graph", "on", "off")] == ["graph", "graph", "compile", "eager"]
    assert [step_mode(o, cpu) for o in ("auto", "graph", "on", "off")] == ["eager", "eager", "compile", "eager"]


def test_graph_mode_off_cuda_is_the_eager_step(checkpoints):
    model = load_model(checkpoints("moe")[0], "cpu", torch.float32)
    decoder = Decoder(model, "graph")
    assert decoder.mode == "eager" and decoder.graph is None


def _prompt(n, seed=11):
    return torch.randint(3, 500, (1, n), generator=torch.Generator().manual_seed(seed))


@cuda
@pytest.mark.parametrize("shape", ["dense", "moe", "moe_interval2"])
def test_graph_step_greedy_equals_transformers(checkpoints, shape):
    """float32 on the GPU: 32 greedy tokens through the captured step are transformers' tokens."""
    torch.backends.cuda.matmul.allow_tf32 = False
    path, ref = checkpoints(shape)
    ids = _prompt(9)
    with torch.no_grad():
        out = ref.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, repetition_penalty=1.5,
                           eos_token_id=None, pad_token_id=0)
    model = load_model(path, "cuda", torch.float32)
    decoder = Decoder(prepare_for_decoding(model, "graph"), "graph")
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=1.5), model.config.vocab_size, model.device)
    got = [s.token for s in generate(model, ids[0].tolist(), 32, sampler, decoder=decoder)]
    assert decoder.mode == "graph" and decoder.graph.graph is not None  # it was captured, not fallen back
    assert got == out[0, ids.shape[1]:].tolist()


@cuda
def test_graph_step_follows_a_new_cache(checkpoints):
    """A second sequence in a bigger cache recaptures: its logits are the eager step's."""
    path, _ = checkpoints("moe")
    model = prepare_for_decoding(load_model(path, "cuda", torch.bfloat16), "graph")
    eager, graph = Decoder(model, "eager"), Decoder(model, "graph")
    for positions in (40, 600):
        ids = _prompt(8, seed=positions).cuda()
        outs = []
        for dec in (eager, graph):
            dec.reserve(positions)
            with torch.no_grad():
                dec.prefill(ids[:, :4])
                outs.append(torch.stack([dec(ids[:, i : i + 1], i) for i in range(4, 8)]).float())
        scale = outs[0].abs().max().item()
        assert (outs[0] - outs[1]).abs().max().item() <= 2.0**-6 * scale
        assert torch.equal(outs[0].argmax(-1), outs[1].argmax(-1))


_NO_DYNAMO = """
import sys, torch
from ernie_cli.runtime.decoder import Decoder, step_mode
from ernie_cli.runtime.generate import generate
from ernie_cli.runtime.sampling import Sampler, SamplingParams
from ernie_cli.weights.loader import load_model, prepare_for_decoding
device = torch.device(sys.argv[2])
mode = step_mode("auto", device)
model = prepare_for_decoding(load_model(sys.argv[1], device, torch.bfloat16), mode)
sampler = Sampler(SamplingParams(temperature=0), model.config.vocab_size, model.device)
tokens = [s.token for s in generate(model, [5, 6, 7], 8, sampler, decoder=Decoder(model, mode))]
assert len(tokens) == 8
print(sorted(m for m in ("torch._dynamo", "torch._inductor", "sympy") if m in sys.modules))
"""


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_a_one_shot_run_never_imports_the_compiler(checkpoints, device):
    """What `ernie complete` runs by default imports neither Dynamo nor Inductor: their import alone
    (and the first call of any torch custom operator, which brings them) took 2-4 s of a one-shot run."""
    import subprocess
    import sys

    path, _ = checkpoints("moe")
    out = subprocess.run([sys.executable, "-c", _NO_DYNAMO, str(path), device], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
