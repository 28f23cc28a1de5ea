"""Model references, Hub snapshots and resumable downloads.

huggingface_hub supplies the file list, the token, the endpoint and the cache layout, so a snapshot
fetched here is what `snapshot_download(repo, local_files_only=True)`, transformers and `hf` find.
The bytes are moved here instead: huggingface_hub 2.x writes each file to a throw-away
`<etag>.<uuid>.incomplete` and deletes it on failure, so a 43.7 GB download killed near the end
starts again from zero (huggingface/huggingface_hub#4196, #3648). We keep one `<etag>.incomplete` per
blob, continue it with an HTTP Range request, and only give it its final name once its size and
hash match what the Hub announced.

huggingface_hub is imported inside the functions: it costs a quarter of a second, which `ernie --help`
should not pay.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

from ernie_cli import __version__
from ernie_cli.console import info, stderr_is_tty, warn
from ernie_cli.errors import ErnieError, UsageError
from ernie_cli.weights.files import (
    INDEX_FILE,
    SINGLE_FILE,
    SPM_MODEL,
    TOKENIZER_FILES,
    TOKENIZER_JSON,
)

DEFAULT_MODEL = "baidu/ERNIE-4.5-21B-A3B-Base-PT"

# What the runtime reads. Only top-level files: subfolders hold other frameworks' copies (original/).
DEFAULT_PATTERNS = (
    "config.json",
    "generation_config.json",
    *TOKENIZER_FILES,
    "*.safetensors",
    INDEX_FILE,
    "LICENSE*",
    "README.md",
)

WORKERS = 4  # parallel files: one Hub connection rarely fills a fast link
CHUNK = 1 << 20
RETRIES = 5  # consecutive failed attempts without new bytes before a file is given up
LIST_ATTEMPTS = 3  # tries of the file listing: at the default 10 s timeout a silent Hub is given up within 40 s
BACKOFF = 0.5  # seconds before the first retry; grows with each failure in a row
_HEX40 = re.compile(r"[0-9a-f]{40}")  # a commit, or a git blob id


class _Cancelled(Exception):
    pass


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    etag: str  # the blob's name in the cache: the LFS sha256, else the git blob id (what the Hub's ETag says)
    sha256: str | None = None  # LFS files only


@dataclass
class Snapshot:
    repo_id: str
    commit: str | None
    path: Path  # the snapshot folder in the cache, or the --local-dir
    files: list[RemoteFile]
    present: set[str] = field(default_factory=set)  # files already in place before this run
    partial: dict[str, int] = field(default_factory=dict)  # bytes of unfinished files already on disk
    fetched: int = 0  # bytes transferred by this run

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def to_fetch(self) -> int:
        return sum(f.size - self.partial.get(f.path, 0) for f in self.files if f.path not in self.present)


# ---- public API ---------------------------------------------------------------------------------


def resolve_model(
    ref: str,
    *,
    offline: bool | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    download_if_missing: bool = True,
    quiet: bool = False,
) -> Path:
    """A local model directory for `ref`: the directory itself, or the repo's snapshot in the HF cache.

    A complete cached snapshot is used without asking the Hub, so a model downloaded once runs offline
    even without HF_HUB_OFFLINE; `ernie download` is the way to look for a newer commit.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if not _looks_like_repo_id(ref):
        raise ErnieError(
            f"no model directory or repo id {ref!r}: pass a folder holding an ERNIE checkpoint or a Hub id like {DEFAULT_MODEL}."
        )
    _check_revision(revision)
    from huggingface_hub import constants

    offline = constants.is_offline_mode() if offline is None else offline
    cache = _cache_dir(cache_dir)
    cached = _cached_snapshot(ref, revision, cache)
    if cached is not None and not check_snapshot(cached):
        return cached
    if offline or not download_if_missing:
        raise _not_available(ref, revision, cache, cached, offline)
    return download_snapshot(ref, revision=revision, cache_dir=cache, token=token, quiet=quiet).path


