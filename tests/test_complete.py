"""`ernie complete` end to end, in subprocesses, on a tiny random model with the real ERNIE tokenizer.

References: transformers' greedy generate and log-softmax for ids and logprobs, the shipped
tokenizer.json (through the `tokenizers` library) for text.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny_models import load_reference, write_checkpoint

from ernie_cli.errors import ErnieError

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
ENV.pop("ERNIE_DEBUG", None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    path, _ = write_checkpoint(
        tmp_path_factory.mktemp("complete") / "tiny-ernie", "moe",
        vocab_size=103424, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=65536,
    )
    for name in TOKENIZER_FILES + ["generation_config.json"]:
        shutil.copy(tokenizer_dir / name, path / name)  # real tokenizer and generation defaults
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    from tokenizers import Tokenizer

    return load_reference(model_dir), Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def ernie(*args, stdin: bytes | None = b"", timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "ernie_cli", "complete", *args], input=stdin, capture_output=True, env=ENV, timeout=timeout
    )


def run_json(model_dir, *args, stdin=b""):
    proc = ernie("-m", str(model_dir), "--json", "-q", *args, stdin=stdin)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def reference_greedy(reference, prompt, n, penalty):
    ref, tok = reference
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
    with torch.no_grad():
        out = ref.generate(ids, max_new_tokens=n, do_sample=False, repetition_penalty=penalty, eos_token_id=2, pad_token_id=0)
    return ids[0].tolist(), out[0, ids.shape[1]:].tolist()


PROMPT = "The capital of France is"


def test_greedy_ids_and_text_equal_transformers(model_dir, reference):
    prompt_ids, expected = reference_greedy(reference, PROMPT, 24, 1.3)
    record = run_json(model_dir, "-t", "0", "--repetition-penalty", "1.3", "-n", "24", PROMPT)
    assert record["prompt_tokens"] == prompt_ids
    assert record["tokens"] == expected
    _, tok = reference
    generated = expected[:-1] if expected[-1] == 2 else expected
    assert record["text"] == tok.decode(generated, skip_special_tokens=False)
    assert record["finish_reason"] == ("eos" if expected[-1] == 2 else "length")


def test_chinese_and_emoji_stream_equals_reference_decode(model_dir, reference):
    """What is streamed to stdout is exactly what the reference tokenizer decodes from the ids."""
    _, tok = reference
    args = ["-t", "1.0", "-s", "4", "--ignore-eos", "-n", "40", "今天的天气 🌧️ 很"]
    record = run_json(model_dir, *args)
    proc = ernie("-m", str(model_dir), "-q", *args)
    assert proc.returncode == 0
    assert proc.stdout.decode("utf-8") == record["text"] == tok.decode(record["tokens"], skip_special_tokens=False)


def test_json_schema(model_dir):
    record = run_json(model_dir, "-n", "5", "-s", "3", PROMPT)
    assert set(record) == {"model", "prompt", "text", "prompt_tokens", "tokens", "finish_reason", "logprobs", "usage", "timings"}
    assert record["prompt"] == PROMPT and record["logprobs"] is None
    assert record["usage"] == {"prompt_tokens": len(record["prompt_tokens"]), "completion_tokens": len(record["tokens"]),
                               "total_tokens": len(record["prompt_tokens"]) + len(record["tokens"])}
    assert set(record["timings"]) == {"load_s", "prefill_s", "first_step_s", "decode_s", "prefill_tokens_per_s",
                                      "decode_tokens_per_s", "stages"}
    assert record["finish_reason"] in ("length", "eos")


def test_stages_account_for_the_wall_time(model_dir):
    """-v names every stage on stderr; the stages, which start at the process's start, add up to no
    more than the wall time seen from outside and to most of it (what is left is exiting)."""
    start = time.perf_counter()
    proc = ernie("-m", str(model_dir), "--json", "-v", "-n", "5", "-s", "3", "--ignore-eos", PROMPT)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr.decode()
    stages = json.loads(proc.stdout)["timings"]["stages"]
    assert list(stages) == ["start", "prompt", "import", "device", "weights", "prepare", "prefill", "first step", "decode", "other"]
    assert all(v >= 0 for v in stages.values())
    assert 0.5 * wall < sum(stages.values()) <= wall + 0.02  # /proc's start time has a 10 ms tick
    err = proc.stderr.decode()
    assert "stages:" in err and all(f"  {name} " in err for name in stages)


def test_logprobs_match_reference_log_softmax(model_dir, reference):
    record = run_json(model_dir, "-n", "6", "-s", "5", "-t", "1.0", "--top-p", "0.9", "--logprobs", "4", PROMPT)
    ref, _ = reference
    ids = torch.tensor([record["prompt_tokens"] + record["tokens"]])
    with torch.no_grad():
        lp = torch.log_softmax(ref(ids).logits[0].double(), dim=-1)
    p = len(record["prompt_tokens"])
    for i, entry in enumerate(record["logprobs"]):
        row = lp[p - 1 + i]
        assert entry["id"] == record["tokens"][i]
        assert abs(entry["logprob"] - row[entry["id"]].item()) < 1e-4
        values, top = torch.topk(row, 4)
        assert [t for t, _ in entry["top"]] == top.tolist()
        assert max(abs(v - r) for (_, v), r in zip(entry["top"], values.tolist())) < 1e-4


def test_stop_string_split_across_tokens(model_dir, reference):
    _, expected = reference_greedy(reference, PROMPT, 24, 1.3)
    _, tok = reference
    pieces = [tok.decode([t]) for t in expected if t != 2]
    full = "".join(pieces)
    # a stop string made of the end of one token and the start of the next
    for i in range(2, len(pieces) - 1):
        left, right = pieces[i], pieces[i + 1]
        if len(left) >= 2 and len(right) >= 2:
            stop = left[-2:] + right[:2]
            if full.find(stop) == len("".join(pieces[: i + 1])) - 2:
                break
    else:
        pytest.skip("no token pair long enough in this sample")
    record = run_json(model_dir, "-t", "0", "--repetition-penalty", "1.3", "-n", "24", "--stop", stop, "--stop", "NEVER-STOP-HERE", PROMPT)
    assert record["finish_reason"] == "stop"
    assert record["text"] == full[: full.find(stop)]
    proc = ernie("-m", str(model_dir), "-q", "-t", "0", "--repetition-penalty", "1.3", "-n", "24", "--stop", stop, PROMPT)
    assert proc.stdout.decode() == full[: full.find(stop)]


def test_echo_prints_prompt_first(model_dir):
    proc = ernie("-m", str(model_dir), "-q", "-n", "3", "-s", "1", "--echo", PROMPT)
    assert proc.returncode == 0
    assert proc.stdout.decode().startswith(PROMPT)


def test_stdin_comes_first_then_argument(model_dir):
    record = run_json(model_dir, "-n", "2", "Summary:", stdin="Some notes.".encode())
    assert record["prompt"] == "Some notes. Summary:"
    record = run_json(model_dir, "-n", "2", "Summary:", stdin="line one\n".encode())
    assert record["prompt"] == "line one\nSummary:"
    record = run_json(model_dir, "-n", "2", "-", stdin="only stdin".encode())
    assert record["prompt"] == "only stdin"


def test_prompt_from_file(model_dir, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("文件里的提示", encoding="utf-8")
    assert run_json(model_dir, "-n", "2", "-f", str(f))["prompt"] == "文件里的提示"


def test_non_utf8_stdin_is_replaced_with_a_warning(model_dir):
    proc = ernie("-m", str(model_dir), "--json", "-n", "2", "x", stdin=b"caf\xe9 ")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["prompt"] == "caf\ufffd x"
    assert b"not valid UTF-8" in proc.stderr


def test_same_seed_same_text_and_other_seed_differs(model_dir):
    a = run_json(model_dir, "-n", "12", "-s", "7", "-t", "1.5", "--ignore-eos", PROMPT)
    b = run_json(model_dir, "-n", "12", "-s", "7", "-t", "1.5", "--ignore-eos", PROMPT)
    c = run_json(model_dir, "-n", "12", "-s", "8", "-t", "1.5", "--ignore-eos", PROMPT)
    assert a["tokens"] == b["tokens"]
    assert a["tokens"] != c["tokens"]


def test_summary_on_stderr_only(model_dir):
    proc = ernie("-m", str(model_dir), "-n", "3", "-s", "1", PROMPT)
    assert b"prompt tokens" in proc.stderr and b"tok/s" in proc.stderr
    assert b"prompt tokens" not in proc.stdout


def test_closed_pipe_ends_quietly(model_dir):
    cmd = f"{sys.executable} -m ernie_cli complete -m {model_dir} -q -n 400 --ignore-eos -t 1.0 -s 1 'Go' | head -c 20"
    proc = subprocess.run(["bash", "-c", cmd + "; echo \"rc=${PIPESTATUS[0]}\" >&2"], capture_output=True, env=ENV, timeout=120)
    assert len(proc.stdout) == 20
    assert b"Traceback" not in proc.stderr and b"BrokenPipe" not in proc.stderr and b"Exception ignored" not in proc.stderr
    assert b"rc=0" in proc.stderr


def test_ctrl_c_keeps_printed_text_and_exits_quietly(model_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "ernie_cli", "complete", "-m", str(model_dir), "-q", "-n", "60000", "--ignore-eos", "-s", "1", "Go"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
        # A shell's background job inherits SIGINT ignored; give the child the terminal's default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    first = proc.stdout.read(1)  # generation has started
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert first and proc.returncode == 130
    assert b"Traceback" not in err


# ---- errors --------------------------------------------------------------------------------------


def _error(proc, code=1):
    assert proc.returncode == code, proc.stderr.decode()
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr.decode()
    return lines[0]


def test_missing_model_dir(tmp_path):
    line = _error(ernie("-m", str(tmp_path / "nope"), "hi"))
    assert "no model directory or repo id" in line


def test_directory_that_is_not_an_ernie_model(tmp_path, model_dir):
    bad = tmp_path / "llama"
    shutil.copytree(model_dir, bad)
    raw = json.loads((bad / "config.json").read_text())
    raw.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (bad / "config.json").write_text(json.dumps(raw))
    assert "not an ERNIE 4.5 text model" in _error(ernie("-m", str(bad), "hi"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    assert "has no config.json" in _error(ernie("-m", str(empty), "hi"))


def test_corrupt_weights(tmp_path, model_dir):
    bad = tmp_path / "corrupt"
    shutil.copytree(model_dir, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-4096])
    assert "is truncated" in _error(ernie("-m", str(bad), "hi"))


def test_tokenizer_larger_than_the_model_is_refused(tmp_path, tokenizer_dir):
    """A checkpoint whose embedding is smaller than its tokenizer: a clear error, not an IndexError."""
    path, _ = write_checkpoint(tmp_path / "small-vocab", "moe", vocab_size=512)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, path / name)
    line = _error(ernie("-m", str(path), "The capital of France is"))
    assert "the model has 512 embeddings" in line and "do not belong to this checkpoint" in line


def test_prompt_longer_than_context(model_dir):
    line = _error(ernie("-m", str(model_dir), "--max-context", "4", "one two three four five six seven"))
    assert "tokens but the context holds 4" in line


def test_cuda_asked_for_but_absent(model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "no CUDA GPU" in _error(ernie("-m", str(model_dir), "--device", "cuda", "hi"))


def test_not_enough_memory_is_refused_before_loading(model_dir, monkeypatch, capsys):
    import ernie_cli.weights.loader as loader
    from ernie_cli.cli import main

    monkeypatch.setattr(loader, "available_bytes", lambda device: 10 * 1024**2)
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    with pytest.raises(SystemExit) as exit_info:
        main(["complete", "-m", str(model_dir), "-n", "2", "hi"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "GiB is free on cpu: use a quantized copy" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["-n", "-3", "hi"], "--max-tokens"),
        (["--top-p", "1.5", "hi"], "--top-p"),
        (["--top-p", "0", "hi"], "--top-p"),
        (["-t", "-1", "hi"], "--temperature"),
        (["--min-p", "1", "hi"], "--min-p"),
        (["--dtype", "int3", "hi"], "--dtype"),
        ([], "no prompt"),
        (["--bogus", "hi"], "No such option: --bogus"),
    ],
)
def test_invalid_options_are_usage_errors(model_dir, args, message):
    proc = ernie("-m", str(model_dir), *args)
    assert proc.returncode == 2, proc.stderr.decode()
    assert message in proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()


def test_bare_ernie_shows_help_and_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "ernie_cli"], capture_output=True, env=ENV, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert b"complete" in proc.stdout + proc.stderr and b"Traceback" not in proc.stderr and b"error:" not in proc.stderr


@pytest.mark.parametrize("command, texts", [
    ("complete", ["[default: generation_config.json, else 0.8]", "[id, logprob] pairs", "[default: the model's]"]),
    ("bench", ["[default: torch's, usually the physical cores]"]),
    ("quantize", ["[default: all, ~4600]"]),
])
def test_help_prints_the_bracketed_defaults(command, texts):
    """Help text is printed as written: Rich markup used to swallow "[default: ...]" as a tag."""
    proc = subprocess.run([sys.executable, "-m", "ernie_cli", command, "--help"], capture_output=True, env=dict(ENV, COLUMNS="300"), timeout=60)
    assert proc.returncode == 0
    flat = " ".join(proc.stdout.decode().split())
    for text in texts:
        assert text in flat


def test_sampling_defaults_come_from_generation_config(model_dir, tmp_path):
    """ERNIE Base's generation_config.json says temperature 0.8, top_p 0.8; flags override it."""
    raw = json.loads((model_dir / "generation_config.json").read_text())
    assert (raw["temperature"], raw["top_p"]) == (0.8, 0.8)
    implicit = run_json(model_dir, "-n", "10", "-s", "5", "--ignore-eos", PROMPT)
    explicit = run_json(model_dir, "-n", "10", "-s", "5", "--ignore-eos", "-t", "0.8", "--top-p", "0.8", PROMPT)
    assert implicit["tokens"] == explicit["tokens"]
    greedy_dir = tmp_path / "greedy"
    shutil.copytree(model_dir, greedy_dir)
    (greedy_dir / "generation_config.json").write_text(json.dumps(dict(raw, do_sample=False)))
    by_config = run_json(greedy_dir, "-n", "10", "-s", "5", "--ignore-eos", PROMPT)
    by_flag = run_json(model_dir, "-n", "10", "-t", "0", "--ignore-eos", PROMPT)
    assert by_config["tokens"] == by_flag["tokens"]


