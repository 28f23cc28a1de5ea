"""The server's batched engine and scheduler, in-process, in float32 on the CPU.

References: transformers' logits (float64 log-softmax) for prompt logprobs, and `ernie complete`'s
own runtime (runtime/completion.run_completion, one sequence through the dense decoder) for the
tokens and logprobs of each request, whatever else shares its batch.
"""

from __future__ import annotations


import pytest
import torch
from tiny_models import load_reference, write_full_vocab_checkpoint

from ernie_cli.runtime import completion
from ernie_cli.runtime.batch import BLOCK, BatchDecoder, Sequence
from ernie_cli.runtime.sampling import SamplingParams
from ernie_cli.serve.scheduler import Job, Scheduler

PROMPTS = ["The capital of France is", "1, 1, 2, 3, 5,", "今天的天气", "Once upon a time, in a land far away, there lived",
           "def main():", "A", "Paris, London, Berlin and", "The quick brown fox jumps over the lazy dog. " * 6]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads wait for each other for seconds at a
    time under load, and both sides of every comparison here run the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory, tokenizer_dir):
    path, _ = write_full_vocab_checkpoint(tmp_path_factory.mktemp("serve-engine") / "tiny-ernie", tokenizer_dir, 1024)
    return completion.load_runtime(path, "cpu", "float32", compile="off")


def _scheduler(runtime, max_batch=8, tokens=8192, sizes=None):
    engine = BatchDecoder(runtime.model, tokens, 1024)
    return Scheduler(engine, max_batch, 1000, on_step=None if sizes is None else sizes.append)


def _job(runtime, prompt, max_new, logprobs=3, sampling=None, echo=False):
    got = []
    job = Job(got.extend)
    ids = runtime.tokenizer.encode(prompt)
    seq = Sequence(ids, max_new, sampling or SamplingParams(temperature=0), logprobs, logprobs if echo else None)
    job.add(seq, runtime.tokenizer, [], completion.stop_token_ids(runtime))
    return job, got


def _result(updates):
    tokens = [t for u in updates for t in u.tokens]
    finish = [u.finish for u in updates if u.finish]
    return [t[0] for t in tokens], [t[1] for t in tokens], "".join(u.text for u in updates), finish


def _drain(scheduler, limit=2000):
    for _ in range(limit):
        if not scheduler.running and not scheduler.waiting:
            return
        scheduler.step()
    raise AssertionError("the scheduler did not finish")


def test_batched_requests_equal_alone_and_complete(runtime):
    """Eight greedy requests that join at different steps and leave at different lengths get the
    tokens and logprobs each gets alone, and that `ernie complete`'s runtime gets."""
    lengths = [12, 30, 7, 25, 18, 3, 40, 9]
    sizes: list[int] = []
    scheduler = _scheduler(runtime, sizes=sizes)
    decode_only: list[int] = []  # batch sizes of the steps in which no prompt was read
    step = scheduler.engine._decode_step
    scheduler.engine._decode_step = lambda seqs: decode_only.append(len(seqs)) or step(seqs)
    jobs = []
    for i, (prompt, n) in enumerate(zip(PROMPTS, lengths)):
        job, got = _job(runtime, prompt, n)
        scheduler.submit(job)
        jobs.append(got)
        for _ in range(i % 3):  # the next one arrives while these run
            scheduler.step()
    _drain(scheduler)
    assert max(sizes) == 8 and min(sizes) < 8, sizes  # the batch filled up and emptied as requests left
    assert max(decode_only) >= 6 and min(decode_only) == 1  # the paged decode-only step ran, batched and alone
    assert len(scheduler.engine.free) * BLOCK == scheduler.engine.tokens  # every block came back

    for prompt, n, got in zip(PROMPTS, lengths, jobs):
        ids, lps, text, finish = _result(got)
        alone_scheduler = _scheduler(runtime)
        job, alone = _job(runtime, prompt, n)
        alone_scheduler.submit(job)
        _drain(alone_scheduler)
        alone_ids, alone_lps, alone_text, _ = _result(alone)
        assert ids == alone_ids and text == alone_text
        assert max(abs(a - b) for a, b in zip(lps, alone_lps)) < 1e-4

        local = completion.run_completion(runtime, completion.Request(prompt, n, SamplingParams(temperature=0), logprobs=3))
        assert ids == local.tokens and text == local.text
        assert max(abs(a - e["logprob"]) for a, e in zip(lps, local.logprobs)) < 1e-4
        assert finish == [{"eos": "stop"}.get(local.finish_reason, local.finish_reason)]


