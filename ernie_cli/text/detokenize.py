"""Turn generated token ids into text as they arrive, without breaking characters.

ERNIE spells characters outside its vocabulary (most emoji, rare CJK) as byte-fallback tokens,
`<0xF0><0x9F><0x98><0x88>` for 😈, so one character may take up to four tokens. Decoding each
token alone would print U+FFFD for every partial character; re-decoding the whole sequence at every
step costs O(n) per token. Instead each token maps once to its byte (byte tokens) or its text
(everything else, exactly as ErnieTokenizer.decode renders it), and the bytes go through a tiny
UTF-8 decoder that holds at most one unfinished character.

Agreement with `ErnieTokenizer.decode(all_ids)`: the concatenation of every `add()` result and
`flush()` equals it whenever the byte tokens spell valid UTF-8, and also when an unfinished
character is cut off at the end (both give one U+FFFD per byte). They differ only for a run of byte
tokens that mixes valid characters with invalid bytes: the tokenizers library then replaces the
*whole* run with one U+FFFD per byte, while the stream has already shown the valid characters and
replaces only the invalid bytes (one U+FFFD each).
"""

from __future__ import annotations

from ernie_cli.text.tokenizer import ErnieTokenizer

REPLACEMENT = "\ufffd"


class StreamingDetokenizer:
    """Incremental decode of one generated sequence. Special tokens render as decode() renders them."""

    def __init__(self, tokenizer: ErnieTokenizer):
        self._tokenizer = tokenizer
        self._pending = bytearray()  # bytes of the character not finished yet (at most 3)

    def add(self, token_id: int) -> str:
        """Text made final by this token; "" while a character is still incomplete."""
        piece = self._tokenizer.decode_piece(token_id)
        if piece is None:  # an id outside the tokenizer (the LM head is padded): decode drops it
            return ""
        if isinstance(piece, int):
            self._pending.append(piece)
            return self._drain()
        return self._abandon_pending() + piece

    def flush(self) -> str:
        """The rest at the end of the sequence: U+FFFD for each byte of a cut-off character."""
        return self._abandon_pending()

    def _drain(self) -> str:
        """Decode every finished character in the pending bytes, keeping an unfinished tail."""
        out = []
        while self._pending:
            try:
                out.append(self._pending.decode("utf-8"))
                self._pending.clear()
            except UnicodeDecodeError as exc:
                out.append(self._pending[: exc.start].decode("utf-8"))
                if exc.reason == "unexpected end of data":  # a valid prefix: wait for more bytes
                    del self._pending[: exc.start]
                    break
                out.append(REPLACEMENT * (exc.end - exc.start))
                del self._pending[: exc.end]
        return "".join(out)

    def _abandon_pending(self) -> str:
        """A non-byte token (or the end) means the pending bytes will never complete a character."""
        text = REPLACEMENT * len(self._pending)
        self._pending.clear()
        return text
