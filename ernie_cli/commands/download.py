"""`ernie download`: fetch a model from the Hugging Face Hub once, then run it offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ernie_cli.errors import UsageError
from ernie_cli.weights import hub


def download(
    repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", help="Hub repo id (org/name).")] = hub.DEFAULT_MODEL,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch, tag or commit.", show_default="main")] = None,
    include: Annotated[
        Optional[List[str]],
        typer.Option("--include", metavar="GLOB", help="Fetch only files matching GLOB, not the runtime's set (repeatable)."),
    ] = None,
    exclude: Annotated[
        Optional[List[str]], typer.Option("--exclude", metavar="GLOB", help="Skip files matching GLOB (repeatable).")
    ] = None,
    local_dir: Annotated[
        Optional[Path], typer.Option("--local-dir", metavar="DIR", help="Put plain files in DIR instead of the HF cache.")
    ] = None,
    cache_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--cache-dir", metavar="DIR", help="HF cache to use.", show_default="HF_HUB_CACHE or ~/.cache/huggingface/hub"
        ),
    ] = None,
    token: Annotated[
        Optional[str],
        typer.Option(
            "--token", help="Hub token for gated or private repos.", show_default="HF_TOKEN or the `hf auth login` token"
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the files and total size; fetch nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Fetch every file again, even if present.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the final path.")] = False,
) -> None:
    """Download an ERNIE 4.5 model from the Hugging Face Hub; an interrupted download resumes where it stopped.

    Fetches config, tokenizer and safetensors files only; the last line on stdout is the local path.

    `ernie complete -m REPO_ID` then finds the cached download by itself, offline too.
    """
    if local_dir is not None and cache_dir is not None:
        raise UsageError("pass --local-dir or --cache-dir, not both.")
    snap = hub.download_snapshot(
        repo_id,
        revision=revision,
        include=include,
        exclude=exclude,
        local_dir=local_dir,
        cache_dir=cache_dir,
        token=token,
        force=force,
        dry_run=dry_run,
        quiet=quiet,
    )
    if dry_run:
        width = max(len(hub.human_size(f.size)) for f in snap.files)
        for f in snap.files:
            state = "  (present)" if f.path in snap.present else ""
            print(f"{hub.human_size(f.size):>{width}}  {f.path}{state}")
        print(f"{len(snap.files)} files, {hub.human_size(snap.total_size)} in all, {hub.human_size(snap.to_fetch)} to fetch")
        return
    print(snap.path)
