"""Shared by the benchmarks: gloo ranks (two by default), each pinned to its own core with one thread
(unpinned ranks on a 2-core machine swing step times by up to 2x), and the arguments every benchmark takes."""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
BLOCK = 64  # the example GPT's context (tokens per sequence)


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """Repeats, steps and the example GPT's size."""
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)


def parse_arguments(doc: str | None) -> argparse.Namespace:
    """The common arguments (``common_arguments``) of a benchmark whose help text is ``doc``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser)
    return parser.parse_args()


def ratio_rows(medians: dict[str, list[float]], reference: str = "ddp") -> list[dict[str, Any]]:
    """Per system: the median of its per-repeat median step times, and the median over repeats of its ratio to
    ``reference`` in the same repeat (interleaved runs)."""
    return [{"system": name, "median_step_s": statistics.median(times),
             "ratio_to_ddp": statistics.median(a / b for a, b in zip(times, medians[reference]))}
            for name, times in medians.items()]


def gpt_step(system: str, model_args: tuple[int, ...], accumulate: int = 1,
             **config: Any) -> tuple[Callable[[torch.Tensor, torch.Tensor], None], Callable[[], None]]:
    """One optimizer step of a fresh example GPT (fp32 AdamW, seed 0) under ``system`` ("ddp" for torch DDP,
    or "zero1"/"zero2"/"zero3" with ``config``'s other ``ZeroConfig`` fields), as ``one_step(x, y)`` over
    ``accumulate`` micro-batches of ``x``; and a ``close()``."""
    from gpt import GPT

    from lightning_zero import ZeroConfig, ZeroEngine

    torch.manual_seed(0)
    model = GPT(*model_args)
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-3)]
    engine = None if system == "ddp" else ZeroEngine(model, optimizers, ZeroConfig(stage=int(system[-1]), **config))
    return make_step(model, optimizers, engine, accumulate), (engine.close if engine is not None else lambda: None)


def time_gpt_steps(system: str, rank: int, model_args: tuple[int, ...], batch_size: int, warmup: int, steps: int,
                   on_warm: Callable[[], None] = lambda: None, accumulate: int = 1, **config: Any) -> list[float]:
    """Step times of ``gpt_step(system, model_args, accumulate, **config)``, after ``warmup`` steps; ``on_warm``
    runs once the warm-up is over. Every rank draws its own batches; a barrier starts each step."""
    one_step, close = gpt_step(system, model_args, accumulate, **config)
    times = time_loop(one_step, BLOCK, rank, batch_size * accumulate, warmup, steps, on_warm)
    close()
    return times


def make_step(model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer], engine: Any,
              accumulate: int = 1) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """``one_step(x, y)``: the example GPT ``model`` with ``optimizers``, under torch DDP (``engine`` None) or
    the ZeRO ``engine`` that shards them; ``x`` split into ``accumulate`` micro-batches (the ones before the
    last inside ``no_sync()``, as Lightning runs them), then the optimizer step."""
    from torch.nn.parallel import DistributedDataParallel

    net = DistributedDataParallel(model) if engine is None else model
    no_sync = net.no_sync if engine is None else engine.no_sync

    def one_step(x: torch.Tensor, y: torch.Tensor) -> None:
        for micro, (xs, ys) in enumerate(zip(x.chunk(accumulate), y.chunk(accumulate))):
            with no_sync() if micro < accumulate - 1 else contextlib.nullcontext():
                logits = net(xs)
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys.reshape(-1))
                if engine is not None:
                    engine.begin_backward()  # as the strategies do before every backward
                loss.backward()
        for which, optimizer in enumerate(optimizers):
            if engine is None:
                optimizer.step()
                optimizer.zero_grad()
            else:
                engine.step(optimizer=which)

    return one_step


def time_steps(model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer], engine: Any, rank: int,
               batch_size: int, warmup: int, steps: int, on_warm: Callable[[], None] = lambda: None,
               accumulate: int = 1) -> list[float]:
    """Step times of ``make_step(model, optimizers, engine, accumulate)`` with micro-batches of ``batch_size``,
    after ``warmup`` steps. Every rank draws its own batches; a barrier starts each step."""
    return time_loop(make_step(model, optimizers, engine, accumulate), model.block, rank, batch_size * accumulate,
                     warmup, steps, on_warm)


def time_interleaved(steps: dict[str, Callable[[torch.Tensor, torch.Tensor], None]], rank: int, batch_size: int,
                     warmup: int, rounds: int,
                     around: Callable[[str, bool], contextlib.AbstractContextManager[Any]] | None = None,
                     ) -> dict[str, list[float]]:
    """One step of each of ``steps`` in turn, round after round (the order rotated by one each round), so
    every system is timed seconds from the others and a slow minute of the machine slows them all alike.
    ``around(name, timed)`` wraps each step. Returns name -> step time of each round after ``warmup``. Every
    rank draws its own batches, the same for every system in a round; a barrier starts each step."""
    from gpt import corpus, sample_batch

    data = corpus()
    generator = torch.Generator().manual_seed(rank)
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + rounds):
        x, y = sample_batch(data, batch_size, BLOCK, generator)
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            dist.barrier()
            with around(name, round_ >= warmup) if around else contextlib.nullcontext():
                start = time.perf_counter()
                steps[name](x, y)
                elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


def time_loop(one_step: Callable[[torch.Tensor, torch.Tensor], None], block: int, rank: int, batch_size: int,
              warmup: int, steps: int, on_warm: Callable[[], None] = lambda: None) -> list[float]:
    """Times of ``one_step(x, y)`` (forward, backward, optimizer step) on the example corpus, after ``warmup``
    steps. Every rank draws its own batches; a barrier starts each step."""
    from gpt import corpus, sample_batch

    data = corpus()
    generator = torch.Generator().manual_seed(rank)
    times = []
    for step in range(warmup + steps):
        x, y = sample_batch(data, batch_size, block, generator)
        dist.barrier()
        if step == warmup:
            on_warm()
        start = time.perf_counter()
        one_step(x, y)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _entry(rank: int, world: int, port: int, worker: Callable[[int, Any], Any], args: Any, out: Any) -> None:
    # One core per rank where there are enough; more ranks than cores share them as the OS schedules.
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= world:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank]})
    torch.set_num_threads(1)
    # Look like a torchrun child, so a Lightning Trainer in this process joins the group below.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", LOCAL_WORLD_SIZE=str(world), CUDA_VISIBLE_DEVICES="")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result = worker(rank, args)
    if rank == 0:
        out.put(result)
    dist.destroy_process_group()


def run_pinned(worker: Callable[[int, Any], Any], args: Any, world: int = WORLD, preload: Sequence[str] = ()) -> Any:
    """Run ``worker(rank, args)`` on ``world`` ranks; return rank 0's result, or raise if a rank dies first.

    Ranks are spawned, or with ``preload`` forked from a server that imported those modules once: a fresh
    process per call (clean peak RSS) that starts in a tenth of a second instead of several seconds.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("forkserver" if preload else "spawn")
    if preload:
        ctx.set_forkserver_preload(list(preload))  # takes effect when the server first starts
    out = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, world, port, worker, args, out)) for r in range(world)]
    for proc in procs:
        proc.start()
    while True:
        try:
            result = out.get(timeout=1.0)
            break
        except queue.Empty:
            failed = [(rank, proc.exitcode) for rank, proc in enumerate(procs) if proc.exitcode not in (None, 0)]
            if failed:  # the others would wait for it in a collective forever
                for proc in procs:
                    proc.terminate()
                    proc.join()
                raise RuntimeError(f"ranks failed (rank, exit code): {failed}; see their errors above") from None
    for proc in procs:
        proc.join()
    return result
