"""Checkpoint save and load through Lightning: ZeRO's sharded checkpoints against Lightning ``ddp``'s
single file, on the example GPT with AdamW in fp32, two ranks each pinned to its own core.

    python benchmarks/checkpoint.py --repeats 5

Each repeat saves and loads once per system, in turn (interleaved). Save: ``trainer.save_checkpoint``
between barriers. Load: the strategy's ``load_checkpoint`` + ``load_model_state_dict`` +
``load_optimizer_state_dict`` (what ``fit(ckpt_path=...)`` runs), between barriers. Bytes: what the
checkpoint holds on disk, in all and in the largest single file (what one rank writes).
Writes benchmarks/results/checkpoint.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
from harness import parse_arguments, run_pinned  # noqa: E402

SYSTEMS = ("ddp", "zero1", "zero2", "zero3")


def _sizes(path: str) -> tuple[int, int]:
    files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names] if os.path.isdir(path) else [path]
    sizes = [os.path.getsize(f) for f in files]
    return sum(sizes), max(sizes)


def _worker(rank: int, args: argparse.Namespace) -> dict:
    import lightning.pytorch as pl
    from gpt import GPT, corpus, sample_batch
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader

    from lightning_zero import ZeroStrategy

    class Bench(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = GPT(width=args.width, depth=args.depth)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            return self.model.loss(*batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    data, generator = corpus(), torch.Generator().manual_seed(rank)
    batches = [sample_batch(data, args.batch_size, 64, generator) for _ in range(2)]
    root = tempfile.mkdtemp() if rank == 0 else None
    shared = [root]
    dist.broadcast_object_list(shared)
    root = shared[0]
    results: dict[str, dict[str, list[float]]] = {n: {"save": [], "load": []} for n in SYSTEMS}
    sizes: dict[str, tuple[int, int]] = {}
    params = 0
    for _ in range(args.repeats):
        for name in SYSTEMS:
            strategy = DDPStrategy() if name == "ddp" else ZeroStrategy(stage=int(name[-1]))
            trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_steps=2, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, use_distributed_sampler=False)
            module = Bench()
            params = sum(p.numel() for p in module.parameters())
            trainer.fit(module, DataLoader(batches, batch_size=None))
            path = os.path.join(root, f"{name}.ckpt")
            dist.barrier()
            start = time.perf_counter()
            trainer.save_checkpoint(path)
            dist.barrier()
            results[name]["save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            checkpoint = trainer.strategy.load_checkpoint(path)
            trainer.strategy.load_model_state_dict(checkpoint)
            trainer.strategy.load_optimizer_state_dict(checkpoint)
            dist.barrier()
            results[name]["load"].append(time.perf_counter() - start)
            sizes[name] = _sizes(path)
            dist.barrier()
            if rank == 0:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if rank == 0:
        shutil.rmtree(root)
    return {"params": params, "times": results, "sizes": sizes}


def main() -> None:
    args = parse_arguments(__doc__)
    result = run_pinned(_worker, args)
    rows = []
    ddp_save = statistics.median(result["times"]["ddp"]["save"])
    ddp_load = statistics.median(result["times"]["ddp"]["load"])
    for name in SYSTEMS:
        save = statistics.median(result["times"][name]["save"])
        load = statistics.median(result["times"][name]["load"])
        total, largest = result["sizes"][name]
        rows.append({"system": name, "save_s": save, "save_vs_ddp": save / ddp_save, "load_s": load,
                     "load_vs_ddp": load / ddp_load, "bytes_total": total, "bytes_largest_file": largest})
    lines = [
        f"Example GPT, {result['params']:,} parameters, AdamW fp32, 2 pinned ranks, median of {args.repeats} "
        "interleaved repeats.",
        "",
        "| system | save (s) | vs ddp | load (s) | vs ddp | on disk (MiB) | largest file (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['system']} | {r['save_s']:.3f} | {r['save_vs_ddp']:.2f}x | {r['load_s']:.3f} | "
                     f"{r['load_vs_ddp']:.2f}x | {r['bytes_total'] / 2**20:.2f} | "
                     f"{r['bytes_largest_file'] / 2**20:.2f} |")
    table = "\n".join(lines)
    print(table)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "checkpoint.json").write_text(json.dumps({"args": vars(args), "params": result["params"], "rows": rows},
                                                    indent=1))
    (out / "checkpoint.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
