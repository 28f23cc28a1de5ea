"""Many sequences decoded together, each at its own position: the engine behind `ernie serve`.

One step is one forward over a packed row of tokens: the next token of every sequence that is
generating, then chunks of the prompts still being read, up to STEP_TOKENS tokens in all. Every
per-token operation runs once over the whole row, so each routed expert's weights are read once
for all the tokens sent to it (kernels/ops.experts groups them), the dense matrices and the head
once for the batch; attention alone runs per sequence, over that sequence's cache blocks.

The keys and values live in one pool (model/cache.PagedKVCache) of blocks of BLOCK positions,
sized once at start-up; a sequence is given the blocks for its prompt and its most new tokens when
it is admitted, so a running sequence never waits for memory, and returns them when it ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ernie_cli.model.cache import PagedKVCache, Ragged, paged_bytes_per_token
from ernie_cli.model.ernie import ErnieForCausalLM, rope_table
from ernie_cli.runtime.generate import Step
from ernie_cli.runtime.sampling import Sampler, SamplingParams

BLOCK = 16  # positions per block: small enough that a sequence wastes little, large enough to index cheaply
STEP_TOKENS = 512  # most tokens in one forward: a long prompt is read in chunks between others' tokens
# Of the memory free after loading, the share the KV pool takes: the rest is for activations, the
# logits of echoed prompts and whatever else runs on the machine.
POOL_SHARE = {"cuda": 0.85, "cpu": 0.5}


@dataclass
class Sequence:
    """One sequence in the engine: its prompt, what it has generated and where its keys are."""

    prompt: list[int]
    max_new: int  # most tokens to generate (0: only read the prompt, for its logprobs)
    sampling: SamplingParams
    logprobs: int | None = None  # top-n logprobs of each generated token (None: none)
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (echo)
    blocks: list[int] = field(default_factory=list)
    done: int = 0  # positions already in the cache
    generated: list[int] = field(default_factory=list)
    sampler: Sampler | None = None

    @property
    def reading(self) -> bool:
        return self.done < len(self.prompt)

    @property
    def positions(self) -> int:
        """Positions to reserve: the prompt and every new token but the last, which is never fed back."""
        return len(self.prompt) + max(self.max_new - 1, 0)


@dataclass
class Output:
    """What one step made for one sequence."""

    prompt: list[tuple[float, list[tuple[int, float]] | None]] = field(default_factory=list)  # per prompt token read
    step: Step | None = None  # the token sampled, when the sequence reached the end of its input


def pool_tokens(model: ErnieForCausalLM, free: int, want: int) -> int:
    """How many positions the pool holds: `want`, or what the share of `free` bytes takes, in whole blocks."""
    cfg = model.config
    per_token = paged_bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, model.dtype)
    share = POOL_SHARE.get(model.device.type, 0.5)
    fits = int(free * share) // per_token
    return max(0, min(want, fits)) // BLOCK * BLOCK


class BatchDecoder:
    """The KV pool and the batched step. Not thread-safe: one scheduler thread drives it."""

    def __init__(self, model: ErnieForCausalLM, tokens: int, context: int):
        cfg = model.config
        self.model, self.context = model, context
        self.cache = PagedKVCache(cfg.num_hidden_layers, tokens // BLOCK, BLOCK, cfg.num_key_value_heads, cfg.head_dim,
                                  context, model.dtype, model.device, lambda n: rope_table(cfg.head_dim, cfg.rope_theta, n, model.device))
        self.free = list(range(tokens // BLOCK))

    @property
    def tokens(self) -> int:
        return self.cache.blocks * BLOCK

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.buffers())

    @staticmethod
    def blocks_for(positions: int) -> int:
        return -(-positions // BLOCK)

    def admit(self, seq: Sequence) -> bool:
        """Give seq its blocks and sampler, if the pool has room for all it may need."""
        need = self.blocks_for(seq.positions)
        if need > len(self.free):
            return False
        seq.blocks, self.free = self.free[:need], self.free[need:]
        seq.sampler = Sampler(seq.sampling, self.model.config.vocab_size, self.model.device)
        seq.sampler.observe_prompt(torch.tensor(seq.prompt, device=self.model.device))
        return True

    def release(self, seq: Sequence) -> None:
        self.free.extend(seq.blocks)
        seq.blocks, seq.sampler = [], None

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], budget: int = STEP_TOKENS) -> dict[int, Output]:
        """One forward for the sequences given (generating ones first, then prompt chunks while the
        budget lasts); returns what each sequence that took part got, by its index in seqs."""
        device = self.model.device
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].reading)
        ids: list[int] = []
        positions: list[int] = []
        spans, rows, plan = [], [], []
        for i in order:
            seq = seqs[i]
            if seq.reading:
                if budget <= 0:
                    continue
                chunk = seq.prompt[seq.done : seq.done + budget]
            else:
                chunk = [seq.generated[-1]]
            budget -= len(chunk)
            start, t = seq.done, len(chunk)
            slots = self.cache.slots_of(seq.blocks, start + t)
            offset = len(ids)
            spans.append((offset, t, start, slots))
            ids += chunk
            positions += range(start, start + t)
            ends = start + t >= len(seq.prompt)  # the last row gives the next token's distribution
            first_row = len(rows)
            if seq.prompt_logprobs is not None and seq.reading:
                rows += range(offset, offset + t)
            elif ends:
                rows.append(offset + t - 1)
            plan.append((i, seq, start, t, first_row, len(rows), ends))
        if not plan:
            return {}
        batch = Ragged(torch.tensor(positions, device=device), torch.cat([s[start:] for _, _, start, s in spans]), spans)
        tokens = torch.tensor([ids], device=device)
        logits = self.model(tokens, batch, self.cache, last=torch.tensor(rows, device=device))[0].float()
        finite = torch.isfinite(logits).all(dim=-1).tolist() if rows else []  # one check and one sync for all rows
        out: dict[int, Output] = {}
        for i, seq, start, t, lo, hi, ends in plan:
            result = Output()
            if seq.prompt_logprobs is not None and seq.reading:
                result.prompt = self._prompt_logprobs(seq, logits[lo:hi], start)
            seq.done = start + t
            if ends and seq.max_new > 0:
                result.step = self._sample(seq, logits[hi - 1]) if finite[hi - 1] else Step(-1)
            out[i] = result
        return out

    def _prompt_logprobs(self, seq: Sequence, rows: torch.Tensor, start: int) -> list:
        """Logprobs of the prompt tokens after each row (the rows' positions start, start+1, ...)."""
        targets = seq.prompt[start + 1 : start + 1 + rows.shape[0]]
        if not targets:
            return []
        lp = torch.log_softmax(rows[: len(targets)], dim=-1)
        chosen = lp.gather(1, torch.tensor(targets, device=lp.device)[:, None])[:, 0].tolist()
        tops: list = [None] * len(targets)
        if seq.prompt_logprobs:
            values, idx = torch.topk(lp, seq.prompt_logprobs, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), values.tolist())]
        return list(zip(chosen, tops))

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> Step:
        """As runtime/generate does for one sequence (the logits are known to be finite)."""
        sampler = seq.sampler
        token = sampler(logits)
        step = Step(int(token))
        sampler.observe(token)
        seq.generated.append(step.token)
        if seq.logprobs is not None:
            lp = torch.log_softmax(logits, dim=-1)
            step.logprob = float(lp[step.token])
            if seq.logprobs > 0:
                values, idx = torch.topk(lp, seq.logprobs)
                step.top = list(zip(idx.tolist(), values.tolist()))
        return step
