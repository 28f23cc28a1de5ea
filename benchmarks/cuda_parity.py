"""Check the CUDA path against transformers' eager float32 reference on the same GPU.

Usage (on a CUDA machine, from the repository root): python benchmarks/cuda_parity.py [SHAPE ...]
(all of tests/tiny_models.py's shapes when none are named)
Prints one row per checkpoint shape: fp32 max |diff| of logits, greedy 32-token agreement (with a
repetition penalty so the tiny random models do not repeat one token), and bf16 KL / top-1 against
the fp32 reference.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models import SHAPES, load_reference, write_checkpoint  # noqa: E402

from ernie_cli.runtime.decoder import Decoder  # noqa: E402
from ernie_cli.runtime.generate import generate  # noqa: E402
from ernie_cli.runtime.sampling import Sampler, SamplingParams  # noqa: E402
from ernie_cli.weights.loader import load_model, prepare_for_decoding  # noqa: E402

MODES = ("eager", "graph", "compile")


def kl(p_logits, q_logits):
    return torch.nn.functional.kl_div(q_logits.log_softmax(-1), p_logits.log_softmax(-1), log_target=True, reduction="none").sum(-1)


def steps_vs_eager(shape, m32, m16, prompt):
    """The decode step as a captured CUDA graph and as Inductor's compiled graph, each against the
    eager step: greedy tokens in fp32, teacher-forced logits in bf16."""
    runs, logits = {}, {}
    for mode in MODES:
        sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=1.5), m32.config.vocab_size, m32.device)
        runs[mode] = [s.token for s in generate(m32, prompt, 64, sampler, decoder=Decoder(prepare_for_decoding(m32, mode), mode))]
    tok = torch.tensor([prompt], device=m16.device)
    for mode in MODES:
        dec = Decoder(prepare_for_decoding(m16, mode), mode)
        cache = dec.reserve(64)
        with torch.no_grad():  # teacher-forced, so every run sees the same tokens
            m16(tok[:, :1], 0, cache)
            out = [dec(tok[:, i : i + 1], i) for i in range(1, len(prompt))]
        logits[mode] = torch.stack(out).float()
    scale = logits["eager"].abs().max().item()
    return [(shape, mode, runs[mode] == runs["eager"], (logits[mode] - logits["eager"]).abs().max().item(), scale) for mode in MODES[1:]]


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    rows, compiled = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in sys.argv[1:] or SHAPES:
            path, _ = write_checkpoint(Path(tmp) / shape, shape)
            ref = load_reference(path).to(dev)
            ids = torch.randint(3, 500, (2, 33), generator=torch.Generator().manual_seed(3)).to(dev)
            ours32 = load_model(path, dev, torch.float32)
            ours16 = load_model(path, dev, torch.bfloat16)
            with torch.no_grad():
                expected = ref(ids).logits
                diff = (ours32(ids) - expected).abs().max().item()
                got16 = ours16(ids).float()
                ref_out = ref.generate(ids[:1, :9], max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                       repetition_penalty=1.5, eos_token_id=None, pad_token_id=0)
            want = ref_out[0, 9:].tolist()
            sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=1.5), ours32.config.vocab_size, dev)
            got = [s.token for s in generate(ours32, ids[0, :9].tolist(), 32, sampler)]
            rows.append((shape, diff, got == want, kl(expected, got16).mean().item(),
                         (got16.argmax(-1) == expected.argmax(-1)).float().mean().item()))
            if shape in ("moe", "dense"):
                compiled.extend(steps_vs_eager(shape, ours32, ours16, ids[0, :9].tolist()))
            del ref, ours32, ours16
    print(f"\nCUDA parity on {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    print("| shape | fp32 max abs diff | greedy 32 identical | bf16 mean KL | bf16 top-1 |")
    print("|---|---:|---|---:|---:|")
    for shape, diff, same, k, top1 in rows:
        print(f"| {shape} | {diff:.2e} | {same} | {k:.2e} | {top1:.3f} |")
    print("\n| shape | step | against eager: fp32 greedy 64 identical | bf16 decode logits max abs diff (scale) |")
    print("|---|---|---|---:|")
    for shape, mode, same, diff, scale in compiled:
        print(f"| {shape} | {mode} | {same} | {diff:.3e} ({scale:.2f}) |")
    ok = all(d < 1e-4 and same for _, d, same, _, _ in rows) and all(c[2] for c in compiled)
    print("PARITY", "OK" if ok else "FAILED")


if __name__ == "__main__":
    main()
