"""Many sequences decoded together, each at its own position: the engine behind `ernie serve`.

One step is one forward over a packed row of tokens: the next token of every sequence that is
generating, then chunks of the prompts still being read, up to STEP_TOKENS tokens in all. Every
per-token operation runs once over the whole row, so each routed expert's weights are read once
for all the tokens sent to it (kernels/ops.experts groups them), the dense matrices and the head
once for the batch; attention alone runs per sequence, over that sequence's cache blocks.

A step in which every sequence only decodes (no prompt is being read: most steps of a busy server)
takes a path of static shapes: one token per sequence, each sequence's blocks as a row of a table,
attention for all of them in one kernel (ops.paged_decode_attention). On CUDA that step is a CUDA
graph per batch-size bucket (DecodeGraphs), the batch padded to its bucket with rows that write a
scratch block no sequence owns.

The keys and values live in one pool (model/cache.PagedKVCache) of blocks of BLOCK positions,
sized once at start-up; a sequence is given the blocks for its prompt and its most new tokens when
it is admitted, so a running sequence never waits for memory, and returns them when it ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import os

import torch

from ernie_cli.console import warn
from ernie_cli.kernels import ops
from ernie_cli.model.cache import PagedChunks, PagedDecode, PagedKVCache, Ragged, paged_bytes_per_token
from ernie_cli.model.ernie import ErnieForCausalLM, rope_table
from ernie_cli.runtime.decoder import capture_graph, prefill_waits_for_host
from ernie_cli.runtime.generate import Step
from ernie_cli.runtime.sampling import Sampler, SamplingParams

BLOCK = 16  # positions per block: small enough that a sequence wastes little, large enough to index cheaply
# Most tokens in one forward, by device: a long prompt is read in chunks between others' tokens. On
# CUDA a step of 512 tokens was bound by Python queueing its kernels (80 ms, the GPU busy for 19), so
# a larger chunk costs the decoding sequences little more wait and reads prompts several times faster;
# on a small CPU a step's time grows with its tokens, and 512 already stalls the others for seconds.
STEP_TOKENS = {"cuda": 2048, "cpu": 512}
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


@dataclass
class Queued:
    """A decode-only step queued on the GPU: its logits (float32 [B, V], a tensor of its own), and
    whether each row is finite and its argmax, on their way to pinned memory behind an event."""

    seqs: list[int]  # id() of each sequence, in the batch's order
    positions: list[int]
    logits: torch.Tensor
    argmax: torch.Tensor  # [B] on the device: the next tokens of greedy sequences, for a step queued behind this one
    host: torch.Tensor
    event: torch.cuda.Event

    def read(self) -> tuple[list[bool], list[int]]:
        self.event.synchronize()  # waits for this step only, not for one queued behind it
        finite, argmax = self.host[:, : len(self.seqs)].tolist()
        return [bool(f) for f in finite], argmax


class DecodeGraphs:
    """The decode-only step as one CUDA graph per batch-size bucket.

    Why: eagerly, a step of the 28-layer model queues about 1,100 kernels, and Python queueing them
    takes longer than the GPU running them at small batches. A graph's inputs are fixed buffers: the
    tokens, positions, slots and block table of up to `bucket` sequences, the rest of the bucket
    padded with rows at position 0 whose key and value go to the scratch slot. All graphs share one
    memory pool; they run one at a time, and each step's logits are copied out before the next
    replay. The host buffers come in pairs, used in turn: a step may be queued while the one before
    it still waits for its copies."""

    BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)

    def __init__(self, model: ErnieForCausalLM, cache: PagedKVCache, width: int, scratch_slot: int):
        self.model, self.cache, self.width, self.scratch = model, cache, width, scratch_slot
        self.graphs: dict[int, tuple] = {}
        self.pool = None
        self.failed = False  # a capture failed: every step runs eagerly from then on
        self.turn = 0

    def bucket_for(self, b: int) -> int:
        return next((n for n in self.BUCKETS if n >= b), b)

    def buckets_up_to(self, b: int) -> list[int]:
        top = self.bucket_for(b)
        return [n for n in self.BUCKETS if n <= top] or [top]

    def queue(self, ids: list[int] | torch.Tensor, positions: list[int], slots: list[int], rows: list[list[int]], seqs: list[int]) -> Queued:
        """Queue the step of B sequences; ids: their tokens, or a device tensor of them (the argmax
        of the step queued before, which need not have finished)."""
        b = len(positions)
        n = self.bucket_for(b)
        graph, tokens, batch, logits, buffers = self.ensure(n)
        host, table_host, back, copied = buffers[self.turn]
        self.turn ^= 1
        copied.synchronize()  # the step that last read these buffers has (it was queued two steps ago)
        pad = n - b
        host_ids = [0] * n if isinstance(ids, torch.Tensor) else ids + [0] * pad
        host.copy_(torch.tensor([host_ids, positions + [0] * pad, slots + [self.scratch] * pad]))
        used = max(len(r) for r in rows)
        scratch_block = self.scratch // BLOCK
        table_host[:b, :used] = torch.tensor([r + [scratch_block] * (used - len(r)) for r in rows], dtype=torch.int32)
        table_host[b:, :used] = scratch_block
        tokens.view(-1).copy_(host[0], non_blocking=True)
        if isinstance(ids, torch.Tensor):
            tokens.view(-1)[:b].copy_(ids)
        batch.positions.copy_(host[1], non_blocking=True)
        batch.slots.copy_(host[2], non_blocking=True)
        batch.table[:, :used].copy_(table_host[:, :used], non_blocking=True)
        copied.record()
        graph.replay()
        out = logits[:b].to(torch.float32, copy=True)  # a copy even in float32: the next replay overwrites the graph's
        both = ops.finite_and_argmax(out)
        argmax = both[1]
        back[:, :b].copy_(both, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Queued(seqs, positions, out, argmax, back, event)

    def ensure(self, n: int) -> tuple:
        """The graph of bucket n and its buffers, captured now if not yet."""
        if n not in self.graphs:
            self.graphs[n] = self._capture(n)
        return self.graphs[n]

    def _capture(self, n: int) -> tuple:
        device = self.model.device
        buffers = [(torch.zeros((3, n), dtype=torch.long, pin_memory=True), torch.zeros((n, self.width), dtype=torch.int32, pin_memory=True),
                    torch.zeros((2, n), dtype=torch.long, pin_memory=True), torch.cuda.Event()) for _ in range(2)]
        tokens = torch.zeros((1, n), dtype=torch.long, device=device)
        batch = PagedDecode(torch.zeros(n, dtype=torch.long, device=device), torch.full((n,), self.scratch, dtype=torch.long, device=device),
                            torch.full((n, self.width), self.scratch // BLOCK, dtype=torch.int32, device=device), BLOCK)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph, logits = capture_graph(lambda: self.model(tokens, batch, self.cache)[0], device, self.pool)
        return graph, tokens, batch, logits, buffers


class BatchDecoder:
    """The KV pool and the batched step. Not thread-safe: one scheduler thread drives it."""

    def __init__(self, model: ErnieForCausalLM, tokens: int, context: int, graphs: bool | None = None):
        """graphs: hold the decode-only step in CUDA graphs (None: wherever the model is on CUDA)."""
        cfg = model.config
        self.model, self.context = model, context
        blocks = tokens // BLOCK
        # One block more than is handed out: the scratch that a graph's padding rows write into.
        self.cache = PagedKVCache(cfg.num_hidden_layers, blocks + 1, BLOCK, cfg.num_key_value_heads, cfg.head_dim,
                                  context, model.dtype, model.device, lambda n: rope_table(cfg.head_dim, cfg.rope_theta, n, model.device))
        self.free = list(range(blocks))
        self.width = table_width(self.blocks_for(context))  # a block table's row: the most blocks one sequence reads
        self.step_tokens = STEP_TOKENS.get(model.device.type, STEP_TOKENS["cpu"])
        if graphs is None:  # a batch's experts on CUDA wait for the host in float32 and before Hopper
            graphs = model.device.type == "cuda" and not prefill_waits_for_host(model)
        self.graphs = DecodeGraphs(model, self.cache, self.width, blocks * BLOCK) if graphs else None
        self.ahead: Queued | None = None  # a decode step queued before its batch was known to go on

    @property
    def tokens(self) -> int:
        return (self.cache.blocks - 1) * BLOCK

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
    def step(self, seqs: list[Sequence], budget: int | None = None) -> dict[int, Output]:
        """One forward for the sequences given (generating ones first, then prompt chunks while the
        budget, step_tokens by default, lasts); returns what each sequence that took part got, by
        its index in seqs."""
        budget = self.step_tokens if budget is None else budget
        if seqs and all(not seq.reading and seq.generated for seq in seqs):
            return self._decode_step(seqs)
        self.ahead = None  # the batch changed: a step queued for the old one is not used
        device = self.model.device
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].reading)  # the decoding ones first
        decoding = [seqs[i] for i in order if not seqs[i].reading]
        ids = [seq.generated[-1] for seq in decoding]
        rows = list(range(len(decoding)))  # each decoding token's row gives its sequence's next token
        budget -= len(decoding)
        plan = [(i, seqs[i], seqs[i].done, 1, row, row + 1, True) for row, i in enumerate(order[: len(decoding)])]
        positions: list[int] = []
        spans, tables = [], []
        for i in order[len(decoding):]:
            seq = seqs[i]
            if budget <= 0:
                break
            chunk = seq.prompt[seq.done : seq.done + budget]
            budget -= len(chunk)
            start, t = seq.done, len(chunk)
            offset = len(ids)
            spans.append((offset - len(decoding), t, start, self.cache.slots_of(seq.blocks, start + t)))
            tables.append(seq.blocks[: self.blocks_for(start + t)])
            ids += chunk
            positions += range(start, start + t)
            ends = start + t >= len(seq.prompt)  # the last row gives the next token's distribution
            first_row = len(rows)
            if seq.prompt_logprobs is not None:
                rows += range(offset, offset + t)
            elif ends:
                rows.append(offset + t - 1)
            plan.append((i, seq, start, t, first_row, len(rows), ends))
        if not plan:
            return {}
        decode = self._paged(decoding, [seq.done for seq in decoding]) if decoding else None
        slots = torch.cat([s[start:] for _, _, start, s in spans]) if spans else torch.empty(0, dtype=torch.long, device=device)
        chunks = None
        if spans:
            chunks = PagedChunks([t for _, t, _, _ in spans], [start for _, _, start, _ in spans], tables, BLOCK,
                                 table_width(max(len(r) for r in tables)), device)
        batch = Ragged(torch.tensor(positions, dtype=torch.long, device=device), slots, spans, decode, chunks)
        tokens = torch.tensor([ids], device=device)
        logits = self.model(tokens, batch, self.cache, last=torch.tensor(rows, device=device))[0].float()
        finite, greedy = self._read_back(logits, [seq for _, seq, *_ in plan])
        out: dict[int, Output] = {}
        for i, seq, start, t, lo, hi, ends in plan:
            result = Output()
            if seq.prompt_logprobs is not None and seq.reading:
                result.prompt = self._prompt_logprobs(seq, logits[lo:hi], start)
            seq.done = start + t
            if ends and seq.max_new > 0:
                result.step = self._sample(seq, logits[hi - 1], greedy[hi - 1]) if finite[hi - 1] else Step(-1)
            out[i] = result
        return out

    def _decode_step(self, seqs: list[Sequence]) -> dict[int, Output]:
        """Every sequence feeds its last token: one token each, in the batch's static-shape step.

        With CUDA graphs and every sequence greedy without penalties, the next step is queued on
        the GPU before this one's tokens are read back (its tokens are this one's argmax, on the
        device), so the host's work on a step's results (text, stop strings, sending) overlaps the
        GPU's work on the next. If the batch then changes (a sequence ends or joins), that step is
        dropped: what it wrote into the cache for the sequences that go on is what the step run
        in its place writes again."""
        positions = [seq.done for seq in seqs]
        ids = [id(seq) for seq in seqs]
        queued, self.ahead = self.ahead, None
        if queued is not None and (queued.seqs != ids or queued.positions != positions):
            queued = None
        if queued is None and self.graphs is not None and not self.graphs.failed:
            try:
                queued = self.graphs.queue([seq.generated[-1] for seq in seqs], positions, *self._places(seqs, positions), ids)
            except RuntimeError as e:  # something in the step waited for the host: stay correct, say so
                if os.environ.get("ERNIE_DEBUG") == "1":
                    raise
                warn(f"the batched decode step could not be captured as a CUDA graph ({str(e).splitlines()[0]}); it runs eagerly.")
                self.graphs.failed = True
        if queued is not None:
            if all(plain_greedy(seq) and len(seq.generated) + 1 < seq.max_new for seq in seqs):
                after = [p + 1 for p in positions]
                self.ahead = self.graphs.queue(queued.argmax, after, *self._places(seqs, after), ids)
            logits = queued.logits
            finite, greedy = queued.read()
        else:
            logits = self._eager_decode(seqs, positions)
            finite, greedy = self._read_back(logits, seqs)
        out: dict[int, Output] = {}
        for i, seq in enumerate(seqs):
            seq.done += 1
            out[i] = Output(step=self._sample(seq, logits[i], greedy[i]) if finite[i] else Step(-1))
        return out

    @staticmethod
    def _places(seqs: list[Sequence], positions: list[int]) -> tuple[list[int], list[list[int]]]:
        """The slot each sequence's new key goes to, and its blocks up to that position."""
        slots = [seq.blocks[p // BLOCK] * BLOCK + p % BLOCK for seq, p in zip(seqs, positions)]
        return slots, [seq.blocks[: p // BLOCK + 1] for seq, p in zip(seqs, positions)]

    def _paged(self, seqs: list[Sequence], positions: list[int]) -> PagedDecode:
        """The decoding sequences' part of an eager step, its table as wide as its longest row."""
        device = self.model.device
        slots, rows = self._places(seqs, positions)
        width = table_width(max(len(r) for r in rows))
        table = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)
        return PagedDecode(torch.tensor(positions, device=device), torch.tensor(slots, device=device), table.to(device), BLOCK)

    def _eager_decode(self, seqs: list[Sequence], positions: list[int]) -> torch.Tensor:
        ids = torch.tensor([[seq.generated[-1] for seq in seqs]], device=self.model.device)
        return self.model(ids, self._paged(seqs, positions), self.cache)[0].float()

    @torch.inference_mode()
    def warm(self, max_batch: int) -> int:
        """Capture the decode graphs of every bucket up to max_batch now (start-up), not at the
        first step that needs one (a request's wait). Returns how many were captured."""
        if self.graphs is None or self.graphs.failed:
            return 0
        # Steps reading a whole chunk of prompt, of an even and an odd length (Triton specialises a
        # kernel on whether its sizes divide by 16): the kernels of the prompts' shapes compile (or
        # load from Triton's cache) now as well.
        for length in (self.step_tokens, self.step_tokens - 3):
            probe = Sequence([0] * min(length, self.context), 1, SamplingParams(temperature=0))
            if self.admit(probe):
                self.step([probe])
                self.release(probe)
        for n in self.graphs.buckets_up_to(max_batch):
            self.graphs.ensure(n)
        return len(self.graphs.graphs)

    @staticmethod
    def _read_back(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[bool], list[int | None]]:
        """Whether each row of logits is finite, and its argmax where some sequence samples greedily
        without penalties: one read back for the whole batch, not one per sequence."""
        if not logits.shape[0]:
            return [], []
        if not any(plain_greedy(seq) for seq in seqs):
            return torch.isfinite(logits).all(dim=-1).tolist(), [None] * logits.shape[0]
        both = ops.finite_and_argmax(logits).tolist()
        return [bool(f) for f in both[0]], both[1]

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

    def _sample(self, seq: Sequence, logits: torch.Tensor, argmax: int | None = None) -> Step:
        """As runtime/generate does for one sequence (the logits are known to be finite). argmax: the
        row's argmax, read back already, which is the token of a greedy sequence without penalties
        (whose sampler keeps no counts that anything reads)."""
        if argmax is not None and plain_greedy(seq):
            step = Step(argmax)
        else:
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


def table_width(blocks: int) -> int:
    """A block table's width: a multiple of 16. Triton specialises a kernel on whether each integer
    argument divides by 16, so an eager step whose table had an odd width compiled the attention
    kernel again (1.2 s inside a request, per variant) although its graphs had it compiled."""
    return -(-blocks // 16) * 16


def plain_greedy(seq: Sequence) -> bool:
    """Greedy without penalties: the token is the logits' argmax, and the sampler's counts are unused."""
    p = seq.sampling
    return p.greedy and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
