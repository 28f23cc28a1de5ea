"""Subcommands. Each module exposes one function whose signature is its command line."""

from __future__ import annotations

import importlib

# (command name, module, function). Command modules import torch lazily, inside the function,
# so `ernie --help` stays fast.
_COMMANDS = [
    ("download", "download", "download"),
    ("complete", "complete", "complete"),
    ("quantize", "quantize", "quantize"),
    ("bench", "bench", "bench"),
    ("serve", "serve", "serve"),
]


def registered_commands():
    for name, module, func in _COMMANDS:
        yield name, getattr(importlib.import_module(f"ernie_cli.commands.{module}"), func)