def test_echo_prompt_logprobs_equal_transformers(runtime):
    ref = load_reference(runtime.model_dir)
    prompt = PROMPTS[7] + PROMPTS[3]  # long enough to be read in several chunks beside another request
    scheduler = _scheduler(runtime)
    other, _ = _job(runtime, PROMPTS[0], 20)
    scheduler.submit(other)
    scheduler.step()
    job, got = _job(runtime, prompt, 1, logprobs=5, echo=True)
    scheduler.submit(job)
    ids = job.choices[0].seq.prompt
    _drain_in_chunks(scheduler, budget=16)  # the prompt is read 16 tokens a step
    rows = [entry for u in got if u.prompt for entry in u.prompt]
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), dim=-1)
    assert len(rows) == len(ids) - 1
    for i, (value, top) in enumerate(rows):
        expected = lp[i, ids[i + 1]].item()
        assert abs(value - expected) < 1e-4
        values, idx = torch.topk(lp[i], 5)
        assert [t for t, _ in top] == idx.tolist()
        assert max(abs(v - r) for (_, v), r in zip(top, values.tolist())) < 1e-4


def _drain_in_chunks(scheduler, budget):
    step = scheduler.engine.step
    scheduler.engine.step = lambda seqs: step(seqs, budget)
    try:
        _drain(scheduler)
    finally:
        del scheduler.engine.step


def test_seeded_sampling_in_a_batch_equals_complete(runtime):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=11)
    scheduler = _scheduler(runtime)
    busy, _ = _job(runtime, PROMPTS[3], 30)
    scheduler.submit(busy)
    scheduler.step()
    job, got = _job(runtime, PROMPTS[0], 15, sampling=params)
    scheduler.submit(job)
    _drain(scheduler)
    local = completion.run_completion(runtime, completion.Request(PROMPTS[0], 15, params, logprobs=0))
    assert _result(got)[0] == local.tokens


def test_a_request_that_does_not_fit_waits_and_blocks_come_back(runtime):
    engine_tokens = 4 * BLOCK
    scheduler = _scheduler(runtime, tokens=engine_tokens)
    first, got_first = _job(runtime, PROMPTS[0], 3 * BLOCK)  # nearly the whole pool
    second, got_second = _job(runtime, PROMPTS[1], BLOCK)
    scheduler.submit(first)
    scheduler.submit(second)
    scheduler.step()
    assert [c.job for c in scheduler.running] == [first] and len(scheduler.waiting) == 1
    _drain(scheduler)
    assert _result(got_first)[3] and _result(got_second)[3]
    assert len(scheduler.engine.free) * BLOCK == engine_tokens


def test_cancelled_request_leaves_at_the_next_step(runtime):
    scheduler = _scheduler(runtime)
    job, got = _job(runtime, PROMPTS[0], 500)
    keep, _ = _job(runtime, PROMPTS[1], 50)
    scheduler.submit(job)
    scheduler.submit(keep)
    for _ in range(3):
        scheduler.step()
    held = len(scheduler.engine.free)
    job.cancel()
    assert scheduler.step() == 1  # only the other one ran
    assert [c.job for c in scheduler.running] == [keep]
    assert len(scheduler.engine.free) > held
    n = len(got)
    _drain(scheduler)
    assert len(got) == n  # nothing more was sent to the cancelled job


def test_non_finite_logits_end_the_request_with_an_error(runtime):
    scheduler = _scheduler(runtime)
    job, got = _job(runtime, PROMPTS[0], 5)
    scheduler.submit(job)
    norm = runtime.model.norm.weight
    saved = norm.clone()
    try:
        norm.fill_(float("nan"))
        scheduler.step()
    finally:
        norm.copy_(saved)
    assert [u.error is not None for u in got] == [True] and "not finite" in got[0].error
    assert not scheduler.running and len(scheduler.engine.free) * BLOCK == scheduler.engine.tokens
