"""Run by test_multinode under torchrun (not a test itself): LitTiny for 6 optimizer steps with
``Trainer(num_nodes=2, devices=2)``; global rank 0 saves the final weights to OUT.

    torchrun --nnodes 2 --node-rank R --nproc-per-node 2 --master-addr 127.0.0.1 --master-port P \\
        tests/multinode_script.py zero2|zero3|zero2-node|zero3-node|ddp OUT

``zeroK-node``: ``ZeroStrategy(stage=K, shard_size="node")``, hybrid sharding with one group per node.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy

import lightning_zero  # registers the names
from tests.lit_helpers import LitTiny, loader

if __name__ == "__main__":
    name, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    strategy = DDPStrategy(find_unused_parameters=True) if name == "ddp" else name
    if name.endswith("-node"):
        strategy = lightning_zero.ZeroStrategy(stage=int(name[4]), shard_size="node")
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, num_nodes=2, max_steps=6, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False)
    module = LitTiny("adamw")
    trainer.fit(module, loader(8, 1))
    print(f"{name}: global rank {trainer.global_rank} of {trainer.world_size}, node {trainer.node_rank}, local rank "
          f"{trainer.local_rank}, environment {type(trainer.strategy.cluster_environment).__name__}", flush=True)
    if name.endswith("-node"):
        engine = trainer.strategy.engines[0]
        print(f"global rank {trainer.global_rank}: sharding group of {engine.world_size}, replica {engine.replica}, "
              f"across groups {trainer.strategy.communication().get('all_reduce_across', 0)} bytes per step",
              flush=True)
    if trainer.is_global_zero:
        torch.save({n: p.detach().clone() for n, p in module.net.named_parameters()}, out)
