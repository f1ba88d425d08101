"""Train the small GPT with the bare ZeRO engine (no Lightning) and compare per-rank bytes with DDP.

    torchrun --standalone --nproc_per_node=2 examples/train_engine.py --stage 2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt import GPT, corpus, sample_batch  # noqa: E402

from lightning_zero import ZeroConfig, ZeroEngine, model_state_bytes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = GPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    engine = ZeroEngine(model, optimizer, ZeroConfig(stage=args.stage, bucket_numel=2**16))
    data = corpus()
    generator = torch.Generator().manual_seed(1 + rank)  # each rank draws its own batches
    for step in range(args.steps):
        total = 0.0
        for micro in range(args.accumulate):
            x, y = sample_batch(data, args.batch_size, model.block, generator)
            last = micro == args.accumulate - 1
            with engine.no_sync() if not last else _nothing():
                loss = model.loss(x, y) / args.accumulate
                loss.backward()
            total += loss.item()
        engine.step()
        mean = torch.tensor(total)
        dist.all_reduce(mean)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {mean.item() / world:.4f}", flush=True)

    held = model_state_bytes(engine)
    psi = sum(p.numel() for p in model.parameters())
    ddp_bytes = 4 * psi + 4 * psi + 8 * psi  # fp32 AdamW under plain data parallel
    line = (f"rank {rank}: zero{args.stage} holds {held.total / 2**20:.2f} MiB of model state "
            f"(params {held.parameters / 2**20:.2f}, grads {held.gradients / 2**20:.2f}, "
            f"optimizer {held.optimizer_state / 2**20:.2f}); DDP would hold {ddp_bytes / 2**20:.2f} MiB "
            f"({held.total / ddp_bytes:.2f}x)")
    lines = [None] * world
    dist.all_gather_object(lines, line)
    if rank == 0:
        print(f"{psi:,} parameters on {world} ranks, world size from {os.environ.get('WORLD_SIZE')}")
        print("\n".join(lines))
    engine.close()
    dist.destroy_process_group()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


if __name__ == "__main__":
    main()
