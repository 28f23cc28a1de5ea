"""Where the caches go: XDG_CACHE_HOME moves all of them; a missing HOME falls back to a temp folder.

Each case runs in a fresh interpreter, since the cache root and the native build are decided once
per process."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ernie_cli.kernels.cpu import native

CACHE_VARIABLES = ("XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "ERNIE_NATIVE")

# Prints the native kernel cache, the tokenizer cache and the compilers' caches as ernie sets them,
# and builds the native kernels where this machine can.
PROBE = """
import os
from ernie_cli.runtime.decoder import _compile_settings
from ernie_cli.kernels.cpu import native
from ernie_cli.text.tokenizer import default_cache_dir
_compile_settings()
print(native._cache_dir())
print(default_cache_dir())
print(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
print(os.environ.get("TRITON_CACHE_DIR"))
print(native.kernels() is not None)
"""


def _native_unavailable() -> str | None:
    if platform.machine() not in ("x86_64", "AMD64"):
        return "the native kernels are x86 only"
    flags, _ = native._cpu_flags()
    if native.feature_set(flags) is None:
        return "the native kernels need a CPU with AVX2 and FMA (or AVX-512 VNNI)"
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        return "the native kernels need a C compiler"
    return None


def _probe(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    base["TMPDIR"] = str(tmp_path / "tmp")  # the fallback lands inside the test's own folder
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**base, **env}, timeout=300)


def test_xdg_cache_home_holds_every_cache(tmp_path):
    proc = _probe(tmp_path, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert proc.returncode == 0, proc.stderr
    kernels, tokenizer, inductor, triton, built = proc.stdout.split("\n")[:5]
    root = tmp_path / "xdg" / "ernie"
    assert Path(kernels) == root / "kernels"
    assert Path(tokenizer) == root
    assert Path(inductor) == root / "inductor"
    assert Path(triton) == root / "triton"
    assert "warning" not in proc.stderr
    reason = _native_unavailable()
    if reason:
        pytest.skip(f"{reason}: the cache paths were checked, the build was not")
    assert built == "True", proc.stderr
    assert [p.name for p in (root / "kernels").glob("*.so")], "no kernel library under XDG_CACHE_HOME"


def test_user_compiler_caches_are_kept(tmp_path):
    proc = _probe(tmp_path, XDG_CACHE_HOME=str(tmp_path / "xdg"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "i"),
                  TRITON_CACHE_DIR=str(tmp_path / "t"), ERNIE_NATIVE="0")
    assert proc.returncode == 0, proc.stderr
    _, _, inductor, triton, _ = proc.stdout.split("\n")[:5]
    assert (inductor, triton) == (str(tmp_path / "i"), str(tmp_path / "t"))


def test_missing_home_falls_back_to_temp_with_one_warning(tmp_path):
    # A missing HOME whose parent is writable: as root, /nonexistent itself would be creatable too.
    home = tmp_path / "nonexistent"
    proc = _probe(tmp_path, HOME=str(home))
    assert proc.returncode == 0, proc.stderr
    assert not home.exists(), "a cache was created under the missing HOME"
    paths = [Path(p) for p in proc.stdout.split("\n")[:4]]
    fallback = tmp_path / "tmp" / f"ernie-cache-{os.getuid()}"
    assert paths == [fallback / "kernels", fallback, fallback / "inductor", fallback / "triton"]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(home) in warnings[0], proc.stderr
    if proc.stdout.split("\n")[4] == "True":
        assert list((fallback / "kernels").glob("*.so"))
