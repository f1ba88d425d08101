"""Shared by the benchmarks: two gloo ranks, each pinned to its own core with one thread (unpinned ranks
on a 2-core machine swing step times by up to 2x), and the arguments every benchmark takes."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """Repeats, steps and the example GPT's size."""
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)


def _entry(rank: int, port: int, worker: Callable[[int, Any], Any], args: Any, out: Any) -> None:
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= WORLD:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank]})
    torch.set_num_threads(1)
    # Look like a torchrun child, so a Lightning Trainer in this process joins the group below.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", LOCAL_WORLD_SIZE=str(WORLD), CUDA_VISIBLE_DEVICES="")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    result = worker(rank, args)
    if rank == 0:
        out.put(result)
    dist.destroy_process_group()


def run_pinned(worker: Callable[[int, Any], Any], args: Any) -> Any:
    """Run ``worker(rank, args)`` on two pinned ranks; return rank 0's result."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, port, worker, args, out)) for r in range(WORLD)]
    for proc in procs:
        proc.start()
    result = out.get()
    for proc in procs:
        proc.join()
    return result
