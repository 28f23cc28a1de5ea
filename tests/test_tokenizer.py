"""The ERNIE tokenizer (both loading routes) and the streaming detokenizer.

Every expected id comes from an independent reference: sentencepiece on the original
tokenizer.model, the shipped tokenizer.json run by `tokenizers` directly, or the published
transformers test vectors. Nothing here was recorded from ernie_cli's own output. The tokenizer
files live in ../shared/ernie-tokenizer and are never copied into the repository.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
from pathlib import Path

import pytest

from ernie_cli.errors import ErnieError
from ernie_cli.text import detokenize as detokenize_module
from ernie_cli.text import tokenizer as tokenizer_module
from ernie_cli.text.detokenize import StreamingDetokenizer
from ernie_cli.text.tokenizer import ErnieTokenizer, default_cache_dir, load_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "ernie-tokenizer"
SPM_FILES = ("tokenizer.model", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json")
REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def shared() -> Path:
    missing = [name for name in ("tokenizer.json", *SPM_FILES) if not (SHARED / name).is_file()]
    if missing:
        pytest.skip(f"../shared/ernie-tokenizer not found: {SHARED} lacks {', '.join(missing)}")
    return SHARED


def _model_dir(root: Path, shared: Path, names: tuple[str, ...]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(shared / name, root / name)
    return root


@pytest.fixture(scope="module")
def route1_dir(shared, tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory.mktemp("route1"), shared, ("tokenizer.json",))


@pytest.fixture(scope="module")
def route2_dir(shared, tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory.mktemp("route2"), shared, SPM_FILES)


@pytest.fixture(scope="module")
def route1(route1_dir, tmp_path_factory) -> ErnieTokenizer:
    return load_tokenizer(route1_dir, cache_dir=tmp_path_factory.mktemp("cache1"))


@pytest.fixture(scope="module")
def route2(route2_dir, tmp_path_factory) -> ErnieTokenizer:
    return load_tokenizer(route2_dir, cache_dir=tmp_path_factory.mktemp("cache2"))


@pytest.fixture(scope="module", params=["route1", "route2"])
def tok(request) -> ErnieTokenizer:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def shipped(shared):
    """The shipped tokenizer.json run by the tokenizers library itself (reference b)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(shared / "tokenizer.json"))


