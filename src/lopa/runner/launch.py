"""Starting a Branch Parallel group: on one host rank 0 (the user's process) spawns ranks 1..N-1; under
``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in the environment) every rank was started already.

    group = start(world, device, timeout_s, commit_mode, check, worker)   # rank 0's BranchGroup
    # each spawned rank r: joins the group on cuda:r (or the CPU) and runs worker(group): load the same model,
    # build the same engine, follow rank 0's steps until it stops (api.py)

Data collectives go over NCCL between GPUs and gloo between CPU processes; the control group is gloo.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from datetime import timedelta
from typing import Callable

import torch

from ..errors import BranchParallelError, ConfigError
from .group import BranchGroup

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
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, daemon=True, name=f"lopa-bp-rank{r}",
                         args=(r, world, store.port, device, timeout_s, commit_mode, check, worker))
             for r in range(1, world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + RENDEZVOUS_S
    for r, proc in enumerate(procs, start=1):  # every worker reached the store, or one died on the way
        while not store.check([f"up{r}"]):
            if not proc.is_alive() or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise BranchParallelError(f"branch parallel: rank {r} did not start (exit code {proc.exitcode})")
            time.sleep(0.05)
    dev = rank_device(device, 0)
    _init(0, world, dev, timeout_s, store)
    group = BranchGroup(0, world, dev, timeout_s, commit_mode, check, procs)
    group.store = store  # the rendezvous store lives as long as the group
    return group


def _worker_main(rank: int, world: int, port: int, device: torch.device, timeout_s: float, commit_mode: str,
                 check: bool, worker: Callable[[BranchGroup], None]) -> None:
    store = torch.distributed.TCPStore("127.0.0.1", port, world, is_master=False,
                                       timeout=timedelta(seconds=RENDEZVOUS_S))
    store.set(f"up{rank}", "1")
    dev = rank_device(device, rank)
    _init(rank, world, dev, timeout_s, store)
    worker(BranchGroup(rank, world, dev, timeout_s, commit_mode, check))
