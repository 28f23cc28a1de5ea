"""The head start on Triton's hashing (ernie_cli/kernels/triton/warm.py): where it runs, that it
leaves Triton's installation key and every kernel's source hash computed, as the first launch would."""

import pytest
import torch

from ernie_cli.kernels.triton import gemv as gpu_gemv
from ernie_cli.kernels.triton import warm


def test_nothing_starts_for_the_cpu():
    assert warm.begin(torch.device("cpu")) is None
    warm.finish(None)


@pytest.mark.skipif(not (torch.cuda.is_available() and gpu_gemv.triton is not None), reason="needs a CUDA GPU and Triton")
def test_the_thread_leaves_the_installation_key_and_every_kernel_hash_computed():
    from triton.runtime.cache import triton_key

    kernels = list(warm._kernels())
    names = {k.fn.__name__ for k in kernels}
    assert {"_gemv", "_grouped"} <= names and len(kernels) >= 8  # autotuned kernels are found through their tuners
    warm.finish(warm.begin(torch.device("cuda")))
    assert triton_key.cache_info().currsize == 1
    assert all(k.hash is not None for k in kernels)
