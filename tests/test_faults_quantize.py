"""`ernie quantize` when things go wrong: killed runs, two runs at once, a full disk, an output that
cannot be written or renamed, --force on the wrong directory, damaged weights, a missing tokenizer.

Each case checks the one-line error (exit 1, no traceback) and that nothing half-made is left under
or beside OUTPUT. The tests run as root, so permission bits cannot make a write fail; failures are
injected by patching the write or rename at the system-call boundary instead.
"""

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ernie_cli.cli import main

ROOT = Path(__file__).resolve().parent.parent
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def one_error_line(err: str) -> str:
    """The one `error:` line, last on stderr (progress lines may come before it), with no traceback."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error") for line in lines) == 1, err
    assert "Traceback" not in err and "Errno" not in err and "OSError" not in err, err
    return lines[-1]


def write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))


@pytest.fixture
def src(checkpoints, tmp_path):
    """A private copy of the tiny MoE checkpoint with a tokenizer, as a release has one."""
    path, _ = checkpoints("moe")
    dst = tmp_path / "src"
    shutil.copytree(path, dst)
    write_tokenizer(dst)
    return dst


def leftovers(out: Path) -> list[str]:
    """Everything a run keeps beside OUTPUT while it works (temporary copy, replaced copy, lock)."""
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def fmt_of(out: Path) -> str:
    return json.loads((out / "config.json").read_text())["quantization_config"]["format"]


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "ernie_cli", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120, **kw)


# ---- killed runs ---------------------------------------------------------------------------------------

KILL_MID_QUANTIZE = """
import os, signal
from ernie_cli.quant import formats
real, n = formats.quantize, [0]
def die(*a, **k):
    n[0] += 1
    if n[0] == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
formats.quantize = die
"""

# The old OUTPUT has been moved aside and the new copy is not yet in place.
KILL_BETWEEN_RENAMES = """
import os, signal
real = os.rename
def rename(a, b, *rest, **kw):
    real(a, b, *rest, **kw)
    if ".replaced-" in os.fspath(b):
        os.kill(os.getpid(), signal.SIGKILL)
os.rename = rename
"""


@pytest.mark.parametrize("where", ["mid-quantize", "between-renames"])
def test_killed_run_then_rerun_leaves_nothing_behind(src, tmp_path, capsys, where):
    out = tmp_path / "out"
    assert run(["quantize", str(src), str(out), "--format", "int8"], capsys)[0] == 0
    patch = KILL_MID_QUANTIZE if where == "mid-quantize" else KILL_BETWEEN_RENAMES
    script = patch + f"from ernie_cli.cli import main\nmain(['quantize', {str(src)!r}, {str(out)!r}, '--format', 'int4', '--force'])\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if where == "mid-quantize":
        assert fmt_of(out) == "int8"  # the old copy is untouched until the new one is complete
        assert any(name.startswith(".out.incomplete-") for name in leftovers(out))
    else:
        assert not out.exists()
        assert any(name.startswith(".out.replaced-") for name in leftovers(out))
    proc = cli("quantize", src, out, "--format", "int4", "--force")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == str(out)
    assert fmt_of(out) == "int4"
    assert leftovers(out) == []


# ---- two runs into one OUTPUT ----------------------------------------------------------------------------

# The first run stops inside its first quantized block until the test lets it go on.
HELD_RUN = """
import os, sys, time
from pathlib import Path
from ernie_cli.quant import formats
real, started, go = formats.quantize, Path(sys.argv[1]), Path(sys.argv[2])
def held(*a, **k):
    if not started.exists():
        started.write_text(str(os.getpid()))
        deadline = time.monotonic() + 60
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    return real(*a, **k)
formats.quantize = held
from ernie_cli.cli import main
main(sys.argv[3:])
"""


def test_concurrent_runs_into_one_output(src, tmp_path):
    out, started, go = tmp_path / "out", tmp_path / "started", tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, "-c", HELD_RUN, started, go, "quantize", src, out, "--format", "int4"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert started.exists(), first.communicate()[1]
        second = cli("quantize", src, out, "--format", "int8", "--force")
    finally:
        go.write_text("")
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert stdout.splitlines()[-1] == str(out)
    assert second.returncode == 1 and second.stdout == ""
    line = one_error_line(second.stderr)
    assert f"pid {first.pid}" in line and str(out) in line
    assert fmt_of(out) == "int4"  # the winner's output, whole
    assert leftovers(out) == []


# ---- a full disk ---------------------------------------------------------------------------------------


class _FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes have gone in."""

    def __init__(self, f, room):
        self._f, self._room = f, room

    def write(self, data):
        n = len(memoryview(data).cast("B")) if not isinstance(data, str) else len(data.encode())
        if n > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_disk_full_while_writing_shards(src, tmp_path, capsys, monkeypatch):
    from ernie_cli.quant import io as quant_io

    room = [40_000]  # the disk holds the first few tensors of the shard, then fills up

    def full_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return _FullDisk(f, room[0]) if "w" in mode else f

    monkeypatch.setattr(quant_io, "open", full_open, raising=False)
    out = tmp_path / "out"
    code, stdout, err = run(["quantize", str(src), str(out), "--format", "int8"], capsys)
    assert code == 1 and stdout == ""
    line = one_error_line(err)
    assert "space" in line and str(tmp_path) in line
    assert not out.exists() and leftovers(out) == []