def download_snapshot(
    repo_id: str,
    *,
    revision: str | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    local_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    quiet: bool = False,
) -> Snapshot:
    """Fetch the runtime's files of `repo_id` (or those --include/--exclude pick) and return where they are.

    With dry_run nothing is written: the Snapshot lists the files, what is already present and what is left.
    In offline mode the cache (or local_dir) is checked instead, and an incomplete one is an error.
    """
    from huggingface_hub import constants

    _check_repo_id(repo_id)
    _check_revision(revision)
    cache = _cache_dir(cache_dir)
    if constants.is_offline_mode():
        snap = _offline_snapshot(repo_id, revision, cache, local_dir)
        info(f"offline: {repo_id} is complete in {snap.path}", quiet or dry_run)
        return snap

    endpoint = constants.ENDPOINT
    commit, listing = _list_files(repo_id, revision, token, endpoint)
    files = select_files(listing, include, exclude)
    if not files:
        raise ErnieError(
            f"no file of {repo_id} matches --include/--exclude (it has {len(listing)} files); "
            "check the globs, e.g. with --dry-run --include '*'."
        )
    target = _LocalTarget(Path(local_dir).expanduser(), commit) if local_dir else _CacheTarget(cache, repo_id, commit)
    snap = Snapshot(repo_id, commit, target.path.absolute(), files)
    if force:
        target.discard_partials(files)
    else:
        snap.present = {f.path for f in files if target.has(f)}
    snap.partial = {f.path: n for f in files if f.path not in snap.present and (n := target.partial_size(f))}
    if dry_run:
        return snap

    _check_free_space(target.path, snap.to_fetch, repo_id)
    target.prepare(revision or "main")
    fetcher = _Fetcher(repo_id, commit, endpoint, token, target, force)
    show_bar = stderr_is_tty() and not quiet
    todo = sorted((f for f in files if f.path not in snap.present), key=lambda f: f.size)
    if todo:
        resumed = f", resuming from {human_size(sum(snap.partial.values()))} on disk" if snap.partial else ""
        count = f"{len(todo)} of {len(files)} files"
        info(f"downloading {repo_id} @ {commit[:10]}: {count}, {human_size(snap.to_fetch)} to fetch{resumed}", quiet)
    started = time.monotonic()
    with _Progress(show_bar, snap) as progress:
        fetcher.progress = progress
        _run_all(fetcher, todo, snap)
    if todo:
        elapsed = time.monotonic() - started
        info(f"fetched {human_size(snap.fetched)} in {elapsed:.1f} s ({human_size(snap.fetched / max(elapsed, 1e-3))}/s)", quiet)
    else:
        info(f"{repo_id} @ {commit[:10]}: all {len(files)} files already present", quiet)
    _report_check(snap.path, quiet)
    return snap


def check_snapshot(path: str | Path) -> list[str]:
    """What keeps `path` from loading as an ERNIE 4.5 text model; empty when it is complete."""
    from ernie_cli.model.config import load_config

    path = Path(path)
    problems = []
    if not (path / "config.json").is_file():
        problems.append("missing config.json")
    else:
        try:
            load_config(path)
        except ErnieError as exc:
            problems.append(str(exc))
    index = path / INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            problems.append(f"{INDEX_FILE} is not readable ({type(exc).__name__}: {exc})")
        else:
            problems += [f"missing {shard} (named in {INDEX_FILE})" for shard in shards if not (path / shard).is_file()]
    elif not (path / SINGLE_FILE).is_file():
        problems.append(f"missing {INDEX_FILE} or {SINGLE_FILE}")
    if not any((path / name).is_file() for name in (TOKENIZER_JSON, SPM_MODEL)):
        problems.append("missing tokenizer.json or tokenizer.model")
    return problems


def select_files(files: list[RemoteFile], include: list[str] | None = None, exclude: list[str] | None = None) -> list[RemoteFile]:
    """`hf download` semantics: --include replaces the default set, --exclude always applies on top."""

    def matches(path: str, patterns) -> bool:
        return any(fnmatch.fnmatch(path, p + "*" if p.endswith("/") else p) for p in patterns)

    if include:
        chosen = [f for f in files if matches(f.path, include)]
    else:
        chosen = [f for f in files if "/" not in f.path and matches(f.path, DEFAULT_PATTERNS)]
    return [f for f in chosen if not matches(f.path, exclude or ())]


# ---- listing and error mapping ------------------------------------------------------------------