# ---- robustness of the command line ----------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The summary line and the warnings `ernie complete` itself writes; anything else on stderr is noise.
OUR_STDERR = re.compile(r"^(\d+ prompt tokens, \d+ generated; .*finish: \w+|warning: .*)$")


def test_numpy_is_a_declared_dependency():
    """torch warns "Failed to initialize NumPy" on import without it, and `pip install .` does not pull it otherwise."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    assert "numpy" in {re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower() for d in deps}


def test_stderr_holds_only_our_lines_even_without_numpy(model_dir, tmp_path):
    """A numpy that cannot be imported (as after a bare install) must not add torch's warning to stderr."""
    fake = tmp_path / "no-numpy" / "numpy"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'numpy\'", name="numpy")\n')
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(fake.parent), ROOT]))
    proc = subprocess.run(
        [sys.executable, "-m", "ernie_cli", "complete", "-m", str(model_dir), "-n", "3", "-s", "1", PROMPT],
        stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stderr.decode().splitlines()
    assert lines and all(OUR_STDERR.match(line) for line in lines), lines
    assert b"NumPy" not in proc.stderr and b"UserWarning" not in proc.stderr


def test_huge_stdin_is_refused_by_size_without_reading_it(model_dir):
    """50 MB on stdin with a 64-position context: refused after reading a bounded prefix, in seconds."""
    total = 50 * 1024**2
    block = ("The quick brown fox jumps over the lazy dog. " * 1000).encode()
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ernie_cli", "complete", "-m", str(model_dir), "--max-context", "64", "Summary:"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
    )
    written = 0
    try:
        while written < total:
            written += proc.stdin.write(block[: total - written])
    except BrokenPipeError:
        pass  # the reader went away: what it had not read stays unread
    out, err = proc.communicate(timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, err.decode()
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "context" in lines[0] and "--max-context" in lines[0]
    assert out == b""
    assert written < total // 4  # far less than all of it was ever taken from the pipe
    assert elapsed < 10


def _encode_spy(monkeypatch):
    """The lengths of all texts the tokenizer encodes."""
    from ernie_cli.text.tokenizer import ErnieTokenizer

    seen = []
    real = ErnieTokenizer.encode

    def encode(self, text):
        seen.append(len(text))
        return real(self, text)

    monkeypatch.setattr(ErnieTokenizer, "encode", encode)
    return seen


def test_prompt_over_the_context_in_tokens_is_refused_without_tokenizing_it_whole(model_dir, tmp_path, monkeypatch, capsys):
    """Under the byte bound but over the context in tokens: counted piece by piece, refused before the weights."""
    from ernie_cli.cli import main

    seen = _encode_spy(monkeypatch)
    text = "The quick brown fox jumps over the lazy dog; 今天的天气很好. " * 1500  # 94 KB: under 2,999 x 48 bytes
    f = tmp_path / "long.txt"
    f.write_text(text, encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    with pytest.raises(SystemExit) as exit_info:
        main(["complete", "-m", str(model_dir), "--max-context", "3000", "-f", str(f)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "tokens but the context holds 3000" in err and "--max-context" in err
    assert seen and max(seen) < len(text) // 4


def test_prompt_ids_counted_in_pieces_equal_one_encode(tokenizer_dir):
    """The piecewise count is exact: its ids are those of encoding the text at once."""
    from ernie_cli.text.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    parts = ["Hello, world!\n\n", "    indented code()  ", "今天的天气很好，", "🌧️ 😈", "<|end_of_sentence|>", "a" * 50,
             "可在判决书送达之日起十五日内", " " * 40, "\t\r\n", "x = [1, 2, 3]; ", "Ünïcödé ", "ကျေးရွာအုပ်စု"]
    rng = __import__("random").Random(0)
    text = "".join(rng.choice(parts) for _ in range(60000))
    whole = tok.encode(text)
    assert tok.encode_within(text, len(whole)) == whole
    assert tok.encode_within(text, len(whole) - 1) is None


def test_non_utf8_argument_is_replaced_with_a_warning(model_dir):
    proc = subprocess.run(
        [sys.executable.encode(), b"-m", b"ernie_cli", b"complete", b"-m", str(model_dir).encode(), b"--json", b"-n", b"1",
         b"caf\xe9 au lait", b"--stop", b"\xff"],
        stdin=subprocess.DEVNULL, capture_output=True, env=ENV, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["prompt"] == "caf\ufffd au lait"
    assert b"not valid UTF-8" in proc.stderr and b"TypeError" not in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["-s", "99999999999999999999999"], "--seed"),
        (["-s", "-1"], "--seed"),
        (["--device", "tpu"], "--device"),
        (["--device", "cuda:x"], "--device"),
        (["-t", "nan"], "--temperature"),
        (["--top-p", "nan"], "--top-p"),
        (["--repetition-penalty", "inf"], "--repetition-penalty"),
        (["--top-k", "-1"], "--top-k"),
        (["--max-context", "1"], "--max-context"),
        (["--logprobs", "21"], "--logprobs"),
    ],
)
def test_invalid_options_are_refused_before_anything_loads(tmp_path, args, message):
    """A model that does not exist: the option's error must come first, as a usage error."""
    line = _error(ernie("-m", str(tmp_path / "no-such-model"), *args, "hi"), code=2)
    assert line.startswith("error: ") and message in line


def test_options_without_effect_are_named_once(model_dir):
    proc = ernie("-m", str(model_dir), "-q", "-n", "2", "--logprobs", "3", PROMPT)
    assert proc.returncode == 0
    assert proc.stderr.decode().count("--logprobs") == 1 and "--json" in proc.stderr.decode()
    proc = ernie("-m", str(model_dir), "-q", "-n", "2", "--json", "--echo", PROMPT)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["prompt"] == PROMPT
    assert proc.stderr.decode().count("--echo") == 1


@pytest.mark.parametrize("delay", [0.05, 0.15, 0.3, 0.5, 0.75, 1.0])
def test_ctrl_c_at_any_moment_exits_130_without_traceback(model_dir, delay):
    proc = subprocess.Popen(
        [sys.executable, "-m", "ernie_cli", "complete", "-m", str(model_dir), "-q", "-n", "60000", "--ignore-eos", "-s", "1", "Go"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err and b"Error" not in err


def test_shell_loop_runs_once_per_line_with_no_stdin(model_dir, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("alpha\nbeta\ngamma\n")
    command = f"{sys.executable} -m ernie_cli complete -m {model_dir} -q -n 1 --json"
    loop = 'while read -r w; do {cmd} "$w"; done < {words}'
    # Without --no-stdin the first run takes the rest of the file as its prompt, and says so.
    proc = subprocess.run(["bash", "-c", loop.format(cmd=command, words=words)], capture_output=True, env=ENV, timeout=120)
    records = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [r["prompt"] for r in records] == ["beta\ngamma\nalpha"]
    assert "--no-stdin" in proc.stderr.decode()
    proc = subprocess.run(["bash", "-c", loop.format(cmd=command + " --no-stdin", words=words)], capture_output=True, env=ENV, timeout=120)
    records = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [r["prompt"] for r in records] == ["alpha", "beta", "gamma"]


def test_no_stdin_from_the_environment(model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "ernie_cli", "complete", "-m", str(model_dir), "-q", "-n", "1", "--json", "hi"],
        input=b"not part of the prompt", capture_output=True, env=dict(ENV, ERNIE_NO_STDIN="1"), timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["prompt"] == "hi"


def test_stdin_that_stays_open_is_named_while_waited_for(model_dir):
    """`sleep 20 | ernie complete hi` waits for the pipe; a person sees why, and closing it lets the run go on."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ernie_cli", "complete", "-m", str(model_dir), "-q", "-n", "1", "--json", "hi"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
    )
    ready, _, _ = select.select([proc.stderr], [], [], 60)
    line = proc.stderr.readline().decode() if ready else ""
    out, _ = proc.communicate(b"", timeout=60)  # closes stdin: the run goes on
    assert "waiting for stdin" in line and "--no-stdin" in line
    assert proc.returncode == 0 and json.loads(out)["prompt"] == "hi"


def test_non_finite_logits_stop_with_one_line(model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan-weights"
    shutil.copytree(model_dir, bad)
    weights = load_file(str(bad / "model.safetensors"))
    weights["model.norm.weight"][3] = float("nan")
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    line = _error(ernie("-m", str(bad), "-n", "3", PROMPT))
    assert "not finite" in line


def test_docs_pass_real_newlines_to_stop():
    """`--stop "\\n\\n"` hands the shell's two characters backslash and n, which never occur in the text."""
    text = open(os.path.join(ROOT, "docs", "complete.md"), encoding="utf-8").read()
    assert not re.search(r'--stop "[^"]*\\n', text)
    assert "--stop $'\\n\\n'" in text


def test_a_short_argument_needs_no_byte_bound_and_a_long_one_is_refused_by_it(model_dir):
    """max_token_bytes (a walk over the vocabulary) is skipped where no bound could bite: an argument
    alone of at most 4 bytes a position; a longer one is still refused by its size, before encoding."""
    from ernie_cli.text import prompt

    short = prompt.prepare(model_dir, prompt.sources("The capital of France is", None, no_stdin=True), 64)
    assert short.ids and "max_token_bytes" not in vars(short.tokenizer)
    per_token = short.tokenizer.max_token_bytes  # as the long argument's bound will use it
    long_text = "x" * (63 * per_token + 1)
    with pytest.raises(ErnieError, match=f"over {63 * per_token:,} bytes"):
        prompt.prepare(model_dir, prompt.sources(long_text, None, no_stdin=True), 64)
