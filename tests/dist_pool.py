"""A pool of gloo ranks kept alive across test cases, so each world size pays the process start once.

``pool.run(fn, *args)`` runs the module-level function ``fn(*args)`` on every rank and returns the
results in rank order; an exception on any rank fails the call with every rank's traceback. A hang is
cut by the pool's timeout, after which the pool restarts.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

_JOB_TIMEOUT_S = 180.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, jobs: Any, results: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    # Look like a torchrun child, so a Lightning Trainer in this process joins the existing group
    # instead of launching processes of its own.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0", LOCAL_WORLD_SIZE=str(world_size))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    while True:
        job = jobs.get()
        if job is None:
            break
        fn, args, kwargs = job
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    """``world_size`` spawned processes in one gloo group, running submitted functions together."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # DDP's find_unused_parameters notice, per rank
        port = _free_port()
        self._results = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(target=_worker, args=(r, self.world_size, port, self._jobs[r], self._results), daemon=True)
            for r in range(self.world_size)
        ]
        for proc in self._procs:
            proc.start()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        for jobs in self._jobs:
            jobs.put((fn, args, kwargs))
        outcomes: dict[int, tuple[bool, Any]] = {}
        try:
            while len(outcomes) < self.world_size:
                rank, ok, value = self._results.get(timeout=_JOB_TIMEOUT_S)
                outcomes[rank] = (ok, value)
        except queue.Empty:
            self.restart()
            raise TimeoutError(f"{fn.__name__} did not finish on all ranks within {_JOB_TIMEOUT_S}s") from None
        failures = {r: v for r, (ok, v) in outcomes.items() if not ok}
        if failures:
            self.restart()  # a failed case may leave collectives mismatched
            detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
            raise RankError(f"{fn.__name__} failed on ranks {sorted(failures)}:\n{detail}", failures)
        return [outcomes[r][1] for r in range(self.world_size)]

    def restart(self) -> None:
        self.close()
        self._start()

    def close(self) -> None:
        for jobs in self._jobs:
            try:
                jobs.put(None)
            except (OSError, ValueError):
                pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()


class RankError(AssertionError):
    """A function failed on some ranks; ``tracebacks`` maps rank to its traceback text."""

    def __init__(self, message: str, tracebacks: dict[int, str]) -> None:
        super().__init__(message)
        self.tracebacks = tracebacks