def _list_files(repo_id: str, revision: str | None, token: str | None, endpoint: str) -> tuple[str, list[RemoteFile]]:
    """The commit and its files, every name, commit and blob id checked before any of them reaches a path.

    huggingface_hub's own client has no timeout at all, so a Hub that accepts and never answers would
    hang here forever: each try gets HF_HUB_ETAG_TIMEOUT (connect and each read), and the GET, which
    changes nothing, is repeated after a drop, a timeout, a 429 or a 5xx.
    """
    from huggingface_hub import HfApi, constants

    timeout = constants.HF_HUB_ETAG_TIMEOUT
    api = HfApi(endpoint=endpoint, library_name="ernie-cli", library_version=__version__)
    for attempt in range(1, LIST_ATTEMPTS + 1):
        try:
            model = api.model_info(repo_id, revision=revision, files_metadata=True, token=token, timeout=timeout)
            break
        except Exception as exc:  # noqa: BLE001 - mapped to one line, re-raised when unknown
            if attempt == LIST_ATTEMPTS or not _transient(exc):
                raise _hub_error(exc, repo_id, revision, endpoint, token, tries=attempt, timeout=timeout) from None
            time.sleep(BACKOFF * 2 ** (attempt - 1))
    if not model.sha:
        raise ErnieError(f"{endpoint} gave no commit for {repo_id}: it does not look like a Hugging Face Hub; check HF_ENDPOINT.")
    _check_id(model.sha, 40, "commit id", repo_id, endpoint)
    files = []
    for s in model.siblings or []:
        if why := _unsafe_path(s.rfilename):
            raise ErnieError(
                f"{endpoint} lists {s.rfilename!r} in {repo_id}, a name that could write outside the download folder ({why}): "
                "nothing was written; check HF_ENDPOINT, or report the file to the repo owner."
            )
        lfs = s.lfs
        etag = lfs.sha256 if lfs else s.blob_id
        if etag is None or s.size is None:
            raise ErnieError(
                f"{endpoint} gave no size or blob id for {repo_id}/{s.rfilename}: "
                "it does not look like a Hugging Face Hub; check HF_ENDPOINT."
            )
        _check_id(etag, 64 if lfs else 40, "sha256" if lfs else "blob id", repo_id, endpoint, s.rfilename)
        files.append(RemoteFile(s.rfilename, lfs.size if lfs else s.size, etag, lfs.sha256 if lfs else None))
    return model.sha, files


def _unsafe_path(path: str) -> str | None:
    """Why `path` cannot be joined to a local folder safely; None when it can."""
    if "\0" in path:
        return "it holds a NUL byte"
    if "\\" in path:
        return "it holds a backslash, a separator on Windows"
    if path.startswith("/") or PureWindowsPath(path).drive:
        return "it is absolute"
    parts = path.split("/")
    if ".." in parts:
        return "it has a '..' component"
    if "" in parts or "." in parts:
        return "it has an empty or '.' component"
    return None


def _check_id(value: str, digits: int, what: str, repo_id: str, endpoint: str, path: str | None = None) -> None:
    """Commits and blob ids become folder and file names in the cache: only the Hub's hex form is let through."""
    if not re.fullmatch(f"[0-9a-f]{{{digits}}}", value):
        of = f" for {path}" if path else ""
        raise ErnieError(
            f"{endpoint} gave {what} {value!r}{of} in {repo_id} where a Hub gives {digits} hex digits, and it would "
            "name a file on disk: nothing was written; check HF_ENDPOINT."
        )


