"""Checkpoint tensors copied through the staging workers (weights/staging.py), against safetensors'
own reader: same dtype, another dtype, views that are not contiguous, tensors split over many
chunks, all queued at once on several workers. The CPU runs the same code as CUDA, with plain
buffers in place of pinned ones; the CUDA test runs it with streams and pinned memory."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from ernie_cli.weights import staging
from ernie_cli.weights.checkpoint import Checkpoint
from ernie_cli.weights.staging import StagedCopier


@pytest.fixture
def ckpt(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(257, 131, generator=gen).to(torch.bfloat16),  # 67,334 bytes: many chunks of 4 KiB
        "small": torch.randn(3, 5, generator=gen),
        "ints": torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=gen),
        "empty": torch.zeros(0, 4),
        "odd": torch.randn(7, 9, generator=gen).to(torch.float16),  # 126 bytes: one short chunk
    }
    save_file(tensors, tmp_path / "model.safetensors")
    return Checkpoint(tmp_path), load_file(tmp_path / "model.safetensors")


def _copy_all(ckpt, device, workers):
    reader = ckpt.reader
    out = {}
    with StagedCopier(reader, torch.device(device), workers) as copier:
        out["big"] = copier.tensor("big")
        out["big_fp32"] = copier.tensor("big", torch.float32)  # converted on the way
        out["small"] = copier.tensor("small")
        out["ints"] = copier.tensor("ints")
        out["empty"] = copier.tensor("empty")
        out["odd"] = copier.tensor("odd")
        transposed = torch.empty(131, 257, dtype=torch.bfloat16, device=device).t()  # not contiguous
        copier.copy("big", transposed)
        halves = torch.empty(2, 257, 131, dtype=torch.bfloat16, device=device)
        copier.copy("big", halves[1])  # a slice of a stack, as the loader fills expert stacks
        seen = []
        copier.wait(seen.append)
    out["transposed"], out["stack"] = transposed, halves[1]
    return out, seen


def _check(out, seen, want):
    assert torch.equal(out["big"].cpu(), want["big"])
    assert torch.equal(out["big_fp32"].cpu(), want["big"].float())
    assert torch.equal(out["transposed"].cpu(), want["big"])
    assert torch.equal(out["stack"].cpu(), want["big"])
    for name in ("small", "ints", "empty", "odd"):
        assert out[name].dtype == want[name].dtype and torch.equal(out[name].cpu(), want[name])
    sizes = {name: t.numel() * t.element_size() for name, t in want.items()}
    assert sorted(seen) == sorted([sizes["big"]] * 4 + [sizes[n] for n in ("small", "ints", "empty", "odd")])


@pytest.mark.parametrize("workers", [1, 3])
def test_staged_copies_equal_safetensors(ckpt, monkeypatch, workers):
    monkeypatch.setattr(staging, "CHUNK", 4096)
    out, seen = _copy_all(ckpt[0], "cpu", workers)
    _check(out, seen, ckpt[1])


def test_a_wrong_size_is_refused_before_anything_is_queued(ckpt):
    with StagedCopier(ckpt[0].reader, torch.device("cpu"), 1) as copier:
        with pytest.raises(ValueError):
            copier.copy("small", torch.empty(16))
        assert not copier.futures


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_staged_copies_to_the_gpu_equal_safetensors(ckpt, monkeypatch):
    monkeypatch.setattr(staging, "CHUNK", 4096)
    out, seen = _copy_all(ckpt[0], "cuda", 3)
    _check(out, seen, ckpt[1])
