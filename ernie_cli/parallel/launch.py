"""Starting the ranks of a tensor-parallel run, and stopping them.

The process that runs the command is rank 0. It starts ranks 1..N-1 as fresh processes (spawn, not
fork: no copy of a half-started thread pool or CUDA context), which meet it in one process group at
a free port of 127.0.0.1 (gloo on the CPU, nccl on CUDA with rank r on cuda:r), load their own parts
of the checkpoint while rank 0 loads its own, and then make rank 0's decoder calls with it
(lockstep.py). They print nothing: stdout is rank 0's.

Ctrl-C reaches every process of the terminal's process group, so the followers ignore it and rank 0
stops them (or ends them, when it stopped in the middle of a forward); a follower whose rank 0 is
gone (killed) ends itself.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp
from multiprocessing import connection

from ernie_cli.errors import ErnieError
from ernie_cli.model.config import ErnieConfig
from ernie_cli.model.ernie import ErnieForCausalLM
from ernie_cli.parallel import group as parallel
from ernie_cli.parallel.lockstep import Leader, follow
from ernie_cli.parallel.shard import Shard, check_split, plan_shard
from ernie_cli.runtime.decoder import Decoder
from ernie_cli.weights.loader import load_model, random_model


@dataclass(frozen=True)
class Weights:
    """Where each rank's part comes from: a checkpoint directory, or random numbers for a config
    (`ernie bench --config`). Sent to the other ranks' processes, so it holds plain values only."""

    cfg: ErnieConfig
    dtype: torch.dtype
    model_dir: Path | None = None

    def load(self, device: torch.device, shard: Shard, progress=None, reserve_bytes: int = 0) -> ErnieForCausalLM:
        if self.model_dir is None:
            return random_model(self.cfg, device, self.dtype, shard=shard)
        return load_model(self.model_dir, device, self.dtype, progress, reserve_bytes, shard=shard)


def load_split(weights: Weights, world: int, device: torch.device, progress=None, reserve_bytes: int = 0) -> Leader:
    """The model split over `world` processes: rank 0's part loaded here, the others' in the
    processes started for them; returns rank 0's decoder, whose calls they all make. The other
    ranks are stopped when this process exits."""
    check_split(weights.cfg, world)
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise ErnieError(f"--tp {world} takes one GPU per rank, and this machine has {torch.cuda.device_count()}: use --tp {torch.cuda.device_count()} or fewer.")
    team = Team(world, weights, device)
    try:
        model = weights.load(rank_device(device, 0), plan_shard(weights.cfg, team.group), progress, reserve_bytes)
        team.wait("ready")
    except BaseException:
        team.close()
        raise
    team.leader = Leader(Decoder(model), team.lost)
    return team.leader


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


def share_cpu(device: torch.device, world: int) -> None:
    """On the CPU, each rank takes its share of the cores: N processes of all-core thread pools
    would spend their time preempting each other."""
    if device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // world))


class Team:
    """Ranks 1..world-1 of a run, started and joined in one process group with this process as rank 0.

    Each follower reports to rank 0 through a pipe of its own (no semaphores: nothing for
    multiprocessing to warn about when a run ends by Ctrl-C), and a pipe that closes before its
    follower has reported says that the follower died."""

    def __init__(self, world: int, weights: Weights, device: torch.device):
        self.world, self.leader, self.closed = world, None, False
        init = f"tcp://127.0.0.1:{_free_port()}"  # no rendezvous file to leave behind
        context = mp.get_context("spawn")
        self.procs, self.reports = [], []
        atexit.register(self.close)
        try:
            for rank in range(1, world):
                report, send = context.Pipe(duplex=False)
                p = context.Process(target=_follower, args=(rank, world, init, device, weights, send, os.getpid()), daemon=True)
                p.start()
                send.close()  # the follower's end only: its death closes the pipe
                self.procs.append(p)
                self.reports.append(report)
            self.wait("joining")
            share_cpu(device, world)
            self.group = parallel.join(0, world, init, rank_device(device, 0))
        except BaseException:
            self.close()
            raise

    def wait(self, state: str) -> None:
        """Until every follower has reported `state`; a follower's error, or its death, is raised."""
        pending = dict(zip(self.reports, range(1, self.world)))
        while pending:
            for report in connection.wait(list(pending)):
                rank = pending.pop(report)
                try:
                    said, message = report.recv()
                except EOFError:
                    process = self.procs[rank - 1]
                    process.join(timeout=5)
                    raise ErnieError(f"rank {rank} of the --tp run ended (exit code {process.exitcode}) before it was {state}; run with ERNIE_DEBUG=1 to see why.") from None
                if said == "error":
                    raise ErnieError(message)

    def lost(self) -> str | None:
        """The first follower that has ended, named with its exit code; None while all run."""
        for rank, p in enumerate(self.procs, 1):
            p.join(timeout=0.5)  # a follower that just failed may still be exiting
            if not p.is_alive():
                return f"rank {rank} (exit code {p.exitcode})"
        return None

    def close(self) -> None:
        """Stop the followers (between two calls they are told to; otherwise they are ended)."""
        if self.closed:
            return
        self.closed = True
        if self.leader is not None and all(p.is_alive() for p in self.procs):
            try:
                self.leader.stop()
            except Exception:  # noqa: BLE001 - a follower went away meanwhile; it is ended below
                pass
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for report in self.reports:
            report.close()
        parallel.leave()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _follower(rank: int, world: int, init: str, device: torch.device, weights: Weights, report, leader_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when the run ends
    _end_with(leader_pid)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # stdout carries rank 0's product only
    debug = os.environ.get("ERNIE_DEBUG", "") not in ("", "0")
    try:
        report.send(("joining", None))
        share_cpu(device, world)
        group = parallel.join(rank, world, init, rank_device(device, rank))
        model = weights.load(rank_device(device, rank), plan_shard(weights.cfg, group))
    except Exception as exc:  # noqa: BLE001 - reported by rank 0 as its error
        if debug:
            traceback.print_exc()
        report.send(("error", str(exc) if isinstance(exc, ErnieError) else f"rank {rank} of the --tp run failed while loading: {type(exc).__name__}: {exc}"))
        return
    report.send(("ready", None))
    try:
        follow(Decoder(model))
    except Exception:  # noqa: BLE001 - rank 0 failed or went away, and reports it itself
        if debug:
            traceback.print_exc()
        os._exit(1)
    parallel.leave()


def _end_with(leader_pid: int) -> None:
    """End this process once rank 0 is gone (killed before it could stop its followers)."""

    def watch() -> None:
        while os.getppid() == leader_pid:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
