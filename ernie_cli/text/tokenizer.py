"""The ERNIE 4.5 text tokenizer, run by the `tokenizers` library alone.

A model directory has either a `tokenizer.json` (route 1: loaded as it is) or only the original
SentencePiece `tokenizer.model` with `added_tokens.json`, `special_tokens_map.json` and
`tokenizer_config.json` (route 2). For route 2 the equivalent `tokenizers` BPE tokenizer is built
here, from a hand-written reader of the SentencePiece protobuf, so that neither sentencepiece,
protobuf nor transformers is needed at run time. The build takes a couple of seconds, so its
result is cached as a tokenizer.json keyed by a hash of the source files.

ERNIE's own tokenizer never adds BOS/EOS and has no dummy prefix: `encode("hello")` is `[18830]`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer

from ernie_cli.cachedir import cache_dir
from ernie_cli.errors import ErnieError
from ernie_cli.weights.files import (
    ADDED_TOKENS,
    SPECIAL_TOKENS_MAP,
    SPM_COMPANIONS,
    SPM_MODEL,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
)

# Bump when the route-2 build changes, so that tokenizers cached by an older version are not reused.
_BUILD_VERSION = "1"
_CACHE_PREFIX = "ernie-tokenizer-"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# A text with no pre-tokenizer is one BPE "word", and encoding a long one at once is slow and
# memory-hungry (about 1 s and 150 MB per MB of ERNIE text), so long texts are encoded in pieces of
# about this many characters, each cut where no token can span the cut.
_PIECE_CHARS = 16384
# How far past a piece's end to look for such a cut before encoding the rest at once.
_CUT_SEARCH = 65536


class ErnieTokenizer:
    """Text <-> ids for ERNIE 4.5, with no special tokens added on encode.

    `decode` keeps special tokens (`<|end_of_sentence|>`, `</s>`, ...) in the text: the CLI prints
    what the model generated, and hiding tokens would make a stray one invisible. Callers stop
    before printing the stop token.
    """

    def __init__(self, backend: Tokenizer, special_tokens: dict[str, str], source: Path):
        self.backend = backend
        self.source = source  # the file the tokenizer was loaded from (a cached build for route 2)
        self.special_tokens = special_tokens  # role ("eos_token", "cls_token", ...) -> content
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = self._role_id("eos_token", "</s>")
        self.bos_token_id = self._role_id("bos_token", "<s>")
        self._pieces: dict[int, int | str | None] = {}
        if self.eos_token_id is None:
            raise ErnieError(
                f"The tokenizer from {source} has no end-of-sequence token; "
                f"add eos_token to {TOKENIZER_CONFIG} beside it."
            )

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_within(self, text: str, most: int) -> list[int] | None:
        """encode(text), or None as soon as it is clear that the text has more than `most` tokens.

        Long texts are encoded in pieces (see _PIECE_CHARS), cut between two characters that no
        token and no added token contains side by side: BPE only ever merges into vocabulary
        tokens, so nothing merges across such a cut, and the pieces' ids joined are exactly
        encode(text)'s. A tokenizer whose normalizer or pre-tokenizer is not character by
        character (so cuts cannot be placed safely) is encoded at once.
        """
        joins = self._joins if len(text) > _PIECE_CHARS else None
        if joins is None:
            ids = self.encode(text)
            return ids if len(ids) <= most else None
        ids: list[int] = []
        start = 0
        while start < len(text):
            end = self._cut(text, start + _PIECE_CHARS, joins)
            ids += self.encode(text[start:end])
            if len(ids) > most:
                return None
            start = end
        return ids

    @cached_property
    def max_token_bytes(self) -> int | None:
        """The most UTF-8 bytes of text that one token can stand for, or None where no bound holds.

        A text of B bytes then has at least B / max_token_bytes tokens, so a text too long for a
        context is known by its size alone, before it is read whole or encoded. The bound holds when
        normalization never shortens the text, nothing drops text (a whitespace pre-tokenizer, an
        added token that strips its neighbours) and unknown characters are never fused into one
        token; ERNIE's tokenizers (space to U+2581, byte fallback) are such.
        """
        if self._char_map is None:
            return None
        added = self.backend.get_added_tokens_decoder().values()
        if any(token.lstrip or token.rstrip for token in added):
            return None
        vocab = self._vocab
        model = self.backend.model
        fallback = getattr(model, "byte_fallback", False) and all(f"<0x{b:02X}>" in vocab for b in range(256))
        if getattr(model, "fuse_unk", False) and not fallback:
            return None
        return max(4, max(len(token.encode("utf-8")) for token in vocab))  # 4: one unknown character

    @cached_property
    def _char_map(self) -> dict[str, str] | None:
        """The normalizer as a map of single characters (ERNIE's: space to U+2581), for a BPE
        tokenizer with no pre-tokenizer; None for anything else."""
        from tokenizers.models import BPE

        model = self.backend.model
        if not isinstance(model, BPE) or self.backend.pre_tokenizer is not None:
            return None
        if model.dropout or model.ignore_merges or model.continuing_subword_prefix or model.end_of_word_suffix:
            return None
        if self.backend.normalizer is None:
            return {}
        try:
            spec = json.loads(self.backend.normalizer.__getstate__())
        except (TypeError, ValueError):
            return None
        mapping: dict[str, str] = {}
        for step in spec.get("normalizers", []) if spec.get("type") == "Sequence" else [spec]:
            old, new = (step.get("pattern") or {}).get("String"), step.get("content")
            if step.get("type") != "Replace" or not isinstance(old, str) or not isinstance(new, str) or len(old) != 1 or len(new) != 1:
                return None
            mapping = {char: new if mapped == old else mapped for char, mapped in mapping.items()}
            mapping.setdefault(old, new)
        if any(len(new.encode("utf-8")) < len(old.encode("utf-8")) for old, new in mapping.items()):
            return None
        return mapping

    @cached_property
    def _vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    @cached_property
    def _joins(self) -> frozenset[str] | None:
        """Every two adjacent characters inside a token or an added token (raw and normalized)."""
        if self.max_token_bytes is None:
            return None
        mapping = self._char_map
        pairs = set()
        texts = list(self._vocab)
        texts += ["".join(mapping.get(c, c) for c in token.content) for token in self.backend.get_added_tokens_decoder().values()]
        for token in texts:
            for i in range(len(token) - 1):
                pairs.add(token[i : i + 2])
        return frozenset(pairs)

    def _cut(self, text: str, at: int, joins: frozenset[str]) -> int:
        """The first place from `at` where the text can be cut exactly; its end when none is near."""
        mapping, vocab = self._char_map, self._vocab
        for i in range(at, min(len(text), at + _CUT_SEARCH)):
            a, b = text[i - 1], text[i]
            na, nb = mapping.get(a, a), mapping.get(b, b)
            # A character outside the vocabulary goes to byte tokens, whose merges the pairs above do not describe.
            if na + nb not in joins and a + b not in joins and na in vocab and nb in vocab:
                return i
        return len(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included (see the class docstring)."""
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def decode_piece(self, token_id: int) -> int | str | None:
        """How `decode` renders one token, for decoding a stream token by token.

        A byte-fallback token (`<0xE4>`) gives its byte value as an int: decode joins runs of them
        before turning them into text. Any other token gives its text, and an id the tokenizer does
        not know gives None (decode drops those). Memoised, so streaming costs O(1) per token.
        """
        try:
            return self._pieces[token_id]
        except KeyError:
            pass
        token = self.backend.id_to_token(token_id)
        if token is None:
            piece: int | str | None = None
        elif match := _BYTE_TOKEN.fullmatch(token):
            piece = int(match.group(1), 16)
        else:
            piece = self.backend.decode([token_id], skip_special_tokens=False)
        self._pieces[token_id] = piece
        return piece

    def _role_id(self, role: str, fallback: str) -> int | None:
        token = self.special_tokens.get(role, fallback)
        return self.backend.token_to_id(token)


def load_tokenizer(model_dir: Path, cache_dir: Path | None = None) -> ErnieTokenizer:
    """Load the tokenizer of the model in `model_dir` (route 1 or 2, see the module docstring).

    `cache_dir` receives the route-2 build when `model_dir` is not writable; it defaults to
    `$XDG_CACHE_HOME/ernie` (or `~/.cache/ernie`).
    """
    model_dir = Path(model_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not model_dir.is_dir():
        raise ErnieError(f"Model directory {model_dir} does not exist; check the path or download the model.")
    if (model_dir / TOKENIZER_JSON).is_file():
        backend, source = _load_tokenizer_json(model_dir / TOKENIZER_JSON), model_dir / TOKENIZER_JSON
        configs = _read_optional_configs(model_dir)
    elif (model_dir / SPM_MODEL).is_file():
        files = _read_spm_files(model_dir)
        configs = {name: _parse_json(model_dir / name, files[name]) for name in SPM_COMPANIONS}
        backend, source = _load_or_build(model_dir, files, configs, cache_dir)
    else:
        raise ErnieError(
            f"{model_dir} has neither {TOKENIZER_JSON} nor {SPM_MODEL}; "
            "download the model's tokenizer files into it."
        )
    return ErnieTokenizer(backend, _special_token_roles(configs), source)


def default_cache_dir() -> Path:
    return cache_dir()


# ---------------------------------------------------------------------------------------------
# Reading files


def _load_tokenizer_json(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for every kind of bad file
        raise ErnieError(
            f"{path} could not be loaded as a tokenizer ({_first_line(exc)}); "
            f"download it again, or delete it to build the tokenizer from {SPM_MODEL}."
        ) from exc


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ErnieError(
            f"{path} is missing; {SPM_MODEL} needs {', '.join(SPM_COMPANIONS)} beside it "
            f"(or a {TOKENIZER_JSON}), so download the model's tokenizer files again."
        ) from None
    except OSError as exc:
        raise ErnieError(f"Cannot read {path} ({exc.strerror}); check the file and its permissions.") from exc


def _parse_json(path: Path, data: bytes) -> dict:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ErnieError(f"{path} is not valid JSON ({_first_line(exc)}); download it again.") from exc
    if not isinstance(value, dict):
        raise ErnieError(f"{path} should hold a JSON object; download it again.")
    return value


def _read_optional_configs(model_dir: Path) -> dict[str, dict]:
    """The JSON files that name the special tokens, where present (route 1 does not need them)."""
    configs = {}
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):
        path = model_dir / name
        if path.is_file():
            configs[name] = _parse_json(path, _read_bytes(path))
    return configs


def _read_spm_files(model_dir: Path) -> dict[str, bytes]:
    return {name: _read_bytes(model_dir / name) for name in (SPM_MODEL, *SPM_COMPANIONS)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Special tokens named by the JSON files


def _token_content(value: object) -> str | None:
    """HF writes a token either as a string or as a serialised AddedToken {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_token_roles(configs: dict[str, dict]) -> dict[str, str]:
    """Role -> token, e.g. "eos_token" -> "</s>". tokenizer_config.json wins, as in transformers."""
    roles: dict[str, str] = {}
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):
        for key, value in configs.get(name, {}).items():
            content = _token_content(value)
            if key.endswith("_token") and content is not None:
                roles[key] = content
    return roles


def _special_token_contents(configs: dict[str, dict]) -> list[str]:
    """Every token the JSON files declare special: the roles plus additional_special_tokens."""
    contents = list(_special_token_roles(configs).values())
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):
        for value in configs.get(name, {}).get("additional_special_tokens") or []:
            content = _token_content(value)
            if content is not None:
                contents.append(content)
    return list(dict.fromkeys(contents))


# ---------------------------------------------------------------------------------------------
# Route 2: the cache of built tokenizers


def _cache_key(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256(f"ernie-cli tokenizer build {_BUILD_VERSION}\n".encode())
    for name in sorted(files):
        digest.update(f"{name}\n{len(files[name])}\n".encode())
        digest.update(files[name])
    return digest.hexdigest()[:32]


def _load_or_build(
    model_dir: Path, files: dict[str, bytes], configs: dict[str, dict], cache_dir: Path
) -> tuple[Tokenizer, Path]:
    """Reuse a cached build beside the model or in `cache_dir`, else build and cache it."""
    name = f"{_CACHE_PREFIX}{_cache_key(files)}.json"
    for candidate in (model_dir / name, cache_dir / name):
        cached = _try_load_cached(candidate)
        if cached is not None:
            return cached, candidate
    text = build_tokenizer_json(files[SPM_MODEL], configs, model_dir / SPM_MODEL)
    backend = Tokenizer.from_str(text)
    errors = []
    for folder in (model_dir, cache_dir):
        try:
            return backend, _write_atomically(folder / name, text)
        except OSError as exc:
            errors.append(f"{folder}: {exc.strerror or exc}")
    from ernie_cli.console import warn

    warn(
        f"could not cache the tokenizer built from {SPM_MODEL} ({'; '.join(errors)}); "
        "it will be rebuilt on every run."
    )
    return backend, model_dir / SPM_MODEL


def _try_load_cached(path: Path) -> Tokenizer | None:
    """A damaged cache file is rebuilt (and overwritten) rather than reported: it is ours, not the user's."""
    if not path.is_file():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception:
        return None


def _write_atomically(path: Path, text: str) -> Path:
    """Write via a temporary name and os.replace, so a concurrent or killed run never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------
# Route 2: reading the SentencePiece ModelProto (protobuf wire format, by hand)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}


class _Corrupt(ValueError):
    pass


@dataclass
class SpmModel:
    """The parts of a SentencePiece ModelProto that decide how BPE encodes, with proto2 defaults."""

    pieces: list[tuple[str, float, int]]  # (piece, score, type) in id order
    model_type: int = 1
    byte_fallback: bool = False
    split_digits: bool = False
    treat_whitespace_as_suffix: bool = False
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]  # IndexError on a truncated file, reported as corrupt by the caller
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Corrupt("varint longer than 10 bytes")


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs of one message: an int for varints, raw bytes otherwise."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise _Corrupt(f"unsupported protobuf wire type {wire}")
        if pos > end or field == 0:
            raise _Corrupt("truncated or malformed protobuf field")
        yield field, value


def _int(value: int | bytes) -> int:
    if not isinstance(value, int):
        raise _Corrupt("a number field holds bytes")
    return value


def _bytes(value: int | bytes) -> bytes:
    if isinstance(value, int):
        raise _Corrupt("a bytes field holds a number")
    return value


def _parse_piece(buf: bytes) -> tuple[str, float, int]:
    piece, score, kind = "", 0.0, NORMAL
    for field, value in _fields(buf):
        if field == 1:
            piece = _bytes(value).decode("utf-8")
        elif field == 2:
            (score,) = struct.unpack("<f", _bytes(value))
        elif field == 3:
            kind = _int(value)
    return piece, score, kind


def parse_spm_model(data: bytes) -> SpmModel:
    """Parse ModelProto: pieces = 1, trainer_spec = 2, normalizer_spec = 3 (sentencepiece_model.proto)."""
    model = SpmModel(pieces=[])
    seen = set()
    try:
        for field, value in _fields(data):
            seen.add(field)
            if field == 1:
                model.pieces.append(_parse_piece(value))
            elif field == 2:
                _parse_trainer_spec(value, model)
            elif field == 3:
                _parse_normalizer_spec(value, model)
    except (IndexError, UnicodeDecodeError, struct.error) as exc:
        raise _Corrupt(_first_line(exc)) from exc
    # Fields are written in number order, so a file cut short at a field boundary lacks the specs.
    parts = ((1, "pieces"), (2, "trainer_spec"), (3, "normalizer_spec"))
    missing = [name for field, name in parts if field not in seen]
    if missing:
        raise _Corrupt(f"no {' or '.join(missing)}")
    return model


def _parse_trainer_spec(buf: bytes, model: SpmModel) -> None:
    for field, value in _fields(buf):
        if field == 3:
            model.model_type = _int(value)
        elif field == 24:
            model.treat_whitespace_as_suffix = bool(_int(value))
        elif field == 25:
            model.split_digits = bool(_int(value))
        elif field == 35:
            model.byte_fallback = bool(_int(value))


def _parse_normalizer_spec(buf: bytes, model: SpmModel) -> None:
    for field, value in _fields(buf):
        if field == 1:
            model.normalizer_name = _bytes(value).decode("utf-8")
        elif field == 2:
            model.precompiled_charsmap = _bytes(value)
        elif field == 3:
            model.add_dummy_prefix = bool(_int(value))
        elif field == 4:
            model.remove_extra_whitespaces = bool(_int(value))
        elif field == 5:
            model.escape_whitespaces = bool(_int(value))


def _read_spm_model(data: bytes, path: Path) -> SpmModel:
    if data.startswith(b"version https://git-lfs"):
        raise ErnieError(f"{path} is a Git LFS pointer, not the model file; fetch it with `git lfs pull`.")
    try:
        model = parse_spm_model(data)
    except _Corrupt as exc:
        raise ErnieError(
            f"{path} is not a valid SentencePiece model ({exc}); download it again."
        ) from None
    _check_supported(model, path)
    return model


def _check_supported(model: SpmModel, path: Path) -> None:
    """Refuse settings the build below does not reproduce, rather than encode differently."""
    if model.model_type != 2:
        kind = _MODEL_TYPES.get(model.model_type, f"type {model.model_type}")
        raise ErnieError(
            f"{path} is a SentencePiece {kind} model, but only BPE models can be converted; "
            f"put the model's {TOKENIZER_JSON} beside it."
        )
    unsupported = [
        name
        for name, bad in (
            ("add_dummy_prefix", model.add_dummy_prefix),
            ("remove_extra_whitespaces", model.remove_extra_whitespaces),
            ("escape_whitespaces=false", not model.escape_whitespaces),
            ("treat_whitespace_as_suffix", model.treat_whitespace_as_suffix),
            ("a normalization rule table", bool(model.precompiled_charsmap)),
            ("no byte_fallback", not model.byte_fallback),
        )
        if bad
    ]
    if unsupported:
        raise ErnieError(
            f"{path} uses {', '.join(unsupported)}, which this converter does not handle "
            f"(it covers ERNIE 4.5's settings); put the model's {TOKENIZER_JSON} beside it."
        )


# ---------------------------------------------------------------------------------------------
# Route 2: building the tokenizers BPE equivalent


def build_tokenizer_json(spm_data: bytes, configs: dict[str, dict], spm_path: Path) -> str:
    """The tokenizer.json text equivalent to `tokenizer.model` plus its JSON files."""
    model = _read_spm_model(spm_data, spm_path)
    vocab = {piece: index for index, (piece, _, _) in enumerate(model.pieces)}
    unk = next((piece for piece, _, kind in model.pieces if kind == UNKNOWN), None)
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_tokens(model, configs, spm_path.parent),
        # SentencePiece escapes spaces as U+2581; no dummy prefix and no pre-tokenizer (a single
        # "word" per span between added tokens, as SentencePiece sees the whole text).
        "normalizer": {"type": "Sequence", "normalizers": [_replace(" ", "\u2581")]},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [_replace("\u2581", " "), {"type": "ByteFallback"}, {"type": "Fuse"}],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [list(pair) for pair in spm_bpe_merges(model.pieces, vocab)],
        },
    }
    return json.dumps(document, ensure_ascii=False)


def _replace(old: str, new: str) -> dict:
    return {"type": "Replace", "pattern": {"String": old}, "content": new}


def spm_bpe_merges(pieces: list[tuple[str, float, int]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges ranked like SentencePiece's: by the score of the piece they produce.

    SentencePiece stores no merges; it joins the adjacent pair whose result has the highest score.
    A rank list reproduces that. This follows transformers' SentencePiece converter exactly
    (every split of a piece into two vocab pieces; splits of one piece by vocab ids of left, right,
    then all by score, longer left part first, stable), so the merges equal those of HF's
    converted tokenizer.json.
    """
    merges = []
    for piece, score, _ in pieces:
        local = [
            (piece[:cut], piece[cut:])
            for cut in range(1, len(piece))
            if piece[:cut] in vocab and piece[cut:] in vocab
        ]
        local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges.extend((score, left, right) for left, right in local)
    merges.sort(key=lambda merge: (merge[0], len(merge[1]), len(merge[2])), reverse=True)
    return [(left, right) for _, left, right in merges]


def _added_tokens(model: SpmModel, configs: dict[str, dict], model_dir: Path) -> list[dict]:
    """Added tokens, as HF's fast tokenizer has them: matched whole in the text, before BPE.

    SentencePiece control/unknown pieces and the tokens the JSON files call special are special
    (skipped by decode(skip_special_tokens=True)); user-defined pieces (ERNIE's digits) and other
    added_tokens.json entries are not. Ids come from the vocab, then added_tokens.json, then
    tokenizer_config.json's added_tokens_decoder; a special token found nowhere gets the next id.
    """
    special_list = _special_token_contents(configs)
    special = set(special_list)
    table = _AddedTokenTable([piece for piece, _, _ in model.pieces], model_dir)
    for index, (piece, _, kind) in enumerate(model.pieces):
        if kind in (UNKNOWN, CONTROL, USER_DEFINED):
            table.add(index, piece, kind != USER_DEFINED or piece in special, SPM_MODEL)
    for content, token_id in _added_tokens_json(configs.get(ADDED_TOKENS, {}), model_dir):
        table.add(token_id, content, content in special, ADDED_TOKENS)
    for token_id, content, flags in _added_tokens_decoder(configs.get(TOKENIZER_CONFIG, {}), model_dir):
        table.add(token_id, content, bool(flags.get("special", content in special)), TOKENIZER_CONFIG, flags)
    for content in special_list:
        if content not in table.by_content:
            token_id = table.id_of(content)
            table.add(table.next_id() if token_id is None else token_id, content, True, SPECIAL_TOKENS_MAP)
    return [table.entries[token_id] for token_id in sorted(table.entries)]


class _AddedTokenTable:
    """Added tokens by id, refusing files that give one id two meanings (or one token two ids)."""

    def __init__(self, pieces: list[str], model_dir: Path):
        self.pieces = pieces
        self.vocab = {piece: index for index, piece in enumerate(pieces)}
        self.model_dir = model_dir
        self.entries: dict[int, dict] = {}
        self.by_content: dict[str, int] = {}

    def id_of(self, content: str) -> int | None:
        return self.vocab.get(content, self.by_content.get(content))

    def next_id(self) -> int:
        return max([len(self.pieces) - 1, *self.entries]) + 1

    def add(self, token_id: int, content: str, special: bool, source: str, flags: dict | None = None) -> None:
        holder = self.pieces[token_id] if token_id < len(self.pieces) else None
        if token_id in self.entries:
            holder = self.entries[token_id]["content"]
        if self.id_of(content) not in (None, token_id) or holder not in (None, content):
            raise ErnieError(
                f"{self.model_dir / source} gives {content!r} the id {token_id}, which clashes with "
                f"{SPM_MODEL} or another tokenizer file; download the tokenizer files again."
            )
        self.entries[token_id] = _added_token(token_id, content, special, flags)
        self.by_content[content] = token_id


def _added_token(token_id: int, content: str, special: bool, flags: dict | None) -> dict:
    flags = flags or {}
    return {
        "id": token_id,
        "content": content,
        "single_word": bool(flags.get("single_word", False)),
        "lstrip": bool(flags.get("lstrip", False)),
        "rstrip": bool(flags.get("rstrip", False)),
        "normalized": bool(flags.get("normalized", False)),
        "special": special,
    }


def _added_tokens_json(data: dict, model_dir: Path) -> list[tuple[str, int]]:
    items = sorted(data.items(), key=lambda item: item[1] if isinstance(item[1], int) else -1)
    for content, token_id in items:
        if not isinstance(token_id, int) or token_id < 0:
            raise ErnieError(
                f"{model_dir / ADDED_TOKENS} gives {content!r} the id {token_id!r}, not a token id; "
                "download it again."
            )
    return items


def _added_tokens_decoder(config: dict, model_dir: Path) -> list[tuple[int, str, dict]]:
    result = []
    for key, value in (config.get("added_tokens_decoder") or {}).items():
        content = _token_content(value)
        if not str(key).isdigit() or content is None:
            raise ErnieError(
                f"{model_dir / TOKENIZER_CONFIG} has a malformed added_tokens_decoder entry {key!r}; "
                "download it again."
            )
        result.append((int(key), content, value if isinstance(value, dict) else {}))
    return sorted(result)
