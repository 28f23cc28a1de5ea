"""bf16 products of many tokens widened to float32 on CPUs without bf16 arithmetic (kernels/cpu/widened.py)."""

import pytest
import torch

from ernie_cli.kernels.cpu import widened


@pytest.mark.parametrize("m, n, k", [(2, 700, 320), (37, 1030, 256)])
def test_widened_bf16_product_against_float64(m, n, k, monkeypatch):
    """kernels/cpu/widened.py (many bf16 tokens on a CPU without bf16 arithmetic): the weight widened
    to float32 in slices (n not a multiple of ROWS: a partial last slice), summed in float32 and
    rounded once to bf16: within float32 summation plus half a bf16 step of float64."""
    monkeypatch.setattr(widened, "ROWS", 256)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).bfloat16()
    w = (0.05 * torch.randn(n, k, generator=gen)).bfloat16()
    y = widened.linear(x, w)
    ref = x.double() @ w.double().T
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    bound = 2.0**-8 * ref.abs() + 1e-6 * (x.double().abs() @ w.double().abs().T) + 1e-30
    assert ((y.double() - ref).abs() <= bound).all()


def test_widening_is_chosen_only_for_many_bf16_tokens_on_a_cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(widened, "cpu_lacks_bf16", lambda: True)
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    many, one = torch.zeros(3, 64, dtype=torch.bfloat16), torch.zeros(1, 64, dtype=torch.bfloat16)
    assert widened.takes(many, w) and not widened.takes(one, w)
    assert not widened.takes(many.float(), w.float())
    monkeypatch.setattr(widened, "cpu_lacks_bf16", lambda: False)
    assert not widened.takes(many, w)
