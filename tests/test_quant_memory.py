"""Peak memory of `ernie quantize` and of loading its output, each measured in a fresh process.

The source is a generated bf16 checkpoint of 382 MB in 4 shards (the 21B model's layout, smaller
sizes). What the quantizer holds beyond the interpreter and torch: per worker thread (one per core)
one block of at most 8 M weights in float32 (32 MB) with its bf16 read buffer and cache-sized
temporaries, plus the one parameter being assembled in its quantized form (here the 32.8 MB int8
embedding). That is about 150 MB whatever the model size; the bound of 256 MB over the baseline
keeps a margin for the allocator and stays well under the source's size, which a run that held
the model would exceed.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic import moe_config, write_synthetic_checkpoint

ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024

CHILD = """
import json, sys
import torch
from ernie_cli.quant.convert import quantize_checkpoint
from ernie_cli.quant.spec import QuantSpec
from ernie_cli.weights.loader import load_model
def hwm():  # this process's own peak RSS; ru_maxrss would include the parent's at fork time
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
base = hwm()
mode, src, out = sys.argv[1:4]
if mode == "quantize":
    info = quantize_checkpoint(src, out, QuantSpec.make(sys.argv[4]), shard_bytes=64 << 20)
    extra = {"seconds": info["seconds"], "source_bytes": info["source_bytes"]}
else:
    model = load_model(src, "cpu", torch.bfloat16, quantize=sys.argv[4] if mode == "load-quantizing" else None)
    extra = {}
peak = hwm()
print(json.dumps(dict(base=base, peak=peak, **extra)))
"""


def _measure(*args) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "src"
    write_synthetic_checkpoint(path, moe_config(num_hidden_layers=6), shard_bytes=100 * MB)
    return path


def _source_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantize_peak_memory_is_bounded(big_source, tmp_path, fmt):
    size = _source_bytes(big_source)
    assert size > 350 * MB
    out = tmp_path / "out"
    got = _measure("quantize", big_source, out, fmt)
    over = got["peak"] - got["base"]
    assert over < 256 * MB, f"quantizing held {over / MB:.0f} MB over the baseline"
    assert over < 0.7 * size
    assert len(list(out.glob("model-*.safetensors"))) > 1  # written in several shards
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format"] == fmt


def test_loading_costs_about_the_size_on_disk(big_source, tmp_path):
    out = tmp_path / "q4"
    _measure("quantize", big_source, out, "int4")
    disk = _source_bytes(out)
    loaded = _measure("load", out, None, "-")
    # the weights themselves plus per-tensor read buffers: near the size on disk, never the bf16 model
    assert loaded["peak"] - loaded["base"] < disk + 96 * MB
    online = _measure("load-quantizing", big_source, None, "int4")
    assert online["peak"] - online["base"] < disk + 256 * MB  # the quantized model plus the quantizer's blocks


def test_float_load_holds_the_model_once(big_source):
    """The float loader (issue 2): parameters are allocated once and filled tensor by tensor."""
    size = _source_bytes(big_source)
    got = _measure("load", big_source, None, "-")
    over = got["peak"] - got["base"]
    assert over < size + 96 * MB, f"loading a {size / MB:.0f} MB checkpoint held {over / MB:.0f} MB"
    assert over > 0.9 * size  # and the weights really are in memory
