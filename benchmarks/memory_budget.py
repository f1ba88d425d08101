"""A model whose ``ddp`` training state exceeds a per-rank memory budget: Lightning ``ddp`` fails with
out-of-memory, ``zero3`` (``after_fit="sharded"``) trains it on the same ranks under the same budget.

    python benchmarks/memory_budget.py                       # 4 ranks, 100.7M parameters, 1.5 GiB budget
    python benchmarks/memory_budget.py --ranks 4 --layers 24 --width 2048 --budget-gib 1.5 --steps 2

Each system is one Trainer fit in a fresh process per rank (gloo, ``accelerator="cpu"``), launched like
``torchrun`` would (environment variables; Lightning joins the group). The budget is imposed per rank by the
kernel: ``RLIMIT_DATA`` (private writable memory, which on Linux >= 4.7 counts the anonymous mappings
torch's CPU allocator uses for large tensors) is set to what the process holds after importing everything,
plus ``--budget-gib``. An allocation past it fails inside torch ("can't allocate memory"), as a device
allocation past device memory would. The model is an MLP of ``--layers`` square layers built in
``configure_model`` (built sharded under zero3: no rank ever holds it whole), trained with fp32 AdamW, so
``ddp`` needs 16 bytes per parameter per rank (weights, gradients, two Adam moments) and zero3 16/N plus two
layers gathered. Per rank the script reports the peak resident memory above the start of fit (``ru_maxrss``)
and the bytes of tensors the engine holds after the last step by its own count (slices, gradient slices,
optimizer state); it writes ``benchmarks/results/memory_budget.json``. The resident peak is above the tensor
count: the allocator's and gloo's buffers, the window's gathered layers and gradients in flight.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def rank_main(system: str, layers: int, width: int, budget: int, steps: int, out: str) -> None:
    import lightning.pytorch as pl
    import torch
    import torch.distributed as dist

    from lightning_zero import ZeroStrategy

    torch.set_num_threads(1)

    class MLP(pl.LightningModule):
        def configure_model(self) -> None:
            if not hasattr(self, "layers"):
                torch.manual_seed(0)
                self.layers = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            gen = torch.Generator().manual_seed(1000 * batch_idx + dist.get_rank())
            x = torch.randn(4, width, generator=gen)
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return x.square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    timeout = timedelta(seconds=120)  # a rank whose peer ran out of memory stops waiting after this
    strategy: Any = DDPStrategy(timeout=timeout) if system == "ddp" else ZeroStrategy(
        stage=3, after_fit="sharded", persist_numel=0, timeout=timeout)
    trainer = pl.Trainer(accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy=strategy,
                         max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False)
    data = torch.utils.data.DataLoader(list(range(steps)), batch_size=1)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    limit = _vm("VmData") + budget
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.RLIM_INFINITY))
    start = time.perf_counter()
    result: dict[str, Any] = {"system": system, "rank": int(os.environ["RANK"])}
    try:
        trainer.fit(MLP(), data)
        result["outcome"] = f"trained {trainer.global_step} steps"
        if system != "ddp":
            engine = trainer.strategy.engines[0]
            slices = [t for b in engine.buckets for t in (b.shard, b.grad_shard, b.master) if t is not None]
            state = [t for entry in engine.optimizer.optimizer.state.values() for t in entry.values()
                     if torch.is_tensor(t)]
            result["engine_bytes"] = sum(t.numel() * t.element_size() for t in {id(t): t for t in slices + state}
                                         .values())
    except (RuntimeError, MemoryError) as exc:
        result["outcome"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    resource.setrlimit(resource.RLIMIT_DATA, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    result["peak_above_start"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    result["seconds"] = time.perf_counter() - start
    with open(out, "w") as f:
        json.dump(result, f)
    os._exit(0)  # a rank whose peer failed may not tear down its process group cleanly


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_system(system: str, args: argparse.Namespace, tmp: str) -> list[dict[str, Any]]:
    port = _free_port()
    procs = []
    for rank in range(args.ranks):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(args.ranks),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0", "LOCAL_WORLD_SIZE": str(args.ranks),
               "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}
        out = os.path.join(tmp, f"{system}-{rank}.json")
        procs.append((subprocess.Popen(
            [sys.executable, __file__, "--rank-main", system, str(args.layers), str(args.width),
             str(int(args.budget_gib * 2**30)), str(args.steps), out], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True), out))
    results = []
    for proc, out in procs:
        try:
            _, err = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if os.path.exists(out):
            with open(out) as f:
                results.append(json.load(f))
        else:
            results.append({"system": system, "outcome": f"no result (exit {proc.returncode}): {err[-300:]}"})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--budget-gib", type=float, default=1.5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--rank-main", nargs=6)
    args = parser.parse_args()
    if args.rank_main:
        system, layers, width, budget, steps, out = args.rank_main
        rank_main(system, int(layers), int(width), int(budget), int(steps), out)
        return
    import tempfile

    params = args.layers * (args.width * args.width + args.width)
    print(f"{params / 1e6:.1f}M parameters, fp32 AdamW: ddp needs {16 * params / 2**30:.2f} GiB of training "
          f"state per rank, zero3 on {args.ranks} ranks {16 * params / args.ranks / 2**30:.2f} GiB (+ two layers "
          f"gathered); per-rank budget {args.budget_gib:.2f} GiB above the imported baseline")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for system in ("ddp", "zero3"):
            rows += run_system(system, args, tmp)
    print("| system | rank | outcome | peak RSS above start of fit (GiB) | engine tensors after the last step (GiB) |")
    print("|---|---|---|---|---|")
    for row in rows:
        peak = row.get("peak_above_start")
        engine = row.get("engine_bytes")
        print(f"| {row['system']} | {row.get('rank', '?')} | {row['outcome']} | "
              f"{peak / 2**30:.2f} | {engine / 2**30 if engine else float('nan'):.2f} |" if peak is not None else
              f"| {row['system']} | {row.get('rank', '?')} | {row['outcome']} | - | - |")
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "memory_budget.json"), "w") as f:
        json.dump({"parameters": params, "ranks": args.ranks, "budget_gib": args.budget_gib, "rows": rows}, f,
                  indent=1)


if __name__ == "__main__":
    main()
