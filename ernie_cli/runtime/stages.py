"""Where the wall time of one command went, stage by stage, from the moment the process started.

A one-shot `ernie complete` is judged by its whole wall time, so every part of it is named:
interpreter and imports before the command runs, the prompt and tokenizer, torch, the device's
start-up, reading the weights, preparing them, the prompt's forward, the first decode step (which
builds what the others replay) and the rest of decoding. `--json` carries the figures and `-v`
prints them.
"""

from __future__ import annotations

import os
import time


def seconds_since_process_start() -> float | None:
    """From /proc (Linux): the process's start in clock ticks since boot, against the uptime. None
    elsewhere. Its resolution is one tick (10 ms)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class Stages:
    """Consecutive stages: mark(name) closes the stage that ran since the last mark."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        before = seconds_since_process_start()
        if before is not None:
            self.seconds["start"] = before  # the interpreter and the imports before the command ran
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now

    def add(self, name: str, seconds: float) -> None:
        """A stage timed elsewhere, inside the one running now (taken out of it at the next mark)."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self._last += seconds

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def table(self) -> str:
        width = max(len(k) for k in self.seconds) if self.seconds else 0
        lines = [f"  {name:<{width}}  {s:7.3f} s" for name, s in self.seconds.items()]
        return "\n".join(["stages:", *lines, f"  {'total':<{width}}  {self.total:7.3f} s"])
