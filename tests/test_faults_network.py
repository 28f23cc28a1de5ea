"""`ernie download` and `ernie complete -m REPO` when the network or the Hub misbehaves.

Each fault is staged on 127.0.0.1 by tests/fake_hub.py: a Hub that accepts and never answers, a closed port,
bodies cut short of their Content-Length, a process killed mid-file, and listings whose names, commit or blob
ids would put files outside the download folder. Timeouts are shortened through huggingface_hub's own knobs
(HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT) so each case ends in seconds.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_hub import closed_endpoint, git_blob_id, silent_endpoint
from huggingface_hub import constants
from test_download import (  # noqa: F401 - env and cli are fixtures
    REPO,
    ROOT,
    RUNTIME_FILES,
    SHARD1,
    cli,
    env,
    fake_repo_files,
    run_ernie,
    snapshot_files,
)

from ernie_cli.weights import hub as hubmod

FAST = {"HF_HUB_ETAG_TIMEOUT": "1", "HF_HUB_DOWNLOAD_TIMEOUT": "1"}


@pytest.fixture
def fast(monkeypatch):
    """One-second timeouts and near-instant backoff, as the environment knobs would set them."""
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    monkeypatch.setattr(hubmod, "BACKOFF", 0.01, raising=False)


def one_error_line(err: str, alone: bool = True) -> str:
    """The error line; `alone`: nothing else was said (the failure came before any download started)."""
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err
    assert len(lines) == 1 or not alone, err
    return lines[-1]


def lfs_server(env) -> str:
    """How errors name the fake Hub's CDN, where it redirects LFS files as the real one does."""
    return f"http://127.0.0.1:{env.hub.cdn.server_port} (redirected from {env.hub.endpoint})"


