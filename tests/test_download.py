"""`ernie download` and ernie_cli.weights.hub against a local fake Hub (tests/fake_hub.py), with the real huggingface_hub.

Most cases call the CLI in-process with huggingface_hub's constants patched (they are read at import); the
ones about environment variables, a killed process and a terminal run `python -m ernie_cli` in a subprocess.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from fake_hub import FakeHub  # tests/ is on sys.path (conftest.py)
from huggingface_hub import (
    constants,
    hf_hub_download,
    snapshot_download,
    try_to_load_from_cache,
)

from ernie_cli.cli import main
from ernie_cli.errors import ErnieError
from ernie_cli.weights import hub as hubmod

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "ernie-tokenizer"
REPO = "baidu/ERNIE-tiny"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"

CONFIG = {  # the shape of ERNIE-4.5-0.3B-Base-PT's original config.json
    "architectures": ["Ernie4_5_ForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 4096, "model_type": "ernie4_5",
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 2, "pad_token_id": 0,
    "rms_norm_eps": 1e-05, "use_cache": False, "vocab_size": 1024, "rope_theta": 500000, "use_bias": False,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}
RUNTIME_FILES = {
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
    SHARD1, SHARD2, "model.safetensors.index.json",
}


def _bytes(n: int, seed: int) -> bytes:
    out, block = bytearray(), hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:n])


def fake_repo_files(seed: int = 0) -> dict[str, bytes]:
    index = {"metadata": {"total_size": 700_000}, "weight_map": {"a.weight": SHARD1, "b.weight": SHARD2}}
    return {
        "config.json": json.dumps(CONFIG).encode(),
        "generation_config.json": b'{"bos_token_id": 1, "eos_token_id": 2}',
        "tokenizer.json": b'{"version": "1.0", "model": {}}',
        "tokenizer_config.json": b'{"tokenizer_class": "LlamaTokenizer"}',
        "README.md": b"# ERNIE tiny\n",
        SHARD1: _bytes(400_000, seed + 1),
        SHARD2: _bytes(300_000, seed + 2),
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model.pdparams": _bytes(50_000, seed + 3),
        "pytorch_model.bin": _bytes(50_000, seed + 4),
        "original/x.bin": _bytes(10_000, seed + 5),
        "modeling_ernie4_5.py": b"# remote code\n",
    }


@dataclass
class Env:
    hub: FakeHub
    home: Path
    cache: Path
    vars: dict[str, str]

    def storage(self, repo: str = REPO) -> Path:
        return self.cache / ("models--" + repo.replace("/", "--"))

    def blob(self, name: str, repo: str = REPO, seed: int = 0) -> Path:
        return self.storage(repo) / "blobs" / hashlib.sha256(fake_repo_files(seed)[name]).hexdigest()


@pytest.fixture
def env(tmp_path, monkeypatch):
    with FakeHub() as hub:
        hub.add(REPO, fake_repo_files())
        home, cache = tmp_path / "hf-home", tmp_path / "hf-cache"
        variables = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home), "HF_HUB_CACHE": str(cache)}
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        # huggingface_hub read the variables at import: patch what it read as well
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield Env(hub, home, cache, variables)


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def path(self) -> Path:
        return Path(self.out.strip().splitlines()[-1])


@pytest.fixture
def cli(env, capsys):
    """`ernie ARGS` in this process."""

    def run(*args: str) -> Result:
        with pytest.raises(SystemExit) as exc:
            main(list(args))
        out, err = capsys.readouterr()
        return Result(exc.value.code, out, err)

    return run


def run_ernie(env: Env, *args: str, extra: dict | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ernie_cli", *args], cwd=ROOT, env=dict(os.environ, **(extra or {})),
        capture_output=True, text=True, timeout=timeout, **kw,
    )


def snapshot_files(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts}


# ---- downloads ----------------------------------------------------------------------------------


def test_download_into_cache_is_found_by_huggingface_hub(env, cli):
    r = cli("download", REPO)
    assert r.code == 0, r.err
    commit = env.hub.repos[REPO].refs["main"]
    assert r.path == env.storage() / "snapshots" / commit
    assert r.out.strip() == str(r.path)  # stdout holds nothing else
    assert snapshot_files(r.path) == RUNTIME_FILES  # no pdparams, .bin, original/ or remote code
    assert (env.storage() / "refs" / "main").read_text() == commit
    assert os.path.islink(r.path / SHARD1) and (r.path / SHARD1).read_bytes() == fake_repo_files()[SHARD1]
    assert "loadable ERNIE 4.5 model" in r.err
    assert not list(env.storage().glob("blobs/*.incomplete"))

    assert Path(snapshot_download(REPO, local_files_only=True)) == r.path
    assert try_to_load_from_cache(REPO, "config.json") == str(r.path / "config.json")
    # Blobs are named as huggingface_hub names them (sha256 for LFS, git blob id otherwise): with a link
    # removed, hf_hub_download relinks the existing blobs and fetches nothing.
    (r.path / SHARD1).unlink()
    (r.path / "config.json").unlink()
    env.hub.served.clear()
    assert hf_hub_download(REPO, SHARD1) == str(r.path / SHARD1)
    assert hf_hub_download(REPO, "config.json") == str(r.path / "config.json")
    assert sum(env.hub.served.values()) == 0

    env.hub.served.clear()
    again = cli("download", REPO, "--quiet")
    assert again.code == 0 and again.out == f"{r.path}\n" and again.err == ""
    assert sum(env.hub.served.values()) == 0  # present files are not fetched again


def test_download_into_local_dir(env, cli, tmp_path):
    target = tmp_path / "models" / "tiny"
    r = cli("download", REPO, "--local-dir", str(target))
    assert r.code == 0, r.err
    assert r.path == target.absolute()
    assert snapshot_files(target) == RUNTIME_FILES
    assert not (target / SHARD1).is_symlink()
    assert not env.cache.exists()
    meta = (target / ".cache/huggingface/download" / f"{SHARD1}.metadata").read_text().split()
    assert meta[:2] == [env.hub.repos[REPO].refs["main"], hashlib.sha256(fake_repo_files()[SHARD1]).hexdigest()]

    env.hub.served.clear()
    assert cli("download", REPO, "--local-dir", str(target)).code == 0
    # hf_hub_download agrees the local copy is current
    assert hf_hub_download(REPO, SHARD2, local_dir=target) == str(target / SHARD2)
    assert sum(env.hub.served.values()) == 0


def test_include_exclude_and_dry_run(env, cli, tmp_path):
    r = cli("download", REPO, "--dry-run")
    assert r.code == 0, r.err
    lines = r.out.strip().splitlines()
    assert {line.split()[-1] for line in lines[:-1]} == RUNTIME_FILES
    assert lines[-1] == "8 files, 700.7 kB in all, 700.7 kB to fetch"
    assert cli("download", REPO, "--dry-run", "--local-dir", str(tmp_path / "dry")).code == 0
    assert not env.cache.exists() and not (tmp_path / "dry").exists() and sum(env.hub.served.values()) == 0

    r = cli("download", REPO, "--include", "*.json", "--exclude", "generation_config.json")
    assert r.code == 0, r.err
    assert snapshot_files(r.path) == {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"}
    assert f"missing {SHARD1}" in r.err  # fetched, but not a loadable model: said as a warning

    r = cli("download", REPO, "--include", "original/", "--include", "*.pdparams")
    assert r.code == 0, r.err
    assert {"original/x.bin", "model.pdparams"} <= snapshot_files(r.path)

    r = cli("download", REPO, "--include", "*.gguf")
    assert r.code == 1 and "no file of baidu/ERNIE-tiny matches" in r.err


def test_revision(env, cli):
    v1_files = fake_repo_files(seed=10)
    v1_files["config.json"] = json.dumps(dict(CONFIG, num_hidden_layers=3)).encode()
    v1 = env.hub.add(REPO, v1_files, branch="v1")
    r = cli("download", REPO, "--revision", "v1")
    assert r.code == 0, r.err
    assert r.path.name == v1 and (env.storage() / "refs" / "v1").read_text() == v1
    assert json.loads((r.path / "config.json").read_text())["num_hidden_layers"] == 3
    assert (r.path / SHARD1).read_bytes() == v1_files[SHARD1]

    main_commit = env.hub.repos[REPO].refs["main"]
    r = cli("download", REPO, "--revision", main_commit, "-q")
    assert r.code == 0 and r.path.name == main_commit
    assert hubmod.resolve_model(REPO, revision="v1", offline=True).name == v1

    r = cli("download", REPO, "--revision", "nope")
    assert r.code == 1
    assert r.err.strip() == (
        "error: revision 'nope' not found in baidu/ERNIE-tiny: pass --revision a branch, tag or commit that exists."
    )


def test_cut_transfer_resumes_with_range(env, cli):
    env.hub.faults[SHARD1].append(("cut", 150_000))
    r = cli("download", REPO)
    assert r.code == 0, r.err
    size = len(fake_repo_files()[SHARD1])
    assert env.hub.served[SHARD1] == size  # the first 150 000 bytes were not sent twice
    assert [rng for name, rng in env.hub.gets if name == SHARD1] == [None, "bytes=150000-"]
    assert (r.path / SHARD1).read_bytes() == fake_repo_files()[SHARD1]


def test_killed_download_resumes_and_offline_lists_missing(env):
    """A process killed mid-file leaves only `<blob>.incomplete`; the rerun fetches just the rest."""
    env.hub.faults[SHARD1].append(("stall", 200_000))
    partial = env.blob(SHARD1).with_suffix(".incomplete")
    proc = subprocess.Popen([sys.executable, "-m", "ernie_cli", "download", REPO], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    snapshot = env.storage() / "snapshots" / env.hub.repos[REPO].refs["main"]
    deadline = time.monotonic() + 30
    while (partial.stat().st_size if partial.exists() else 0) < 200_000 or snapshot_files(snapshot) != RUNTIME_FILES - {SHARD1}:
        assert proc.poll() is None and time.monotonic() < deadline, "the download never reached the stall"
        time.sleep(0.02)
    proc.kill()
    proc.communicate()
    assert not env.blob(SHARD1).exists() and not (snapshot / SHARD1).exists()
    assert env.hub.served[SHARD1] == 200_000

    offline = run_ernie(env, "download", REPO, extra={"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1
    assert f"missing {SHARD1}" in offline.stderr and "incomplete in the cache" in offline.stderr, offline.stderr
    assert len(offline.stderr.strip().splitlines()) == 1

    env.hub.release.set()
    r = run_ernie(env, "download", REPO)
    assert r.returncode == 0, r.stderr
    assert env.hub.served[SHARD1] == len(fake_repo_files()[SHARD1])
    assert [rng for name, rng in env.hub.gets if name == SHARD1] == [None, "bytes=200000-"]
    assert (snapshot / SHARD1).read_bytes() == fake_repo_files()[SHARD1]
    assert r.stdout.strip().splitlines()[-1] == str(snapshot)


def test_corrupt_transfer_is_discarded_and_fetched_again(env, cli):
    data = fake_repo_files()[SHARD2]
    env.hub.faults[SHARD2].append("corrupt")
    r = cli("download", REPO)
    assert r.code == 0, r.err
    assert "failed its check" in r.err and env.hub.served[SHARD2] == 2 * len(data)
    assert (r.path / SHARD2).read_bytes() == data


def test_corrupt_partial_on_disk_is_never_used(env, cli):
    data = fake_repo_files()[SHARD2]
    partial = env.blob(SHARD2).with_suffix(".incomplete")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 100_000)  # the right length of a wrong prefix
    r = cli("download", REPO)
    assert r.code == 0, r.err
    assert env.hub.served[SHARD2] == (len(data) - 100_000) + len(data)
    assert (r.path / SHARD2).read_bytes() == data


def test_corrupt_twice_fails_and_leaves_nothing(env, cli):
    env.hub.faults[SHARD2] += ["corrupt", "corrupt"]
    r = cli("download", REPO)
    assert r.code == 1
    assert r.err.strip().splitlines()[-1].startswith(f"error: {SHARD2} arrived corrupt twice")
    assert not env.blob(SHARD2).exists() and not env.blob(SHARD2).with_suffix(".incomplete").exists()
    assert not list(env.storage().glob(f"snapshots/*/{SHARD2}"))


def test_gated_repo_needs_a_token(env, cli, monkeypatch):
    env.hub.add("baidu/gated", fake_repo_files(), token="hf_secret")
    r = cli("download", "baidu/gated")
    assert r.code == 1
    assert r.err.strip() == (
        f"error: baidu/gated is gated or private on {env.hub.endpoint}: pass --token (or set HF_TOKEN) or run `hf auth login`."
    )
    r = cli("download", "baidu/gated", "--token", "hf_wrong")
    assert r.code == 1 and "your token has no access" in r.err
    assert cli("download", "baidu/gated", "--token", "hf_secret", "-q").code == 0
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert cli("download", "baidu/gated", "--force", "-q").code == 0


def test_unknown_repo_and_unreachable_hub(env, cli, monkeypatch):
    r = cli("download", "baidu/nope")
    assert r.code == 1
    assert r.err.strip() == f"error: repository baidu/nope not found on {env.hub.endpoint}: check the name."
    assert cli("download", "not a repo").code == 2

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    r = cli("download", REPO)
    assert r.code == 1 and r.err.startswith(f"error: cannot reach {dead}") and "HF_HUB_OFFLINE=1" in r.err, r.err


class _FullDisk:
    """A file that takes 100 000 bytes and then fails the way a full disk does."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, chunk):
        room = 100_000 - self.f.tell()
        if len(chunk) > room:
            self.f.write(chunk[:room])
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(chunk)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_disk_full(env, cli, monkeypatch):
    with monkeypatch.context() as m:
        real_usage = shutil.disk_usage
        m.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1000))
        r = cli("download", REPO)
    assert r.code == 1 and r.err.startswith("error: not enough disk space for baidu/ERNIE-tiny")

    def full_disk_open(path, mode="r", *args, **kw):
        f = open(path, mode, *args, **kw)
        return _FullDisk(f) if "w" in mode or "a" in mode else f

    with monkeypatch.context() as m:
        m.setattr(hubmod, "open", full_disk_open, raising=False)
        m.setattr(hubmod, "WORKERS", 1)
        r = cli("download", REPO)
    assert r.code == 1 and r.err.strip().splitlines()[-1].startswith(f"error: disk full while writing {SHARD2}"), r.err
    assert "resumes where it stopped" in r.err
    # nothing half-written under a name the loader would take: only the *.incomplete
    assert not any(p.name in (SHARD1, SHARD2) for p in env.storage().rglob("*"))
    assert [p.stat().st_size for p in env.storage().glob("blobs/*.incomplete")] == [100_000]

    env.hub.served.clear()
    r = cli("download", REPO)
    assert r.code == 0, r.err
    assert env.hub.served[SHARD2] == len(fake_repo_files()[SHARD2]) - 100_000


