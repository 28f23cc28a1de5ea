"""`ernie quantize` end to end: outputs, refusals, interrupted runs, and the quality report."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ernie_cli.cli import main
from ernie_cli.quant.evaluate import compare
from ernie_cli.weights.loader import load_model

ROOT = Path(__file__).resolve().parent.parent


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


# The tiny checkpoints ship no tokenizer (the evaluation then reads UTF-8 bytes); tests/test_faults_quantize.py
# covers the refusal without this flag.
NO_TOKENIZER = "--allow-no-tokenizer"


@pytest.fixture
def src(checkpoints, tmp_path):
    """A private copy of the tiny MoE checkpoint, with the side files a release has but a tokenizer."""
    path, _ = checkpoints("moe")
    dst = tmp_path / "src"
    shutil.copytree(path, dst)
    (dst / "tokenizer_config.json").write_text("{}")
    (dst / "LICENSE").write_text("Apache-2.0")
    return dst


def test_quantize_end_to_end(src, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run(["quantize", str(src), str(out), "--format", "int4", "--group-size", "32", NO_TOKENIZER], capsys)
    assert code == 0
    assert stdout.splitlines()[-1] == str(out)  # the product: the path, last
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json", "LICENSE"}
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (q["format"], q["group_size"]) == ("int4", 32)
    model = load_model(out, "cpu")  # found by itself, activations in the source's dtype (float32 here)
    assert model.quantization.group_size == 32 and model.dtype == torch.float32
    assert not list(tmp_path.glob(".out.*"))  # no temporary left beside it


def test_existing_output_needs_force(src, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(src, out)  # an ERNIE checkpoint: --force may replace it
    (out / "keep.txt").write_text("mine")
    code, _, err = run(["quantize", str(src), str(out), "--format", "int8", NO_TOKENIZER], capsys)
    assert code == 1 and "already exists: pass --force" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, stdout, _ = run(["quantize", str(src), str(out), "--format", "int8", "--force", NO_TOKENIZER], capsys)
    assert code == 0 and stdout.strip() == str(out)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "args, code, message",
    [
        ([], 2, "pass --format int8 or --format int4"),
        (["--format", "int3"], 2, "--format 'int3' is not one of int8, int4"),
        (["--format", "int4", "--group-size", "48"], 2, "--group-size 48 is not supported"),
        (["--format", "int8", "--group-size", "32"], 2, "--group-size applies to --format int4 only"),
    ],
)
def test_bad_options(src, tmp_path, capsys, args, code, message):
    got, _, err = run(["quantize", str(src), str(tmp_path / "out"), *args], capsys)
    assert got == code and message in err
    assert not (tmp_path / "out").exists()


def _rewrite(path, name, value):
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    state[name] = value
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64])
def test_non_float_sources_are_refused(src, tmp_path, capsys, dtype):
    name = "model.layers.0.self_attn.q_proj.weight"
    _rewrite(src / "model.safetensors", name, torch.zeros(64, 64, dtype=dtype))
    code, _, err = run(["quantize", str(src), str(tmp_path / "out"), "--format", "int4", NO_TOKENIZER], capsys)
    assert code == 1 and f"tensor {name} is {str(dtype).removeprefix('torch.')}; `ernie quantize` needs a bf16, fp16 or fp32 ERNIE checkpoint" in err
    assert not (tmp_path / "out").exists()


def test_other_refused_sources(src, tmp_path, capsys):
    out = tmp_path / "q"
    assert run(["quantize", str(src), str(out), "--format", "int8", NO_TOKENIZER], capsys)[0] == 0
    code, _, err = run(["quantize", str(out), str(tmp_path / "qq"), "--format", "int4"], capsys)
    assert code == 1 and "is already quantized" in err
    code, _, err = run(["quantize", str(src), str(src / "inside"), "--format", "int4", NO_TOKENIZER], capsys)
    assert code == 1 and "overlaps SOURCE" in err
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, architectures=["LlamaForCausalLM"], model_type="llama")))
    code, _, err = run(["quantize", str(src), str(tmp_path / "l"), "--format", "int4"], capsys)
    assert code == 1 and "not an ERNIE 4.5 text model" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(["quantize", str(empty), str(tmp_path / "e"), "--format", "int4"], capsys)
    assert code == 1 and "has no config.json" in err


def test_interrupted_run_leaves_nothing_under_output(src, tmp_path, capsys, monkeypatch):
    from ernie_cli.quant import formats

    real, calls = formats.quantize, []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(formats, "quantize", interrupt)
    out = tmp_path / "out"
    code, stdout, _ = run(["quantize", str(src), str(out), "--format", "int4", NO_TOKENIZER], capsys)
    assert code == 130 and stdout == ""
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_killed_run_never_looks_complete_and_is_cleaned_up(src, tmp_path):
    """SIGKILL leaves the hidden temporary directory, never OUTPUT; the next run removes the leftover."""
    out = tmp_path / "out"
    script = (
        "import os, signal, sys\n"
        "from ernie_cli.quant import formats\n"
        "real, n = formats.quantize, [0]\n"
        "def die(*a, **k):\n"
        "    n[0] += 1\n"
        "    if n[0] == 6:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*a, **k)\n"
        "formats.quantize = die\n"
        "from ernie_cli.cli import main\n"
        f"main(['quantize', {str(src)!r}, {str(out)!r}, '--format', 'int4', {NO_TOKENIZER!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == -9
    assert not out.exists()
    left = list(tmp_path.glob(".out.incomplete-*"))
    assert len(left) == 1 and not (left[0] / "config.json").exists()  # config.json is written last
    proc = subprocess.run([sys.executable, "-m", "ernie_cli", "quantize", str(src), str(out), "--format", "int4", NO_TOKENIZER], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == str(out)
    assert not list(tmp_path.glob(".out.*"))


def test_eval_report(src, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run(["quantize", str(src), str(out), "--format", "int8", "--eval", "--eval-tokens", "600", NO_TOKENIZER], capsys)
    assert code == 0 and stdout.splitlines()[-1] == str(out)
    assert "KL divergence" in stdout and "same top-1" in stdout
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["tokens"] == 600 - 2  # two chunks (512 + 88), minus each chunk's first position
    assert report["tokenization"].startswith("utf-8 bytes")  # the tiny model ships no tokenizer
    assert 0 <= report["kl_mean"] <= report["kl_p99"] <= report["kl_max"] < 0.1
    assert report["top1_agreement"] > 0.8
    assert report["quantization"]["format"] == "int8"
    assert math.isclose(math.log(report["ppl_quantized"] / report["ppl_source"]), report["ln_ppl_ratio"], rel_tol=1e-6, abs_tol=1e-9)
    # any two model directories: the source against itself is exactly zero
    code, stdout, _ = run(["quantize", str(src), str(src), "--eval-only", "--eval-tokens", "100"], capsys)
    assert code == 0 and stdout.splitlines()[-1] == str(src / "quantization_report.json")
    same = json.loads((src / "quantization_report.json").read_text())
    assert same["kl_max"] == 0 and same["top1_agreement"] == 1 and same["ppl_source"] == same["ppl_quantized"]


def test_report_arithmetic_against_a_float64_hand_computation():
    gen = torch.Generator().manual_seed(0)
    n, v = 300, 11
    ref = torch.log_softmax(torch.randn(n, v, generator=gen) * 2, -1).float()
    test = torch.log_softmax(ref.double() + 0.3 * torch.randn(n, v, generator=gen, dtype=torch.float64), -1).float()
    targets = torch.randint(0, v, (n,), generator=gen)
    got = compare(ref, test, targets)
    kls, same, nll_r, nll_t = [], 0, 0.0, 0.0
    for i in range(n):
        p = [math.exp(x) for x in ref[i].double().tolist()]
        lp, lq = ref[i].double().tolist(), test[i].double().tolist()
        kls.append(sum(p[j] * (lp[j] - lq[j]) for j in range(v)))
        same += max(range(v), key=lp.__getitem__) == max(range(v), key=lq.__getitem__)
        nll_r -= lp[targets[i]]
        nll_t -= lq[targets[i]]
    kls.sort()
    pos = 0.99 * (n - 1)  # linear interpolation between order statistics, as torch.quantile
    p99 = kls[int(pos)] + (kls[int(pos) + 1] - kls[int(pos)]) * (pos - int(pos))
    assert math.isclose(got["kl_mean"], sum(kls) / n, rel_tol=1e-9)
    assert math.isclose(got["kl_p99"], p99, rel_tol=1e-9)
    assert math.isclose(got["kl_max"], kls[-1], rel_tol=1e-9)
    assert got["top1_agreement"] == same / n
    assert math.isclose(got["ppl_source"], math.exp(nll_r / n), rel_tol=1e-9)
    assert math.isclose(got["ppl_quantized"], math.exp(nll_t / n), rel_tol=1e-9)
    assert got["tokens"] == n


def test_heldout_text_ships_with_the_package():
    from ernie_cli.quant.evaluate import heldout_text

    text = heldout_text()
    assert len(text) > 10_000
    assert "def " in text and "#include" in text  # code
    assert "子曰" in text and "道可道" in text  # classical Chinese
    assert "It is a truth universally acknowledged" in text  # prose
    assert os.path.getsize(ROOT / "ernie_cli" / "data" / "heldout.txt") < 64_000