def _transient(exc: BaseException) -> bool:
    """A failure that asking again may cure: a drop, a timeout, a Hub that is busy or restarting."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        return status == 429 or (status is not None and status >= 500)
    return isinstance(exc, (httpx2.TransportError, ConnectionError, TimeoutError))


def _origin(exc: BaseException, endpoint: str) -> str:
    """The server that failed: the endpoint, or the file server it redirected to."""
    try:
        url = exc.request.url  # httpx errors carry the request that failed
        origin = f"{url.scheme}://{url.netloc.decode()}"
    except (AttributeError, RuntimeError):
        return endpoint
    return endpoint if origin == endpoint else f"{origin} (redirected from {endpoint})"


def _hub_error(
    exc: Exception,
    repo_id: str,
    revision: str | None,
    endpoint: str,
    token: str | None,
    what: str | None = None,
    *,
    tries: int = 1,
    timeout: float | None = None,
) -> Exception:
    """One line for each way the Hub can refuse; anything unforeseen is returned unchanged."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, RevisionNotFoundError):
        return ErnieError(f"revision {revision!r} not found in {repo_id}: pass --revision a branch, tag or commit that exists.")
    if isinstance(exc, GatedRepoError) or status == 403:
        if token or _stored_token():
            return ErnieError(
                f"{repo_id} is gated or private and your token has no access: "
                f"accept its terms on {endpoint}/{repo_id} or pass --token with one that does."
            )
        return ErnieError(f"{repo_id} is gated or private on {endpoint}: pass --token (or set HF_TOKEN) or run `hf auth login`.")
    if isinstance(exc, RepositoryNotFoundError):
        if status == 401:
            return ErnieError(
                f"{repo_id} was not found on {endpoint}, or it is gated or private: "
                "check the name, pass --token (or set HF_TOKEN) or run `hf auth login`."
            )
        return ErnieError(f"repository {repo_id} not found on {endpoint}: check the name.")
    if isinstance(exc, RemoteEntryNotFoundError):
        return ErnieError(
            f"{repo_id} lists {what} but {endpoint} cannot serve it (404): try again later, or report it to the repo owner."
        )
    times = f", {tries} tries" if tries > 1 else ""
    if isinstance(exc, HfHubHTTPError):
        return ErnieError(
            f"{_origin(exc, endpoint)} answered HTTP {status} for {repo_id}{'/' + what if what else ''}{times}: try again later."
        )
    if isinstance(exc, (httpx2.TransportError, ConnectionError, TimeoutError)):
        stalled = isinstance(exc, (httpx2.TimeoutException, TimeoutError))
        if what:
            slow = " (or raise HF_HUB_DOWNLOAD_TIMEOUT on a slow link)" if stalled else ""
            return ErnieError(
                f"lost the connection to {_origin(exc, endpoint)} while fetching {what} ({type(exc).__name__}{times}): "
                f"check the network{slow} and run the command again; it resumes where it stopped."
            )
        if stalled and timeout:
            return ErnieError(
                f"{endpoint} did not answer within {timeout:g} s ({type(exc).__name__}{times}): check the network and "
                "HF_ENDPOINT, raise HF_HUB_ETAG_TIMEOUT on a slow link, or set HF_HUB_OFFLINE=1 to use what is cached."
            )
        return ErnieError(
            f"cannot reach {endpoint} ({type(exc).__name__}{times}): check the network and HF_ENDPOINT, "
            "or set HF_HUB_OFFLINE=1 to use what is cached."
        )
    return exc


def _stored_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def _check_repo_id(repo_id: str) -> None:
    if not _looks_like_repo_id(repo_id):
        raise UsageError(f"{repo_id!r} is not a Hub repo id: use the form org/name, e.g. {DEFAULT_MODEL}.")


def _check_revision(revision: str | None) -> None:
    # a branch or tag becomes refs/<revision> in the cache; a slash is fine (refs/pr/1), climbing out is not
    if revision is not None and (why := _unsafe_path(revision)):
        raise UsageError(f"--revision {revision!r} cannot be a branch, tag or commit ({why}): pass one that exists.")