def test_force_fetches_again(env, cli):
    assert cli("download", REPO, "-q").code == 0
    env.hub.served.clear()
    r = cli("download", REPO, "--force", "-q")
    assert r.code == 0
    assert sum(env.hub.served.values()) == sum(len(fake_repo_files()[f]) for f in RUNTIME_FILES)
    assert cli("download", REPO, "--local-dir", "x", "--cache-dir", "y").code == 2


# ---- offline and resolve_model ------------------------------------------------------------------


def test_offline_uses_a_complete_cache_without_network(env, cli):
    downloaded = cli("download", REPO, "-q").path
    env.hub.stop()  # nothing may be asked of the Hub from here on
    r = run_ernie(env, "download", REPO, extra={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(downloaded)
    assert hubmod.resolve_model(REPO, offline=True) == downloaded
    assert hubmod.resolve_model(REPO) == downloaded  # complete in the cache: no request either

    r = run_ernie(env, "download", "baidu/other", extra={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1
    assert "baidu/other is not in the cache" in r.stderr and "ernie download baidu/other" in r.stderr


def test_resolve_model(env, tmp_path):
    assert hubmod.resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(ErnieError, match="no model directory or repo id 'nonsense/../x'"):
        hubmod.resolve_model("nonsense/../x")
    with pytest.raises(ErnieError, match="not in the cache"):
        hubmod.resolve_model(REPO, download_if_missing=False)
    path = hubmod.resolve_model(REPO, quiet=True)  # not cached: downloaded
    assert path == env.storage() / "snapshots" / env.hub.repos[REPO].refs["main"]
    assert hubmod.check_snapshot(path) == []
    (path / SHARD2).unlink()
    assert hubmod.check_snapshot(path) == [f"missing {SHARD2} (named in model.safetensors.index.json)"]
    with pytest.raises(ErnieError, match=f"incomplete in the cache.*missing {SHARD2}"):
        hubmod.resolve_model(REPO, offline=True)


# ---- terminal and the runtime -------------------------------------------------------------------


def test_progress_bar_on_a_terminal(env):
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ernie_cli", "download", REPO], cwd=ROOT, env=dict(os.environ, COLUMNS="120"),
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    out, _ = proc.communicate(timeout=60)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert proc.returncode == 0, shown
    assert REPO.encode() in shown and b"/700.7 kB" in shown.replace(b"\x1b", b"")
    assert out.decode().strip().splitlines()[-1].endswith(env.hub.repos[REPO].refs["main"])


def test_complete_runs_from_the_download(env, cli, tmp_path):
    """A real tiny checkpoint, served, downloaded, then resolved and run with no network."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the tokenizer files come from there")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Ernie4_5Config(
        vocab_size=101312, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model_dir = tmp_path / "built"
    transformers.Ernie4_5ForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir, max_shard_size="8MB")
    files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        files[name] = (SHARED / name).read_bytes()
    env.hub.add("baidu/ERNIE-real-tiny", files)

    assert cli("download", "baidu/ERNIE-real-tiny", "-q").code == 0
    env.hub.stop()
    path = hubmod.resolve_model("baidu/ERNIE-real-tiny", offline=True)
    assert hubmod.check_snapshot(path) == []

    if (ROOT / "ernie_cli" / "loader.py").exists():
        from ernie_cli.weights.loader import load_model

        assert load_model(path, device="cpu", dtype=torch.float32) is not None
    if not (ROOT / "ernie_cli" / "commands" / "complete.py").exists():
        pytest.skip("ernie complete is not written yet")
    r = run_ernie(env, "complete", "-m", "baidu/ERNIE-real-tiny", "--offline", "-n", "4", "-t", "0", "Hello",
                  extra={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