def tree(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*")} if path.exists() else set()


# ---- a Hub that accepts and never answers -------------------------------------------------------


@pytest.mark.parametrize("command", [["download", "acme/tiny"], ["complete", "-m", "acme/tiny", "Hello"]])
def test_stalled_hub_ends_with_one_line(env, command):
    with silent_endpoint() as silent:
        started = time.monotonic()
        r = run_ernie(env, *command, extra=dict(FAST, HF_ENDPOINT=silent.endpoint), timeout=60)
        elapsed = time.monotonic() - started
        line = one_error_line(r.stderr)
        assert r.returncode == 1 and r.stdout == ""
        assert line.startswith(f"error: {silent.endpoint} did not answer within 1 s"), line
        assert "HF_HUB_ETAG_TIMEOUT" in line and "HF_HUB_OFFLINE=1" in line
        assert silent.asked("/api/models/acme/tiny") == 3  # the listing is asked three times before giving up
    assert elapsed < 30
    assert not env.cache.exists()


@pytest.mark.skipif(
    not os.environ.get("ERNIE_SLOW_TESTS"), reason="waits the default timeouts out (about 35 s); set ERNIE_SLOW_TESTS=1"
)
def test_stalled_hub_with_default_timeouts_ends_within_a_minute(env, monkeypatch):
    for name in FAST:
        monkeypatch.delenv(name, raising=False)
    with silent_endpoint() as silent:
        started = time.monotonic()
        r = run_ernie(env, "download", "acme/tiny", extra={"HF_ENDPOINT": silent.endpoint}, timeout=60)
        elapsed = time.monotonic() - started
    assert r.returncode == 1 and "did not answer within 10 s" in one_error_line(r.stderr)
    assert elapsed < 60


@pytest.mark.parametrize("faults", [["stall"], [("cut", 40)], [503], [429, "stall"]], ids=["stall", "cut", "503", "429-stall"])
def test_listing_stalled_cut_or_busy_is_retried(env, cli, fast, faults):
    env.hub.api_faults += faults
    r = cli("download", REPO, "-q")
    assert r.code == 0, r.err
    assert env.hub.api_calls == len(faults) + 1
    assert snapshot_files(r.path) == RUNTIME_FILES


def test_file_stalled_mid_transfer_resumes_then_gives_up(env, cli, fast, monkeypatch):
    data = fake_repo_files()[SHARD1]
    env.hub.faults[SHARD1].append(("stall", 100_000))
    r = cli("download", REPO)
    assert r.code == 0, r.err
    assert [rng for name, rng in env.hub.gets if name == SHARD1] == [None, "bytes=100000-"]
    assert (r.path / SHARD1).read_bytes() == data

    monkeypatch.setattr(hubmod, "RETRIES", 2)
    env.hub.faults[SHARD1] += [("stall", 100_000), ("stall", 0), ("stall", 0)]
    started = time.monotonic()
    r = cli("download", REPO, "--force")
    assert time.monotonic() - started < 15
    assert r.code == 1
    line = one_error_line(r.err, alone=False)
    assert line.startswith(f"error: lost the connection to {lfs_server(env)} while fetching {SHARD1}"), line
    assert "HF_HUB_DOWNLOAD_TIMEOUT" in line and "resumes where it stopped" in line


# ---- nothing listening --------------------------------------------------------------------------


def test_refused_connection(env, cli, fast, monkeypatch):
    dead = closed_endpoint()
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    started = time.monotonic()
    r = cli("download", REPO)
    assert time.monotonic() - started < 10
    assert r.code == 1 and r.out == ""
    line = one_error_line(r.err)
    assert line.startswith(f"error: cannot reach {dead} (ConnectError"), line
    assert "HF_ENDPOINT" in line and "HF_HUB_OFFLINE=1" in line
    assert not env.cache.exists()


# ---- bodies shorter than their Content-Length -----------------------------------------------------


def test_truncated_file_never_takes_its_final_name(env, cli, fast, tmp_path):
    """Cut once after 100 kB, then at 0 bytes every time: the command fails, keeping the 100 kB to resume from."""
    data = fake_repo_files()[SHARD1]
    target = tmp_path / "local"
    env.hub.faults[SHARD1] += [("cut", 100_000)] + [("cut", 0)] * hubmod.RETRIES
    r = cli("download", REPO, "--local-dir", str(target))
    assert r.code == 1
    line = one_error_line(r.err, alone=False)
    assert line.startswith(f"error: lost the connection to {lfs_server(env)} while fetching {SHARD1}"), line
    assert "HF_HUB_DOWNLOAD_TIMEOUT" not in line  # not a timeout: no advice to raise it
    assert not (target / SHARD1).exists()
    partial = target / ".cache/huggingface/download" / f"{SHARD1}.{hashlib.sha256(data).hexdigest()}.incomplete"
    assert partial.stat().st_size == 100_000

    r = cli("download", REPO, "--local-dir", str(target))
    assert r.code == 0, r.err
    assert (target / SHARD1).read_bytes() == data
    assert env.hub.served[SHARD1] == len(data)  # no byte sent twice
    assert [rng for name, rng in env.hub.gets if name == SHARD1][-1] == "bytes=100000-"


def test_file_answered_503_or_429_is_retried(env, cli, fast):
    env.hub.faults[SHARD1] += [503, 429]
    r = cli("download", REPO)
    assert r.code == 0, r.err
    assert [name for name, _ in env.hub.gets].count(SHARD1) == 3
    assert (r.path / SHARD1).read_bytes() == fake_repo_files()[SHARD1]


# ---- killed mid-file ----------------------------------------------------------------------------


def test_killed_download_into_local_dir_resumes_and_verifies(env, tmp_path):
    data = fake_repo_files()[SHARD1]
    target = tmp_path / "local"
    partial = target / ".cache/huggingface/download" / f"{SHARD1}.{hashlib.sha256(data).hexdigest()}.incomplete"
    env.hub.faults[SHARD1].append(("stall", 250_000))
    proc = subprocess.Popen([sys.executable, "-m", "ernie_cli", "download", REPO, "--local-dir", str(target)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while (partial.stat().st_size if partial.exists() else 0) < 250_000 or snapshot_files(target) != RUNTIME_FILES - {SHARD1}:
        assert proc.poll() is None and time.monotonic() < deadline, "the download never reached the stall"
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no handler runs, nothing is tidied up
    proc.communicate()
    assert not (target / SHARD1).exists()

    env.hub.release.set()
    r = run_ernie(env, "download", REPO, "--local-dir", str(target))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(target.absolute())
    assert (target / SHARD1).read_bytes() == data
    assert env.hub.served[SHARD1] == len(data)
    assert [rng for name, rng in env.hub.gets if name == SHARD1] == [None, "bytes=250000-"]
    assert "loadable ERNIE 4.5 model" in r.stderr
    assert not partial.exists()


# ---- listings that point outside the download folder -----------------------------------------------


ESCAPED = b"outside\n"
UNSAFE_NAMES = ["../../escaped.txt", "sub/../../../escaped.txt", "/tmp/escaped.txt", "dir\\..\\escaped.txt", "nul\0.txt"]


def _list_extra_file(env, name: str) -> None:
    sibling = {"rfilename": name, "size": len(ESCAPED), "blobId": git_blob_id(ESCAPED)}
    env.hub.tamper = lambda info: info["siblings"].append(sibling)
    # what a client asks for once it has collapsed the dots of /{repo}/resolve/{commit}/../../escaped.txt
    env.hub.raw[f"/{REPO}/escaped.txt"] = ESCAPED


@pytest.mark.parametrize("local", [False, True], ids=["cache", "local-dir"])
@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_unsafe_listed_path_is_refused_before_writing(env, cli, tmp_path, name, local):
    _list_extra_file(env, name)
    before = tree(tmp_path)
    target = ["--local-dir", str(tmp_path / "local")] if local else []
    r = cli("download", REPO, "--include", "*", *target)
    assert r.code == 1 and r.out == ""
    line = one_error_line(r.err)
    assert line.startswith(f"error: {env.hub.endpoint} lists {name!r} in {REPO}"), line
    assert tree(tmp_path) == before  # not a lock, not a folder


def _tamper_sibling(path: str, **changes):
    def tamper(info: dict) -> None:
        for sibling in info["siblings"]:
            if sibling["rfilename"] == path:
                for key, value in changes.items():
                    if key == "sha256":
                        sibling["lfs"]["sha256"] = value
                    else:
                        sibling[key] = value

    return tamper


@pytest.mark.parametrize(
    "tamper, what",
    [
        (lambda info: info.update(sha="../../evil"), "commit id '../../evil'"),
        (lambda info: info.update(sha="a" * 39 + "/"), f"commit id '{'a' * 39}/'"),
        (_tamper_sibling(SHARD1, sha256="../../../evil"), f"sha256 '../../../evil' for {SHARD1}"),
        (_tamper_sibling("config.json", blobId="../../evil"), "blob id '../../evil' for config.json"),
        (_tamper_sibling("config.json", blobId="x\0x"), "blob id 'x\\x00x' for config.json"),
    ],
    ids=["commit-dots", "commit-slash", "sha256-dots", "blob-dots", "blob-nul"],
)
@pytest.mark.parametrize("local", [False, True], ids=["cache", "local-dir"])
def test_unsafe_commit_or_etag_is_refused_before_writing(env, cli, tmp_path, tamper, what, local):
    env.hub.tamper = tamper
    before = tree(tmp_path)
    target = ["--local-dir", str(tmp_path / "local")] if local else []
    r = cli("download", REPO, *target)
    assert r.code == 1 and r.out == ""
    line = one_error_line(r.err)
    assert line.startswith(f"error: {env.hub.endpoint} gave {what}"), line
    assert tree(tmp_path) == before


def test_unsafe_revision_is_a_usage_error(env, cli, tmp_path):
    before = tree(tmp_path)
    r = cli("download", REPO, "--revision", "../../x")
    assert r.code == 2
    assert one_error_line(r.err).startswith("error: --revision '../../x' ")
    assert tree(tmp_path) == before
    assert env.hub.api_calls == 0
