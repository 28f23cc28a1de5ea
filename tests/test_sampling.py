"""The sampler's token counts (runtime/sampling.py), by hand, and without reading a token back to the host."""

import torch

from ernie_cli.runtime.sampling import Sampler, SamplingParams


def test_observed_tokens_are_counted_by_hand():
    sampler = Sampler(SamplingParams(temperature=0, frequency_penalty=1.0), 10, torch.device("cpu"))
    sampler.observe_prompt(torch.tensor([1, 2]))
    for token in (3, 5, 3):
        sampler.observe(torch.tensor(token))
    assert sampler.output_counts.tolist() == [0, 0, 0, 2, 0, 1, 0, 0, 0, 0]
    assert sampler.seen.nonzero().flatten().tolist() == [1, 2, 3, 5]
    logits = torch.zeros(10)
    assert sampler.penalise(logits).tolist() == [0, 0, 0, -2, 0, -1, 0, 0, 0, 0]


def test_observing_a_token_never_reads_it_back_to_the_host():
    """On CUDA a host read of the token in every step made the host wait for the step before it
    could queue the next. A meta tensor has no value to read: any .item() on it raises."""
    sampler = Sampler(SamplingParams(temperature=0), 10, torch.device("cpu"))
    meta = torch.device("meta")
    sampler.seen, sampler.output_counts, sampler._one = (t.to(meta) for t in (sampler.seen, sampler.output_counts, sampler._one))
    sampler.observe(torch.tensor(4, device=meta))
    sampler.observe(torch.tensor([7], device=meta))
