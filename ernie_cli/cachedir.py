"""Where ernie keeps what it builds: tokenizers converted from SentencePiece, native CPU kernels,
compiled decode graphs and Triton kernels.

One root for all of them, so one variable moves them all: $XDG_CACHE_HOME/ernie, else
~/.cache/ernie. A HOME that is missing or not writable (services, containers run as another user)
gets a private folder in the temp directory and one warning, rather than a failure or a
~/.cache created somewhere it should not be.
"""

from __future__ import annotations

import os
import stat
import tempfile
from functools import lru_cache
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache root (or a folder under it). Nothing is created here but an XDG_CACHE_HOME the
    user named, or the temp fallback; writers make their own folders below."""
    return _root(os.environ.get("XDG_CACHE_HOME", ""), os.environ.get("HOME", "")).joinpath(*parts)


def set_compiler_cache_env() -> None:
    """Point Inductor's and Triton's caches under ours, unless the user has chosen their own, so
    a second run finds its compiled graphs and kernels instead of compiling again."""
    for variable, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        if not os.environ.get(variable):
            os.environ[variable] = str(cache_dir(sub))


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


@lru_cache(maxsize=None)  # per environment: the fallback's warning is given once
def _root(xdg: str, home: str) -> Path:
    # The XDG spec makes a relative XDG_CACHE_HOME invalid: it is ignored, as other programs do.
    if xdg and os.path.isabs(xdg):
        base = Path(xdg)
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass
        if _writable_dir(base):
            return base / "ernie"
        reason = f"XDG_CACHE_HOME={xdg} is not a writable directory"
    else:
        home_path = Path(home or os.path.expanduser("~"))
        cache = home_path / ".cache"
        # HOME itself is never created: only a .cache inside a home that exists.
        if home_path.is_absolute() and (_writable_dir(cache) or (not cache.exists() and _writable_dir(home_path))):
            return cache / "ernie"
        reason = f"the home directory {home_path} is missing or not writable"
    fallback = _private_temp()
    from ernie_cli.console import warn

    warn(f"{reason}: caching in {fallback} for this run; set XDG_CACHE_HOME to a writable directory to keep the cache.")
    return fallback


def _private_temp() -> Path:
    """A temp folder only this user can write: native kernels are loaded from the cache as code, so
    a folder that someone else created first (a shared /tmp) is not used."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    path = Path(tempfile.gettempdir()) / (f"ernie-cache-{uid}" if uid is not None else "ernie-cache")
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and (uid is None or st.st_uid == uid) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return path
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="ernie-cache-"))
