"""Starting a Branch Parallel group: on one host rank 0 (the user's process) starts ranks 1..N-1; under
``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in the environment) every rank was started already.

    group = start(world, device, timeout_s, commit_mode, check, worker)   # rank 0's BranchGroup
    # each started rank r (`python -m lopa.runner.worker`, runner/worker.py): joins the group on cuda:r (or the
    # CPU) and runs worker(group): load the same model, build the same engine, follow rank 0's steps (api.py)

The workers are fresh interpreters that never import the user's script (multiprocessing's spawn would re-run
a script without a ``__main__`` guard); they get the job as pickles on stdin. Data collectives go over NCCL
between GPUs and gloo between CPU processes; the control group is gloo.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch

from ..errors import BranchParallelError, ConfigError
from .group import BranchGroup

RANK_ENV = "LOPA_BP_RANK"  # set in a started worker: a script it imports must not start another group
RENDEZVOUS_S = 300.0  # spawned ranks import torch and reach the store within this (a dead one fails at once)


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world, local rank) when torchrun (or any launcher setting its variables) started this process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    return None


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def _init(rank: int, world: int, device: torch.device, timeout_s: float, store=None) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    extra = {"device_id": device} if device.type == "cuda" else {}
    if store is None:
        torch.distributed.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                                             **extra)
    else:
        torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world,
                                             timeout=timedelta(seconds=timeout_s), **extra)


def start(world: int, device: torch.device, timeout_s: float, commit_mode: str, check: bool,
          worker: Callable[[BranchGroup], None]) -> BranchGroup:
    """This process's BranchGroup: rank 0 spawns the others (one host), or joins torchrun's ranks."""
    if device.type == "cuda" and device.index is not None and world > 1:
        raise ConfigError(f"device: branch parallel puts rank r on cuda:r; pass 'cuda' or 'auto', not {device}")
    if torch.distributed.is_initialized():
        raise ConfigError("branch_parallel: this process already belongs to a torch.distributed group")
    if RANK_ENV in os.environ:
        raise BranchParallelError(f"branch parallel: worker rank {os.environ[RANK_ENV]} imported the script to find "
                                  "the model source, and the script starts a group again: define the source in an "
                                  "importable module, or put the script's body under if __name__ == '__main__':")
    env = torchrun_env()
    if env is not None:
        rank, size, local = env
        if size != world:
            raise ConfigError(f"branch_parallel: {world}, but the launcher started {size} ranks (WORLD_SIZE)")
        dev = rank_device(device, local)
        _init(rank, world, dev, timeout_s)
        return BranchGroup(rank, world, dev, timeout_s, commit_mode, check)
    if device.type == "cuda" and world > torch.cuda.device_count():
        raise ConfigError(f"branch_parallel: {world} ranks need {world} GPUs; this host has "
                          f"{torch.cuda.device_count()}")
    store = torch.distributed.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=timedelta(seconds=RENDEZVOUS_S),
                                       wait_for_workers=False)
    job = _pickled(dict(world=world, port=store.port, device=device, timeout_s=timeout_s, commit_mode=commit_mode,
                        check=check, worker=worker))
    procs = [Worker.start(r, job) for r in range(1, world)]
    deadline = time.monotonic() + RENDEZVOUS_S
    for r, proc in enumerate(procs, start=1):  # every worker reached the store, or one died on the way
        while not store.check([f"up{r}"]):
            if not proc.is_alive() or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                    p.join(5)
                raise BranchParallelError(f"branch parallel: rank {r} did not start (exit code {proc.exitcode}; its "
                                          "own error, if it printed one, is above)")
            time.sleep(0.05)
    dev = rank_device(device, 0)
    _init(0, world, dev, timeout_s, store)
    group = BranchGroup(0, world, dev, timeout_s, commit_mode, check, procs)
    group.store = store  # the rendezvous store lives as long as the group
    return group


def _pickled(job: dict) -> bytes:
    try:
        return pickle.dumps(job)
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        raise BranchParallelError(f"branch parallel: the model source cannot be sent to the worker ranks ({err}); "
                                  "define it at module level in an importable module") from None


class Worker:
    """A started worker rank (a subprocess), with the multiprocessing.Process surface BranchGroup uses."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen

    @classmethod
    def start(cls, rank: int, job: bytes) -> "Worker":
        """``python -m lopa.runner.worker`` with this lopa first on its path; the job goes to its stdin, which
        stays open: the worker exits when it closes (this process ended)."""
        script = getattr(sys.modules.get("__main__"), "__file__", None)
        head = pickle.dumps((list(sys.path), os.path.abspath(script) if script else None, rank))
        root = str(Path(__file__).resolve().parents[2])  # the folder holding the lopa package
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        popen = subprocess.Popen([sys.executable, "-m", "lopa.runner.worker"], stdin=subprocess.PIPE, env=env,
                                 start_new_session=True)
        for blob in (head, job):
            popen.stdin.write(len(blob).to_bytes(8, "little") + blob)
        popen.stdin.flush()
        return cls(popen)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        if self.popen.returncode is not None and not self.popen.stdin.closed:
            self.popen.stdin.close()

    def kill(self) -> None:
        self.popen.kill()


def run_worker(rank: int, world: int, port: int, device: torch.device, timeout_s: float, commit_mode: str,
               check: bool, worker: Callable[[BranchGroup], None]) -> None:
    """In a started worker (runner/worker.py): reach the store, join the group, run ``worker``."""
    store = torch.distributed.TCPStore("127.0.0.1", port, world, is_master=False,
                                       timeout=timedelta(seconds=RENDEZVOUS_S))
    store.set(f"up{rank}", "1")
    dev = rank_device(device, rank)
    _init(rank, world, dev, timeout_s, store)
    worker(BranchGroup(rank, world, dev, timeout_s, commit_mode, check))