# ---- an OUTPUT that cannot be written -------------------------------------------------------------------


def _fail_writes_under(monkeypatch, directory: Path, err: int, empty_ok: bool):
    """Opening a file under `directory` for writing fails with `err`, as on a read-only or full file system.

    With `empty_ok`, creating a file works and only writing bytes into it fails (a full disk).
    """
    import builtins

    real_open = io.open
    real_os_open = os.open
    inside = str(directory.resolve()) + os.sep

    def under(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)).startswith(inside)

    def fake_open(path, mode="r", *args, **kwargs):
        if under(path) and any(c in mode for c in "wax+"):
            if not empty_ok:
                raise OSError(err, os.strerror(err), os.fspath(path))
            return _FullDisk(real_open(path, mode, *args, **kwargs), 0)
        return real_open(path, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if not empty_ok and under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(err, os.strerror(err), os.fspath(path))
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)


def _count_evaluations(monkeypatch) -> list:
    from ernie_cli.quant import evaluate

    calls, real = [], evaluate.evaluate_models

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_models", counted)
    return calls


def test_eval_only_into_a_read_only_output_fails_before_evaluating(src, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert run(["quantize", str(src), str(out), "--format", "int8"], capsys)[0] == 0
    before = sorted(p.name for p in out.iterdir())
    calls = _count_evaluations(monkeypatch)
    _fail_writes_under(monkeypatch, out, errno.EROFS, empty_ok=False)
    code, stdout, err = run(["quantize", str(src), str(out), "--eval-only", "--eval-tokens", "64"], capsys)
    assert code == 1 and stdout == ""
    line = one_error_line(err)
    assert "quantization_report.json" in line and "read-only" in line
    assert calls == []  # refused before the (long) evaluation
    assert sorted(p.name for p in out.iterdir()) == before


def test_eval_only_output_that_is_not_a_directory_name(src, tmp_path, capsys):
    """OUTPUT under a regular file cannot exist: refused at once, nothing created."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, stdout, err = run(["quantize", str(src), str(blocker / "out"), "--eval-only"], capsys)
    assert code == 2 and stdout == "" and "--eval-only needs an existing model directory" in err


def test_eval_only_report_reaches_stdout_when_the_disk_fills_at_the_end(src, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert run(["quantize", str(src), str(out), "--format", "int8"], capsys)[0] == 0
    calls = _count_evaluations(monkeypatch)
    _fail_writes_under(monkeypatch, out, errno.ENOSPC, empty_ok=True)
    code, stdout, err = run(["quantize", str(src), str(out), "--eval-only", "--eval-tokens", "64"], capsys)
    assert calls == [1] and code == 1
    assert "KL divergence" in stdout and "same top-1" in stdout  # the evaluation is not lost
    line = one_error_line(err)
    assert "space" in line and "quantization_report.json" in line
    assert not (out / "quantization_report.json").exists()
    assert not [p.name for p in out.iterdir() if "report" in p.name]  # no half-written report


def test_eval_only_prints_the_report_and_writes_it(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["quantize", str(src), str(out), "--format", "int8"], capsys)[0] == 0
    code, stdout, _ = run(["quantize", str(src), str(out), "--eval-only", "--eval-tokens", "64"], capsys)
    assert code == 0 and stdout.splitlines()[-1] == str(out / "quantization_report.json")
    report = json.loads((out / "quantization_report.json").read_text())
    assert f"{report['kl_mean']:.5f}" in stdout and report["tokens"] == 64 - 1


# ---- an OUTPUT that cannot be renamed (a mount point) -----------------------------------------------------


@pytest.mark.parametrize("code", [errno.EBUSY, errno.EXDEV, errno.EACCES])
def test_output_that_cannot_be_renamed(src, tmp_path, capsys, monkeypatch, code):
    out = tmp_path / "out"
    assert run(["quantize", str(src), str(out), "--format", "int8"], capsys)[0] == 0
    real = os.rename

    def rename(a, b, *args, **kwargs):
        if Path(a) == out or Path(b) == out:
            raise OSError(code, os.strerror(code))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    got, stdout, err = run(["quantize", str(src), str(out), "--format", "int4", "--force"], capsys)
    assert got == 1 and stdout == ""
    line = one_error_line(err)
    assert str(out) in line and "choose" in line
    assert fmt_of(out) == "int8"  # the old copy is still there, whole
    assert leftovers(out) == []


def test_mount_point_output_is_refused_before_quantizing(src, tmp_path, capsys, monkeypatch):
    from ernie_cli.quant import formats

    out = tmp_path / "out"
    assert run(["quantize", str(src), str(out), "--format", "int8"], capsys)[0] == 0
    real_ismount, calls = os.path.ismount, []
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or real_ismount(p))
    real_quantize = formats.quantize
    monkeypatch.setattr(formats, "quantize", lambda *a, **k: calls.append(1) or real_quantize(*a, **k))
    code, stdout, err = run(["quantize", str(src), str(out), "--format", "int4", "--force"], capsys)
    assert code == 1 and stdout == "" and calls == []
    line = one_error_line(err)
    assert "mount point" in line and str(out) in line
    assert fmt_of(out) == "int8" and leftovers(out) == []


def test_options_are_checked_before_the_source_is_loaded(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    code, _, err = run(["quantize", str(missing), str(tmp_path / "out"), "--format", "int4", "--group-size", "48"], capsys)
    assert code == 2 and "--group-size 48 is not supported" in err


def test_eval_device_is_checked_before_quantizing(src, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(["quantize", str(src), str(out), "--format", "int8", "--eval", "--device", "cuda:99"], capsys)
    assert code == 1 and stdout == ""
    one_error_line(err)
    assert not out.exists() and leftovers(out) == []


# ---- --force -------------------------------------------------------------------------------------------


def test_force_refuses_a_directory_that_is_not_a_model(src, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, stdout, err = run(["quantize", str(src), str(out), "--format", "int8", "--force"], capsys)
    assert code == 1 and stdout == ""
    line = one_error_line(err)
    assert "--force" in line and str(out) in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert leftovers(out) == []
    # config.json of something else, even beside safetensors, is no ERNIE model either
    (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    shutil.copy(src / "model.safetensors", out / "model.safetensors")
    assert run(["quantize", str(src), str(out), "--format", "int8", "--force"], capsys)[0] == 1
    assert (out / "notes.txt").read_text() == "mine"


def test_force_replaces_an_ernie_checkpoint_an_earlier_output_or_an_empty_directory(src, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    assert run(["quantize", str(src), str(ckpt), "--format", "int8", "--force"], capsys)[0] == 0
    assert fmt_of(ckpt) == "int8"  # an ERNIE checkpoint: replaced
    assert run(["quantize", str(src), str(ckpt), "--format", "int4", "--force"], capsys)[0] == 0
    assert fmt_of(ckpt) == "int4"  # an earlier output: replaced
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(["quantize", str(src), str(empty), "--format", "int8", "--force"], capsys)[0] == 0
    assert fmt_of(empty) == "int8"
    assert leftovers(ckpt) == [] and leftovers(empty) == []


# ---- damaged weights -----------------------------------------------------------------------------------


def _rewrite(path: Path, name: str, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    state[name] = edit(state[name].clone())
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "name, bad",
    [
        (Q_PROJ, float("nan")),
        ("model.layers.2.mlp.experts.5.down_proj.weight", float("inf")),  # one expert of a stacked weight
        ("model.layers.1.post_attention_layernorm.weight", float("-inf")),  # kept in float, still refused
    ],
)
def test_non_finite_weights_are_refused(src, tmp_path, capsys, name, bad):
    def poison(t):
        t.view(-1)[t.numel() // 2] = bad
        return t

    _rewrite(src / "model.safetensors", name, poison)
    out = tmp_path / "out"
    code, stdout, err = run(["quantize", str(src), str(out), "--format", "int4"], capsys)
    assert code == 1 and stdout == ""
    line = one_error_line(err)
    assert f"tensor {name} " in line and "NaN or Inf" in line
    assert not out.exists() and leftovers(out) == []


# ---- a source without a tokenizer --------------------------------------------------------------------------


def test_source_without_tokenizer_is_refused_unless_allowed(src, tmp_path, capsys):
    (src / "tokenizer.json").unlink()
    out = tmp_path / "out"
    code, stdout, err = run(["quantize", str(src), str(out), "--format", "int8"], capsys)
    assert code == 1 and stdout == ""
    line = one_error_line(err)
    assert "tokenizer" in line and "--allow-no-tokenizer" in line
    assert not out.exists() and leftovers(out) == []
    code, stdout, err = run(["quantize", str(src), str(out), "--format", "int8", "--allow-no-tokenizer"], capsys)
    assert code == 0 and stdout.splitlines()[-1] == str(out)
    assert "warning:" in err and "tokenizer" in err
    assert not (out / "tokenizer.json").exists()


def test_source_with_tokenizer_carries_it_into_the_output(src, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(["quantize", str(src), str(out), "--format", "int8"], capsys)
    assert code == 0 and "warning" not in err
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    from ernie_cli.text.tokenizer import load_tokenizer

    assert load_tokenizer(out).encode("a a") == [1, 1]


def test_huge_but_finite_weights_are_not_refused(src, tmp_path, capsys):
    """Weights whose sum overflows are still finite weights."""
    name = "model.layers.1.post_attention_layernorm.weight"
    _rewrite(src / "model.safetensors", name, lambda t: torch.full_like(t, 3e38))
    out = tmp_path / "out"
    code, stdout, err = run(["quantize", str(src), str(out), "--format", "int8"], capsys)
    assert code == 0, err
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        kept = f.get_tensor("layers.1.post_attention_layernorm.weight")
    assert torch.equal(kept, torch.full_like(kept, 3e38))
