"""Shipped tuning choices (kernels/triton/tuned.py): a choice in the table is put into the tuner
before its first launch, and the launch then uses it without timing any configuration."""

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_a_shipped_choice_is_taken_without_tuning(monkeypatch):
    from ernie_cli.kernels.triton import gemv, tuned

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2560, device="cuda", generator=gen).bfloat16()
    w = torch.randn(1232, 2560, device="cuda", generator=gen).bfloat16()
    gemv.gemv("float", x, w)  # tuned once, so the tuner's own key for this shape is known
    (key,) = [k for k in gemv._gemv.cache if 1232 in k]
    chosen = gemv._gemv.configs[0]
    assert gemv._gemv.cache[key] is not chosen or len(gemv._gemv.configs) == 1
    monkeypatch.delitem(gemv._gemv.cache, key)
    name = torch.cuda.get_device_name()
    monkeypatch.setattr(tuned, "CHOICES", {name: {"_gemv": [(list(key), (dict(chosen.kwargs), chosen.num_warps, chosen.num_stages))]}})
    tuned.seed.cache_clear()

    def no_timing(*a, **k):
        raise AssertionError("the tuner timed configurations although a choice was shipped")

    monkeypatch.setattr(gemv._gemv, "_bench", no_timing)
    got = gemv.gemv("float", x, w)
    tuned.seed.cache_clear()
    assert gemv._gemv.cache[key] is chosen
    want = (w.double() @ x.double()).float()
    assert (got[0].float() - want).abs().max().item() <= 2e-2 * want.abs().max().item()
