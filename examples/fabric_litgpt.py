"""Train a litgpt model (built from a config: nothing to download) with your own Fabric loop under ZeRO, on
this repository's own sources as characters, and compare each rank's model-state bytes with DDP's.

    pip install litgpt
    python examples/fabric_litgpt.py --strategy zero3 --devices 2 --steps 20

The loop is a plain Fabric loop: ``fabric.init_module()`` (under zero3 each rank keeps only its chunk of
every weight from the moment it is built), ``fabric.setup``, ``fabric.no_backward_sync`` for accumulation,
``fabric.clip_gradients``, and ``fabric.save``/``fabric.load`` of a sharded checkpoint halfway through
(loadable on any world size and stage, and by the Trainer).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from lightning.fabric import Fabric

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt import VOCAB, corpus, sample_batch  # noqa: E402

import lightning_zero  # noqa: E402,F401 - registers "zero1", "zero2", "zero3" with Fabric


def build_model() -> torch.nn.Module:
    from litgpt import GPT, Config

    config = Config(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=VOCAB, padded_vocab_size=VOCAB,
                    n_query_groups=2, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=344,
                    bias=False, rotary_percentage=1.0, parallel_residual=False)
    return GPT(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="zero3", help="zero1, zero2, zero3 or ddp")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--checkpoint", default=None, help="where to save halfway (default: a temporary directory)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    fabric = Fabric(strategy=args.strategy, accelerator="cpu", devices=args.devices, precision=args.precision)
    fabric.launch()
    fabric.seed_everything(0)

    with fabric.init_module():  # zero3: each rank builds only its chunk of every weight
        model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model, optimizer = fabric.setup(model, optimizer)
    psi = sum(r.numel for r in fabric.strategy.engines[0].layout.params) if hasattr(fabric.strategy, "engines") \
        else sum(p.numel() for p in model.parameters())
    data = corpus()
    generator = torch.Generator().manual_seed(1 + fabric.global_rank)  # each rank draws its own windows
    block = model.config.block_size
    directory = tempfile.TemporaryDirectory() if args.checkpoint is None and fabric.global_rank == 0 else None
    path = args.checkpoint or fabric.broadcast(os.path.join(directory.name, "ckpt") if directory else None)
    first_loss = last_loss = 0.0
    for step in range(args.steps):
        if step == args.steps // 2:  # a sharded checkpoint: every rank writes its own slices
            fabric.save(path, {"model": model, "optimizer": optimizer, "step": step})
            remainder = fabric.load(path, {"model": model, "optimizer": optimizer})
            assert remainder["step"] == step
        total = 0.0
        for micro in range(args.accumulate):
            x, y = sample_batch(data, args.batch_size, block, generator)
            with fabric.no_backward_sync(model, enabled=micro < args.accumulate - 1):
                logits = model(x)
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)) / args.accumulate
                fabric.backward(loss)
            total += loss.item()
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        mean = fabric.all_reduce(torch.tensor(total), reduce_op="mean").item()
        first_loss = mean if step == 0 else first_loss
        last_loss = mean
        if step % 5 == 0 or step == args.steps - 1:
            fabric.print(f"step {step:3d}  loss {mean:.4f}")

    ddp_bytes = 16 * psi  # fp32 weights and gradients and AdamW's two moments (bf16-mixed keeps fp32 under ddp)
    if hasattr(fabric.strategy, "engines"):
        held = lightning_zero.model_state_bytes(fabric.strategy.engines[0])
        line = (f"rank {fabric.global_rank}: {held.total / 2**20:.2f} MiB of model state (params "
                f"{held.parameters / 2**20:.2f}, grads {held.gradients / 2**20:.2f}, master {held.master / 2**20:.2f}, "
                f"optimizer {held.optimizer_state / 2**20:.2f}) vs ddp {ddp_bytes / 2**20:.2f} MiB "
                f"({held.total / ddp_bytes:.2f}x)")
    else:
        line = f"rank {fabric.global_rank}: ddp holds {ddp_bytes / 2**20:.2f} MiB of model state"
    lines = [None] * fabric.world_size
    torch.distributed.all_gather_object(lines, line)
    fabric.print(f"litgpt, {psi:,} parameters, {args.strategy} {args.precision} on {fabric.world_size} ranks: loss "
                 f"{first_loss:.4f} -> {last_loss:.4f}")
    fabric.print("\n".join(lines))
    fabric.barrier()
    if directory is not None:
        directory.cleanup()


if __name__ == "__main__":
    main()
