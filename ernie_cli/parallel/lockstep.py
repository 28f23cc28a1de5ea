"""Rank 0 drives the token loop; the other ranks repeat its decoder calls on their shards.

Every forward of a split model meets the other ranks in its collectives, so all ranks must make the
same calls in the same order. Rank 0 runs the ordinary runtime (generate, the benchmark loop) over a
Leader, which sends each decoder call to the others before making it; each other rank runs
follow(), which makes the same call on its own Decoder. Only rank 0 samples: the others never need
the logits, and no two ranks can disagree on a token.

A command is four integers broadcast from rank 0 (what, a, b, n), then the tokens [b, n] where the
call takes tokens.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ernie_cli.errors import ErnieError
from ernie_cli.model.cache import KVCache
from ernie_cli.parallel import group as parallel
from ernie_cli.runtime.decoder import Decoder

STOP, RESERVE, PREFILL, STEP, FILL = range(5)


class Leader:
    """A Decoder on rank 0 whose calls the other ranks make with it (the Decoder's interface).

    lost: which other rank has gone, if one has; asked when a call fails, so that a rank that died
    is named rather than the connection error it caused here."""

    def __init__(self, decoder: Decoder, lost: Callable[[], str | None] = lambda: None):
        self.decoder, self.lost = decoder, lost
        self.model = decoder.model
        self.compiled, self.mode = decoder.compiled, decoder.mode
        self.between_calls = True  # no collective under way: the followers wait for a command

    @property
    def cache(self) -> KVCache | None:
        return self.decoder.cache

    def reserve(self, positions: int, batch: int = 1) -> KVCache:
        return self._call(lambda: self.decoder.reserve(positions, batch), RESERVE, positions, batch, 0)

    def prefill(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self._call(lambda: self.decoder.prefill(tokens, start), PREFILL, start, *tokens.shape, tokens=tokens)

    def fill(self, tokens: torch.Tensor, start: int = 0) -> None:
        self._call(lambda: self.decoder.fill(tokens, start), FILL, start, *tokens.shape, tokens=tokens)

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        return self._call(lambda: self.decoder(tokens, pos), STEP, pos, *tokens.shape, tokens=tokens)

    def stop(self) -> None:
        """Let the followers return (only between calls: inside one they wait in a collective)."""
        if self.between_calls:
            self._send(STOP, 0, 0, 0)

    def _call(self, run: Callable[[], Any], what: int, a: int, b: int, n: int, tokens: torch.Tensor | None = None) -> Any:
        self.between_calls = False
        try:
            self._send(what, a, b, n, tokens)
            result = run()
        except RuntimeError:  # what a collective raises when its partner's connection breaks
            gone = self.lost()
            if gone:
                raise ErnieError(f"{gone} of the --tp run ended in the middle of a step: run again, with ERNIE_DEBUG=1 to see its error.") from None
            raise
        self.between_calls = True
        return result

    def _send(self, what: int, a: int, b: int, n: int, tokens: torch.Tensor | None = None) -> None:
        device = self.model.device
        parallel.broadcast(torch.tensor([what, a, b, n], dtype=torch.long, device=device))
        if tokens is not None:
            parallel.broadcast(tokens.to(device=device, dtype=torch.long).contiguous())


@torch.inference_mode()
def follow(decoder: Decoder) -> None:
    """Make rank 0's decoder calls on this rank's Decoder until it says stop."""
    device = decoder.model.device
    command = torch.empty(4, dtype=torch.long, device=device)
    while True:
        what, a, b, n = parallel.broadcast(command).tolist()
        if what == STOP:
            return
        if what == RESERVE:
            decoder.reserve(a, b)
            continue
        tokens = parallel.broadcast(torch.empty((b, n), dtype=torch.long, device=device))
        if what == PREFILL:
            decoder.prefill(tokens, a)
        elif what == FILL:
            decoder.fill(tokens, a)
        else:
            decoder(tokens, a)
