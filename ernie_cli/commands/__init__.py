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
]


def registered_commands():
    for name, module, func in _COMMANDS:
        try:
            mod = importlib.import_module(f"ernie_cli.commands.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"ernie_cli.commands.{module}":
                continue  # not written yet
            raise
        yield name, getattr(mod, func)