@pytest.fixture(scope="module")
def vectors(shared) -> dict:
    return json.loads((shared / "reference_tokenizations.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Reference (a): sentencepiece, with special/added tokens split out as HF tokenizers do


class SentencePieceReference:
    """SentencePiece reads `<s>` or `<|begin_of_sentence|>` in text as plain characters, while HF
    tokenizers (and ERNIE's chat format) match added/special tokens first. So split them out,
    longest first, and encode only the text between them with sentencepiece."""

    def __init__(self, shared: Path):
        spm = pytest.importorskip("sentencepiece")
        self.sp = spm.SentencePieceProcessor(model_file=str(shared / "tokenizer.model"))
        added = json.loads((shared / "added_tokens.json").read_text(encoding="utf-8"))
        special_map = json.loads((shared / "special_tokens_map.json").read_text(encoding="utf-8"))
        strings = dict(added)
        for key, value in special_map.items():
            values = value if key == "additional_special_tokens" else [value]
            for token in values or []:
                if isinstance(token, str) and token not in strings:
                    token_id = self.sp.piece_to_id(token)
                    assert self.sp.id_to_piece(token_id) == token, token
                    strings[token] = token_id
        self.ids = strings
        pattern = "|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True))
        self.split = re.compile(f"({pattern})")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for index, part in enumerate(self.split.split(text)):
            if index % 2:
                ids.append(self.ids[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids


@pytest.fixture(scope="module")
def sp_ref(shared) -> SentencePieceReference:
    return SentencePieceReference(shared)


# ---------------------------------------------------------------------------------------------
# The corpus

HAND_WRITTEN = [
    "Hello world",
    "hello",
    " Hello",
    "The quick brown fox jumps over the lazy dog.",
    "It's a test: don't, won't, y'all; (parentheses) [brackets] {braces} <angles>",
    "ERNIE 4.5 was released on 2025-06-30 with 21B-A3B and 300B-A47B models.",
    "中华人民共和国成立于1949年。",
    "百度文心大模型ERNIE 4.5是一个多模态模型，支持中文和英文。",
    "我爱北京天安门，天安门上太阳升。",
    "鑫淼焱垚犇骉龘靐齉",
    "日本語のテキストです。ひらがな、カタカナ、漢字を含みます。",
    "東京都渋谷区 ｶﾀｶﾅ ＡＢＣ１２３",
    "한국어 텍스트입니다. 안녕하세요!",
    "Привет, мир! Ёлка и щётка.",
    "Γειά σου Κόσμε",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "But ird and ปี   ird   ด",
    "café naïve résumé Zoë façade",
    "e\u0301 a\u0308 combining marks",
    "def f(x):\n    if x > 0:\n        return x * 2\n    return -x\n",
    "class A:\n\tdef __init__(self):\n\t\tself.value = {'a': 1, \"b\": [1, 2, 3]}\n",
    "for (int i = 0; i < n; ++i) {\n  sum += a[i];\n}\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    '{"key": "value", "list": [1, 2.5, null, true], "nested": {"x": -1e-9}}',
    "<html><body><p class=\"x\">Hi &amp; bye</p></body></html>",
    "    four leading spaces",
    "trailing spaces    ",
    "a  b   c    d     e",
    "\t\ttabs\tand\t\tmore\t",
    "\n\n\nnewlines\n\n",
    "windows\r\nline\r\nendings\r\n",
    " \t \n \r\n \t",
    "".join(chr(code) for code in range(0x20)) + "\x7f",
    "null\x00byte and bell\x07 and escape\x1b[31m",
    "1234567890",
    "3.14159265358979 -42 +7 1,000,000 0x1F 1e10 2024年3月5日",
    "Hey<eos>. \t\t \n\nyou  é  @#😈  🤗!       , 1234 15 5,61",
    "😀😃😄😁 👍🏽 👩🏽‍💻",
    "family 👨‍👩‍👧‍👦 rainbow flag 🏳️‍🌈 pirate 🏴‍☠️",
    "flags 🇨🇳🇺🇸🇯🇵🇩🇪 and keycap 1️⃣",
    "𠀀𠀁𠀂 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙𝟚",
    "<|begin_of_sentence|>User: Hello!\nAssistant: ",
    "<|begin_of_sentence|>You are a helpful chatbot.\nUser: Hello!\nAssistant: Hi.<|end_of_sentence|>",
    "a<|end_of_sentence|>b<|end_of_sentence|><|end_of_sentence|>",
    "<mask:4>system prompt<mask:5><mask:6>header<mask:7>",
    "<mask:1> <mask:2> <mask:3> <mask:21>",
    "<s>text</s><unk><pad>",
    "<s>>",
    "lekacy<s>. Hey.       .",
    "<|IMAGE_PLACEHOLDER|><|AUDIO_PLACEHOLDER|>describe this",
    "box <|LOC_BEGIN|><|LOC_5|><|LOC_SEP|><|LOC_1000|><|LOC_END|> <|LOC_1001|>",
    "<|prefixoftext|>a<|middleoftext|>b<|suffixoftext|>",
    "<|LOC_5|><|LOC_5|><|LOC_50|><|LOC_500|>",
    "<|begin_of_sentence",
    "half < tag > and <| |>",
    "",
    " ",
    "  ",
    "\u3000ideographic\u3000space and nbsp\u00a0here",
    "zero\u200bwidth\u200cjoiners\u200d\ufeffbom",
    "private use \ue000\uf8ff and noncharacter \ufdd0",
]

FRAGMENTS = [
    "the", "model", " answer", "数据", "模型", "的", "。", "，", "テスト", "です", "ok", "x = 1",
    "    ", "\t", "\n", "\r\n", "  ", " ", "2025", "3.5", "😈", "👨‍👩‍👧", "🇫🇷", "🤗", "é", "ß",
    "<|begin_of_sentence|>", "<|end_of_sentence|>", "<mask:4>", "<s>", "</s>", "<|IMAGE_PLACEHOLDER|>",
    "<|LOC_5|>", "\x00", "\x1f", "\x7f", "def main():", "return", "{", "}", "->", "!=",
]


def _random_char(rng: random.Random) -> str:
    while True:
        plane = rng.random()
        if plane < 0.6:
            code = rng.randrange(0x20, 0x3000)
        elif plane < 0.85:
            code = rng.randrange(0x3000, 0x10000)
        else:
            code = rng.randrange(0x10000, 0x30000)
        if not 0xD800 <= code <= 0xDFFF:
            return chr(code)


def build_corpus() -> list[str]:
    """A few hundred strings: hand-written cases, seeded mixes of fragments, random unicode."""
    rng = random.Random(20250630)
    corpus = list(HAND_WRITTEN)
    for _ in range(200):
        corpus.append("".join(rng.choice(FRAGMENTS) for _ in range(rng.randrange(1, 12))))
    for _ in range(100):
        corpus.append("".join(_random_char(rng) for _ in range(rng.randrange(1, 25))))
    return corpus


CORPUS = build_corpus()


# ---------------------------------------------------------------------------------------------
# Encoding and decoding


def test_corpus_is_broad():
    assert len(CORPUS) > 300
    assert any("<|LOC_5|>" in s for s in CORPUS) and any("\r\n" in s for s in CORPUS)


def test_encode_matches_sentencepiece(tok, sp_ref):
    mismatches = [s for s in CORPUS if tok.encode(s) != sp_ref.encode(s)]
    assert not mismatches, f"{len(mismatches)} strings differ, first: {mismatches[0]!r}"


def test_encode_matches_shipped_tokenizer_json(tok, shipped):
    mismatches = [s for s in CORPUS if tok.encode(s) != shipped.encode(s, add_special_tokens=False).ids]
    assert not mismatches, f"{len(mismatches)} strings differ, first: {mismatches[0]!r}"


def test_decode_round_trip(tok):
    # SentencePiece itself reads U+2581 as its space marker, so it comes back as a space.
    failures = [s for s in CORPUS if tok.decode(tok.encode(s)) != s.replace("\u2581", " ")]
    assert not failures, f"{len(failures)} strings differ, first: {failures[0]!r}"


def test_decode_matches_shipped_decoder(tok, shipped):
    ids = [i for s in CORPUS for i in tok.encode(s)]
    assert tok.decode(ids) == shipped.decode(ids, skip_special_tokens=False)


def test_published_encode_vectors(tok, vectors):
    for case in vectors["encode"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]


def test_published_bos_eos_vectors(tok, vectors):
    for case in vectors["encode_with_bos_eos"]:
        bos = [tok.bos_token_id] * case["add_bos"]
        eos = [tok.eos_token_id] * case["add_eos"]
        assert bos + tok.encode(case["text"]) + eos == case["ids"]


def test_published_decode_vectors(tok, vectors):
    for case in vectors["decode"]:
        skip = case.get("skip_special_tokens", False)  # HF's decode default
        assert tok.backend.decode(case["ids"], skip_special_tokens=skip) == case["text"]
        if not set(case["ids"]) & {0, 1, 2}:  # decode() keeps <unk>, <s>, </s>; the vectors skip them
            assert tok.decode(case["ids"]) == case["text"]


def test_published_tokenize_vectors(tok, vectors, sp_ref):
    for case in vectors["tokenize"]:
        if case["how"].startswith("raw sentencepiece"):
            assert sp_ref.sp.encode(case["text"], out_type=str) == case["tokens"]
        else:
            tokens = [tok.id_to_token(i) for i in tok.encode(case["text"])]
            assert tokens == case["tokens"], case["text"]


def test_published_chat_template_vectors(tok, vectors):
    for case in vectors["chat_template"]:
        assert tok.encode(case["rendered"]) == case["ids"]
        assert tok.decode(case["ids"]) == case["rendered"]


def test_published_added_token_example(tok, vectors):
    from tokenizers import AddedToken, Tokenizer

    case = vectors["added_token_example"]
    backend = Tokenizer.from_str(tok.backend.to_str())  # a copy: leave the shared fixture alone
    backend.add_tokens([AddedToken("<REPR_END>", rstrip=True, lstrip=True)])
    assert backend.encode(case["text"], add_special_tokens=False).ids == case["ids"]


def test_special_ids_and_sizes(tok, sp_ref):
    assert tok.eos_token_id == sp_ref.sp.piece_to_id("</s>") == 2
    assert tok.bos_token_id == sp_ref.sp.piece_to_id("<s>") == 1
    assert tok.vocab_size == sp_ref.sp.get_piece_size() + 1009 == 101304
    assert tok.id_to_token(100273) == "<|begin_of_sentence|>"
    assert tok.token_to_id("<|LOC_1000|>") == sp_ref.ids["<|LOC_1000|>"]
    assert tok.id_to_token(101304) is None
    assert tok.encode("hello") == [18830]  # no BOS, no dummy prefix


def test_route2_build_equals_shipped_tokenizer_json(route2, shared):
    """The shipped file was converted by transformers; the route-2 build must agree piece for piece."""
    ours = json.loads(route2.source.read_text(encoding="utf-8"))
    theirs = json.loads((shared / "tokenizer.json").read_text(encoding="utf-8"))
    assert ours["model"]["vocab"] == theirs["model"]["vocab"]
    assert ours["model"]["merges"] == theirs["model"]["merges"]
    assert ours["added_tokens"] == theirs["added_tokens"]
    for key in ("normalizer", "pre_tokenizer", "decoder"):
        assert ours[key] == theirs[key], key


def test_runtime_imports_only_tokenizers():
    source = "\n".join(
        Path(module.__file__).read_text(encoding="utf-8")
        for module in (tokenizer_module, detokenize_module)
    )
    for banned in ("sentencepiece", "transformers", "google.protobuf"):
        assert not re.search(rf"^\s*(import|from)\s+{re.escape(banned)}", source, re.M), banned


# ---------------------------------------------------------------------------------------------
# Route-2 cache


def _cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("ernie-tokenizer-*.json"))


def _forbid_build(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the tokenizer was rebuilt instead of read from the cache")

    monkeypatch.setattr(tokenizer_module, "build_tokenizer_json", fail)


def test_route2_cache_beside_model_is_reused(route2, route2_dir, tmp_path, monkeypatch):
    [cached] = _cache_files(route2_dir)
    assert route2.source == cached
    before = cached.stat().st_mtime_ns
    _forbid_build(monkeypatch)
    again = load_tokenizer(route2_dir, cache_dir=tmp_path / "unused")
    assert again.source == cached and cached.stat().st_mtime_ns == before
    assert not (tmp_path / "unused").exists()
    assert again.encode("中文 text") == route2.encode("中文 text")


def test_route2_cache_goes_to_cache_dir_when_model_dir_is_read_only(shared, tmp_path, monkeypatch):
    model_dir = _model_dir(tmp_path / "model", shared, SPM_FILES)
    cache_dir = tmp_path / "cache"
    model_dir.chmod(0o555)
    if os.geteuid() == 0:  # root ignores directory permissions: refuse writes there by hand
        real_mkstemp = tokenizer_module.tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if Path(dir) == model_dir:
                raise PermissionError(13, "Permission denied", str(dir))
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tokenizer_module.tempfile, "mkstemp", mkstemp)
    try:
        first = load_tokenizer(model_dir, cache_dir=cache_dir)
        assert _cache_files(model_dir) == [] and _cache_files(cache_dir) == [first.source]
        assert not list(cache_dir.glob(".*"))  # no temporary file left behind
        with monkeypatch.context() as patch:
            _forbid_build(patch)
            second = load_tokenizer(model_dir, cache_dir=cache_dir)
        assert second.source == first.source

        first.source.write_text("{ damaged", encoding="utf-8")  # a damaged cache is rebuilt
        third = load_tokenizer(model_dir, cache_dir=cache_dir)
        assert third.source == first.source
        assert third.encode("This is a test") == [1720, 357, 274, 1167]
        json.loads(third.source.read_text(encoding="utf-8"))
    finally:
        model_dir.chmod(0o755)


def test_route2_without_any_writable_cache_warns_and_still_works(shared, tmp_path, monkeypatch, capsys):
    model_dir = _model_dir(tmp_path / "model", shared, SPM_FILES)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tokenizer_module.tempfile, "mkstemp", refuse)
    tok = load_tokenizer(model_dir, cache_dir=tmp_path / "cache")
    assert tok.encode("This is a test") == [1720, 357, 274, 1167]  # published vector
    assert tok.source == model_dir / "tokenizer.model"
    assert "could not cache" in capsys.readouterr().err
    assert _cache_files(model_dir) == [] and _cache_files(tmp_path / "cache") == []


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "ernie"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "ernie"


# ---------------------------------------------------------------------------------------------
# Errors


def _error(model_dir: Path, tmp_path: Path) -> str:
    with pytest.raises(ErnieError) as info:
        load_tokenizer(model_dir, cache_dir=tmp_path / "cache")
    return str(info.value)


def test_error_for_missing_directory_and_files(tmp_path):
    assert "does not exist" in _error(tmp_path / "nowhere", tmp_path)
    (tmp_path / "empty").mkdir()
    message = _error(tmp_path / "empty", tmp_path)
    assert "tokenizer.json" in message and "tokenizer.model" in message


@pytest.mark.parametrize("missing", ["added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"])
def test_error_for_missing_companion_file(shared, tmp_path, missing):
    model_dir = _model_dir(tmp_path / "model", shared, tuple(n for n in SPM_FILES if n != missing))
    assert missing in _error(model_dir, tmp_path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\xff\xfe garbage \x00\x01\x02" * 10,
        b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1614363\n",
        "truncated",
    ],
)
def test_error_for_corrupt_tokenizer_model(shared, tmp_path, content):
    model_dir = _model_dir(tmp_path / "model", shared, SPM_FILES)
    if content == "truncated":
        content = (shared / "tokenizer.model").read_bytes()[:500_000]
    (model_dir / "tokenizer.model").write_bytes(content)
    message = _error(model_dir, tmp_path)
    assert "tokenizer.model" in message


def _field(number: int, wire: int, payload: bytes | int) -> bytes:
    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                return bytes(out)

    key = varint(number << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    return key + varint(len(payload)) + payload


def test_error_for_unigram_model(shared, tmp_path):
    piece = _field(1, 2, b"<unk>") + b"\x15" + struct.pack("<f", 0.0) + _field(3, 0, 2)
    unigram = _field(1, 2, piece) + _field(2, 2, _field(3, 0, 1)) + _field(3, 2, _field(3, 0, 0))
    model_dir = _model_dir(tmp_path / "model", shared, SPM_FILES[1:])
    (model_dir / "tokenizer.model").write_bytes(unigram)
    message = _error(model_dir, tmp_path)
    assert "tokenizer.model" in message and "UNIGRAM" in message and "BPE" in message


@pytest.mark.parametrize("name", ["added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"])
def test_error_for_corrupt_json(shared, tmp_path, name):
    model_dir = _model_dir(tmp_path / "model", shared, SPM_FILES)
    (model_dir / name).write_text('{"eos_token": ', encoding="utf-8")
    assert name in _error(model_dir, tmp_path)


def test_error_for_corrupt_tokenizer_json(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_text('{"version": "1.0", "model": 42}', encoding="utf-8")
    assert "tokenizer.json" in _error(model_dir, tmp_path)


# ---------------------------------------------------------------------------------------------
# Streaming detokenizer


def _stream(tok: ErnieTokenizer, ids: list[int]) -> list[str]:
    detok = StreamingDetokenizer(tok)
    return [detok.add(i) for i in ids] + [detok.flush()]


def _token_bytes(shipped, token_id: int) -> bytes:
    """What one token contributes, from the shipped tokenizer's own token strings and decoder."""
    token = shipped.id_to_token(token_id)
    if token is None:
        return b""
    if re.fullmatch(r"<0x[0-9A-F]{2}>", token):
        return bytes([int(token[3:5], 16)])
    return shipped.decode([token_id], skip_special_tokens=False).encode("utf-8")


STREAM_TEXTS = [
    "中华人民共和国成立于1949年。鑫淼焱垚犇骉龘靐齉",
    "😀😃 family 👨‍👩‍👧‍👦, flags 🇨🇳🇺🇸, 🏳️‍🌈 and 𠀀𠀁𠀂",
    "Mixed: 日本語 text, code `x = 1`\n\tand emoji 😈🤗 <|end_of_sentence|> done",
    "Hey<eos>. \t\t \n\nyou  é  @#😈  🤗!       , 1234 15 5,61",
]


@pytest.mark.parametrize("text", STREAM_TEXTS + CORPUS[::7])
def test_stream_equals_decode_and_emits_as_soon_as_final(route1, shipped, text):
    ids = route1.encode(text)
    chunks = _stream(route1, ids)
    final = route1.decode(ids)
    assert "".join(chunks) == final
    if REPLACEMENT not in final:
        assert all(REPLACEMENT not in chunk for chunk in chunks)
    # After each token, exactly the complete characters so far are out: never part of one.
    final_bytes, done, emitted = final.encode("utf-8"), 0, ""
    for token_id, chunk in zip(ids, chunks):
        done += len(_token_bytes(shipped, token_id))
        emitted += chunk
        assert emitted == final_bytes[:done].decode("utf-8", errors="ignore")
    assert chunks[-1] == ""


def test_multi_byte_character_comes_out_whole_at_its_last_byte(route1, shipped):
    ids = route1.encode("ok😈")
    assert [shipped.id_to_token(i) for i in ids[-4:]] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x88>"]
    assert _stream(route1, ids)[-5:] == ["", "", "", "😈", ""]


def test_truncated_character_becomes_replacement_at_flush(route1, shipped):
    ids = route1.encode("ok😈")[:-2]  # the model stopped two bytes into the emoji
    chunks = _stream(route1, ids)
    assert REPLACEMENT not in "".join(chunks[:-1])
    assert chunks[-1] == REPLACEMENT * 2
    assert "".join(chunks) == shipped.decode(ids, skip_special_tokens=False)


def test_special_and_unknown_ids_in_a_byte_run(route1, shipped):
    emoji = route1.encode("😈")
    eos = route1.token_to_id("<|end_of_sentence|>")
    for ids in (
        emoji[:2] + [eos] + emoji[2:],  # a special token ends the run: both halves invalid
        emoji[:3] + [103_000] + emoji[3:],  # an id past the vocab (padded LM head) is dropped
        [route1.token_to_id("<0xFF>")] + route1.encode("a"),
    ):
        assert "".join(_stream(route1, ids)) == shipped.decode(ids, skip_special_tokens=False)


def test_invalid_byte_after_valid_character_in_one_run(route1):
    """The documented difference: decode() blanks the whole run, the stream keeps 中."""
    ids = [route1.token_to_id(f"<0x{b:02X}>") for b in "中".encode() + b"\xff"]
    assert "".join(_stream(route1, ids)) == "中" + REPLACEMENT


def test_stream_random_sequences_match_reference_decode(route1, shipped):
    """Random mixes of ordinary, special and out-of-vocab ids with characters spelt in byte tokens."""
    rng = random.Random(7)
    byte_id = {b: shipped.token_to_id(f"<0x{b:02X}>") for b in range(256)}
    names = ("▁", "▁▁", "的", "Hello", "▁Hello", "0", "<|end_of_sentence|>", "</s>")
    ordinary = [shipped.token_to_id(name) for name in names]
    for _ in range(200):
        ids: list[int] = []
        for _ in range(rng.randrange(1, 15)):
            kind = rng.random()
            if kind < 0.5:
                ids += [byte_id[b] for b in _random_char(rng).encode("utf-8")]
            elif kind < 0.9:
                ids.append(rng.choice(ordinary + [rng.randrange(269, 101304)]))
            else:
                ids.append(rng.randrange(101304, 103424))
        if rng.random() < 0.3:  # cut the last character short, after a non-byte token
            cut = "😈".encode("utf-8")[: rng.randrange(1, 4)]
            ids += [route1.token_to_id("a")] + [byte_id[b] for b in cut]
        assert "".join(_stream(route1, ids)) == shipped.decode(ids, skip_special_tokens=False), ids
