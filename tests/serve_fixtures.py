"""`ernie serve` in a subprocess on a free loopback port, for the API and load tests; always stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tiny_models import write_full_vocab_checkpoint

# One torch thread: on a shared 2-core machine, two threads stall each other for seconds under load.
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
for _name in ("ERNIE_DEBUG", "ERNIE_API_KEY", "ERNIE_SERVER"):
    ENV.pop(_name, None)
URL = re.compile(r"on (http://\S+)/v1 ")


@pytest.fixture(scope="session")
def served_model(tmp_path_factory, tokenizer_dir) -> Path:
    return write_full_vocab_checkpoint(tmp_path_factory.mktemp("served") / "tiny-ernie", tokenizer_dir)[0]


class Server:
    def __init__(self, model_dir: Path, *args: str, env: dict | None = None):
        cmd = [sys.executable, "-m", "ernie_cli", "serve", "-m", str(model_dir), "--port", "0", "--dtype", "float32", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env or ENV)
        self.lines: list[str] = []
        self.stdout = b""
        self.url: str | None = None
        found = threading.Event()

        def read() -> None:
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace")
                self.lines.append(line)
                m = URL.search(line)
                if m:
                    self.url = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(120) or self.url is None:
            self.stop(signal.SIGKILL)
            raise AssertionError("the server did not start:\n" + self.stderr)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    @property
    def base(self) -> str:
        return self.url + "/v1"

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.stdout = self.proc.stdout.read()
        time.sleep(0.05)  # the reader thread takes the last lines
        return self.proc.returncode


@pytest.fixture
def start_server(served_model):
    """start_server(*args) -> a running Server; every one started is stopped at the end of the test."""
    started: list[Server] = []

    def start(*args: str, env: dict | None = None) -> Server:
        server = Server(served_model, *args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(signal.SIGKILL)