def _looks_like_repo_id(ref: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return ref.count("/") == 1


# ---- where files go -----------------------------------------------------------------------------


def _cache_dir(cache_dir: str | Path | None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE).expanduser()


def _storage(cache: Path, repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache / repo_folder_name(repo_id=repo_id, repo_type="model")


class _Target:
    path: Path

    def partial(self, f: RemoteFile) -> Path:
        raise NotImplementedError

    def partial_size(self, f: RemoteFile) -> int:
        return min(_size(self.partial(f)) or 0, f.size)

    def discard_partials(self, files: list[RemoteFile]) -> None:
        for f in files:
            self.partial(f).unlink(missing_ok=True)


class _CacheTarget(_Target):
    """The standard cache: blobs/<etag>, snapshots/<commit>/<path> -> ../../blobs/<etag>, refs/<revision>."""

    def __init__(self, cache: Path, repo_id: str, commit: str):
        self.cache, self.storage = cache, _storage(cache, repo_id)
        self.commit, self.path = commit, self.storage / "snapshots" / commit

    def blob(self, f: RemoteFile) -> Path:
        return self.storage / "blobs" / f.etag

    def partial(self, f: RemoteFile) -> Path:
        return self.storage / "blobs" / f"{f.etag}.incomplete"

    def lock(self, f: RemoteFile) -> Path:
        return self.cache / ".locks" / self.storage.name / f"{f.etag}.lock"

    def has(self, f: RemoteFile) -> bool:
        return (self.path / f.path).is_file() or _size(self.blob(f)) == f.size

    def prepare(self, revision: str) -> None:
        from huggingface_hub._local_folder import _create_cachedir_tag
        from huggingface_hub.file_download import (
            _cache_commit_hash_for_specific_revision,
        )

        (self.storage / "blobs").mkdir(parents=True, exist_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        _create_cachedir_tag(self.cache)
        _cache_commit_hash_for_specific_revision(str(self.storage), revision, self.commit)

    def reuse(self, f: RemoteFile) -> bool:
        """A blob another commit already brought only needs its link."""
        if not self.has(f):
            return False
        if not (self.path / f.path).is_file():
            self._link(f)
        return True

    def install(self, f: RemoteFile, partial: Path) -> None:
        os.replace(partial, self.blob(f))
        self._link(f)

    def _link(self, f: RemoteFile) -> None:
        from huggingface_hub.file_download import _create_symlink

        pointer = self.path / f.path
        pointer.parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(self.blob(f)), str(pointer), new_blob=True)  # copies where symlinks are not allowed


class _LocalTarget(_Target):
    """A plain folder, with huggingface_hub's `.cache/huggingface/download/` metadata so `hf download` agrees."""

    def __init__(self, local_dir: Path, commit: str):
        self.path, self.commit = local_dir, commit

    def partial(self, f: RemoteFile) -> Path:
        return self.path / ".cache" / "huggingface" / "download" / f"{f.path}.{f.etag}.incomplete"

    def lock(self, f: RemoteFile) -> Path:
        return self.partial(f).with_suffix(".lock")

    def has(self, f: RemoteFile) -> bool:
        from huggingface_hub._local_folder import read_download_metadata

        if _size(self.path / f.path) != f.size:
            return False
        meta = read_download_metadata(self.path, f.path)
        return meta is not None and meta.etag == f.etag

    def prepare(self, revision: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def reuse(self, f: RemoteFile) -> bool:
        return self.has(f)

    def install(self, f: RemoteFile, partial: Path) -> None:
        from huggingface_hub._local_folder import write_download_metadata

        final = self.path / f.path
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, final)
        write_download_metadata(self.path, f.path, commit_hash=self.commit, etag=f.etag)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _check_free_space(path: Path, needed: int, repo_id: str) -> None:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    if free < needed:
        raise ErnieError(
            f"not enough disk space for {repo_id} in {probe}: {human_size(needed)} to fetch, {human_size(free)} free; "
            "free some space or pass --cache-dir/--local-dir on a larger disk."
        )


# ---- offline ------------------------------------------------------------------------------------


def _cached_snapshot(repo_id: str, revision: str | None, cache: Path) -> Path | None:
    storage = _storage(cache, repo_id)
    rev = revision or "main"
    if _HEX40.fullmatch(rev):
        commit = rev
    else:
        try:
            commit = (storage / "refs" / rev).read_text().strip()
        except OSError:
            return None
    path = storage / "snapshots" / commit
    return path if path.is_dir() else None


def _not_available(repo_id: str, revision: str | None, cache: Path, cached: Path | None, offline: bool) -> ErnieError:
    why = "offline mode is on" if offline else "downloading is disabled here"
    rev = f" (revision {revision})" if revision else ""
    if cached is None:
        return ErnieError(
            f"{repo_id}{rev} is not in the cache {cache} and {why}: run `ernie download {repo_id}` with network access first."
        )
    problems = "; ".join(check_snapshot(cached))
    resume = " (it resumes where it stopped)" if any((_storage(cache, repo_id) / "blobs").glob("*.incomplete")) else ""
    return ErnieError(
        f"{repo_id}{rev} is incomplete in the cache ({cached}): {problems}; "
        f"{why}: run `ernie download {repo_id}` with network access{resume}."
    )


def _offline_snapshot(repo_id: str, revision: str | None, cache: Path, local_dir: str | Path | None) -> Snapshot:
    if local_dir:
        path = Path(local_dir).expanduser()
        problems = check_snapshot(path) if path.is_dir() else ["the folder does not exist"]
        if problems:
            raise ErnieError(
                f"{path} is not a complete download of {repo_id}: {'; '.join(problems)}; "
                "offline mode is on: unset HF_HUB_OFFLINE and run the command again."
            )
        commit = None
    else:
        path = _cached_snapshot(repo_id, revision, cache)
        if path is None or check_snapshot(path):
            raise _not_available(repo_id, revision, cache, path, offline=True)
        commit = path.name
    on_disk = [p for p in sorted(path.rglob("*")) if p.is_file() and ".cache" not in p.relative_to(path).parts]
    files = [RemoteFile(p.relative_to(path).as_posix(), p.stat().st_size, "") for p in on_disk]
    return Snapshot(repo_id, commit, path.absolute(), files, present={f.path for f in files})


def _report_check(path: Path, quiet: bool) -> None:
    problems = check_snapshot(path)
    if problems:
        warn(f"{path} is not a loadable ERNIE 4.5 model yet: {'; '.join(problems)}.")
    else:
        info("checked: config, tokenizer and every safetensors shard are present: a loadable ERNIE 4.5 model.", quiet)


# ---- transfer -----------------------------------------------------------------------------------


class _Fetcher:
    """Moves one file into place: resume its partial bytes, verify, rename. Runs in worker threads."""

    def __init__(self, repo_id: str, commit: str, endpoint: str, token: str | None, target, force: bool):
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers

        self.repo_id, self.commit, self.endpoint, self.token = repo_id, commit, endpoint, token
        self.target, self.force = target, force
        self.headers = build_hf_headers(token=token, library_name="ernie-cli", library_version=__version__)
        self.headers["Accept-Encoding"] = "identity"  # byte offsets must mean the same on both sides
        self.timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
        self.cancel = threading.Event()
        self.progress = _Progress(False, None)
        self.fetched_lock = threading.Lock()
        self.fetched = 0

    def __call__(self, f: RemoteFile) -> None:
        from huggingface_hub.utils import WeakFileLock

        if self.cancel.is_set():
            raise _Cancelled
        lock = self.target.lock(f)
        lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock):
            if not self.force and self.target.reuse(f):
                return
            partial = self.target.partial(f)
            partial.parent.mkdir(parents=True, exist_ok=True)
            try:
                for attempt in (1, 2):
                    size, digest = self._transfer(f, partial)
                    bad = _verify(f, size, digest)
                    if not bad:
                        break
                    partial.unlink(missing_ok=True)
                    if attempt == 2:
                        raise ErnieError(
                            f"{f.path} arrived corrupt twice ({bad}) and was discarded: "
                            f"a proxy or the mirror at {self.endpoint} is damaging it; try again later."
                        )
                    warn(f"{f.path} failed its check ({bad}); discarded, fetching it again.")
                self.target.install(f, partial)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                left = f.size - (_size(partial) or 0)
                raise ErnieError(
                    f"disk full while writing {f.path} into {partial.parent}: free at least {human_size(left)} "
                    "(more for the files after it) and run the command again; it resumes where it stopped."
                ) from None

    def _transfer(self, f: RemoteFile, partial: Path) -> tuple[int, str]:
        """Append the missing bytes to `partial`; return its final size and digest."""
        from urllib.parse import quote

        import httpx2
        from huggingface_hub import get_session
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.utils import hf_raise_for_status

        url = f"{self.endpoint}/{self.repo_id}/resolve/{self.commit}/{quote(f.path)}"
        hasher, have = _new_hasher(f), 0
        if partial.exists():
            with open(partial, "rb") as existing:  # rehash what is there, so a resumed file is verified whole
                while chunk := existing.read(CHUNK):
                    hasher.update(chunk)
                    have += len(chunk)
            if have > f.size:
                hasher, have = _new_hasher(f), 0
        task = self.progress.start(f, have)
        failures = 0
        try:
            while have < f.size:
                headers = dict(self.headers, **({"Range": f"bytes={have}-"} if have else {}))
                before = have
                try:
                    with get_session().stream("GET", url, headers=headers, timeout=self.timeout, follow_redirects=True) as r:
                        if r.status_code >= 400:
                            hf_raise_for_status(r)
                        if have and r.status_code != 206:  # the server ignored Range: start over
                            self.progress.advance(task, -have)
                            hasher, have = _new_hasher(f), 0
                        with open(partial, "ab" if have else "wb") as out:
                            for chunk in r.iter_bytes():  # as they arrive: a cut loses nothing
                                if self.cancel.is_set():
                                    raise _Cancelled
                                out.write(chunk)
                                out.flush()  # a killed process keeps every byte it received
                                hasher.update(chunk)
                                have += len(chunk)
                                self._count(task, len(chunk))
                            out.flush()
                            os.fsync(out.fileno())
                    if have < f.size:
                        raise httpx2.RemoteProtocolError("the connection ended before the file did")
                except (HfHubHTTPError, httpx2.TransportError, ConnectionError, TimeoutError) as exc:
                    failures = 0 if have > before else failures + 1
                    if not _transient(exc) or failures >= RETRIES or self.cancel.is_set():
                        raise _hub_error(exc, self.repo_id, None, self.endpoint, self.token, f.path, tries=failures) from None
                    self.cancel.wait(BACKOFF * failures)  # at once after a cut that brought bytes, then back off
            partial.touch()  # an empty file has no bytes to write
            return have, hasher.hexdigest()
        finally:
            self.progress.finish(task)

    def _count(self, task, n: int) -> None:
        with self.fetched_lock:
            self.fetched += n
        self.progress.advance(task, n)


def _new_hasher(f: RemoteFile):
    if f.sha256:
        return hashlib.sha256()
    hasher = hashlib.sha1()  # a regular file's blob id is git's: sha1 of "blob <size>\0" + content
    hasher.update(b"blob %d\0" % f.size)
    return hasher


def _verify(f: RemoteFile, size: int, digest: str) -> str | None:
    if size != f.size:
        return f"{size} bytes instead of {f.size}"
    expected = f.sha256 or (f.etag if _HEX40.fullmatch(f.etag) else None)
    if expected and digest != expected:
        return f"{'sha256' if f.sha256 else 'git blob id'} {digest[:12]}… instead of {expected[:12]}…"
    return None


def _run_all(fetcher: _Fetcher, todo: list[RemoteFile], snap: Snapshot) -> None:
    if not todo:
        return

    def job(f: RemoteFile) -> None:
        try:
            fetcher(f)
        except BaseException:
            fetcher.cancel.set()  # the other files stop at their next chunk, keeping what they have
            raise

    pool = ThreadPoolExecutor(max_workers=min(WORKERS, len(todo)), thread_name_prefix="ernie-download")
    futures = [pool.submit(job, f) for f in todo]
    try:
        wait(futures, return_when=FIRST_EXCEPTION)
        errors = [fut.exception() for fut in futures if fut.done() and fut.exception() is not None]
        if errors:
            raise next((e for e in errors if not isinstance(e, _Cancelled)), errors[0])
    except KeyboardInterrupt:
        fetcher.cancel.set()
        info(f"interrupted: partial files are kept; run the same command again to resume {snap.repo_id}.")
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        snap.fetched = fetcher.fetched


class _Progress:
    """On a terminal: one overall bar (bytes, rate, ETA) and a line per file in flight. Elsewhere: nothing."""

    def __init__(self, enabled: bool, snap: Snapshot | None):
        self.bar = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        from ernie_cli.console import err

        self.bar = Progress(
            TextColumn("{task.description}", justify="left"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=False,
        )
        done = sum(f.size for f in snap.files if f.path in snap.present) + sum(snap.partial.values())
        self.total = self.bar.add_task(snap.repo_id, total=snap.total_size, completed=done)

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()

    def start(self, f: RemoteFile, have: int):
        if self.bar is None:
            return None
        name = f.path if len(f.path) <= 40 else "…" + f.path[-39:]
        return self.bar.add_task(f"  {name}", total=f.size, completed=have)

    def advance(self, task, n: int) -> None:
        if self.bar:
            self.bar.advance(task, n)
            self.bar.advance(self.total, n)

    def finish(self, task) -> None:
        if self.bar:
            self.bar.remove_task(task)


def human_size(n: float) -> str:
    units = ("B", "kB", "MB", "GB", "TB")
    i = 0
    while abs(n) >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"
