"""Run by test_faults (not a test itself): train LitTiny under zero2 on DEVICES CPU ranks and inject a
fault on rank RANK at optimizer step STEP. Prints "FAULT <unix time>" just before it.

    python tests/fault_script.py raise|exit|kill|hang RANK STEP DEVICES TIMEOUT_S

raise: ``training_step`` raises ValueError; exit: ``os._exit(3)``; kill: SIGKILL to itself; hang: sleeps.
uneven: one epoch in which rank RANK has STEP more batches than the others (4); "FAULT" when the others
finish it. stall-save: every rank saves a sharded checkpoint to $FAULT_CKPT after optimizer step STEP, and
rank RANK's file write stalls; stall-save-after-fit: the same save, made after fit returns.
fabric-raise: a Fabric loop (no Trainer) in which rank RANK raises at step STEP while the other ranks are
busy elsewhere (a long stall: they are in no collective that would fail when rank RANK ends).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_zero import ZeroStrategy
from tests.lit_helpers import LitTiny, loader


def stall_writes() -> None:
    """From now on this rank's checkpoint file writes never finish (a hung filesystem)."""
    from lightning_zero import checkpoint

    def stalled(*args: Any, **kwargs: Any) -> None:
        print(f"FAULT {time.time():.3f} a stalled write on rank {os.environ.get('LOCAL_RANK', '0')}", flush=True)
        time.sleep(600)

    checkpoint._write_durably = stalled  # type: ignore[assignment]


class Faulty(LitTiny):
    def __init__(self, mode: str, rank: int, step: int) -> None:
        super().__init__("adamw")
        self.mode, self.fault_rank, self.fault_step = mode, rank, step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.mode != "uneven" and self.global_rank == self.fault_rank and self.global_step == self.fault_step:
            print(f"FAULT {time.time():.3f} {self.mode} on rank {self.global_rank} at step {self.global_step}",
                  flush=True)
            if self.mode == "raise":
                raise ValueError(f"injected failure on rank {self.global_rank} at step {self.global_step}")
            if self.mode == "exit":
                os._exit(3)
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.mode == "hang":
                time.sleep(600)
        return super().training_step(batch, batch_idx)

    def on_train_start(self) -> None:
        self.trainer.strategy.barrier()
        if self.global_rank == 0:
            print("TRAINING: every rank started", flush=True)

    def on_train_batch_end(self, *args: Any) -> None:
        if self.mode == "stall-save" and self.global_step == self.fault_step:
            if self.global_rank == self.fault_rank:
                stall_writes()
            self.trainer.save_checkpoint(os.environ["FAULT_CKPT"])

    def on_train_epoch_end(self) -> None:
        if self.mode == "uneven" and self.global_rank != self.fault_rank:
            print(f"FAULT {time.time():.3f} rank {self.global_rank} ran out of batches", flush=True)


def fabric_loop(rank: int, step: int, devices: int, timeout: float) -> None:
    from lightning.fabric import Fabric

    from lightning_zero import ZeroFabricStrategy
    from tests.helpers import build_model, loss_of

    fabric = Fabric(strategy=ZeroFabricStrategy(stage=2, timeout=timedelta(seconds=timeout)), accelerator="cpu",
                    devices=devices)
    fabric.launch()
    model = build_model(0)
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters()))
    fabric.barrier()
    if fabric.global_rank == 0:
        print("TRAINING: every rank started", flush=True)
    for index in range(step + 3):
        if fabric.global_rank == rank and index == step:
            print(f"FAULT {time.time():.3f} raise on rank {rank} at step {index}", flush=True)
            raise ValueError(f"injected failure on rank {rank} at step {index}")
        if index == step:
            time.sleep(600)
        fabric.backward(loss_of(model, index, 0, 1))
        optimizer.step()
        optimizer.zero_grad()


def main() -> None:
    mode, rank, step, devices, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(
        sys.argv[5])
    if mode == "fabric-raise":
        return fabric_loop(rank, step, devices, timeout)
    uneven = mode == "uneven"
    trainer = pl.Trainer(
        strategy=ZeroStrategy(stage=2, bucket_numel=150, timeout=timedelta(seconds=timeout)), accelerator="cpu",
        devices=devices, max_steps=-1 if uneven else step + 3, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False,
    )
    batches = 16 if not uneven else 4 + (step if int(os.environ.get("LOCAL_RANK", "0")) == rank else 0)
    trainer.fit(Faulty(mode, rank, step), loader(batches, 1))
    print(f"rank {trainer.global_rank}: finished at step {trainer.global_step}", flush=True)
    if mode == "stall-save-after-fit":
        if trainer.global_rank == rank:
            stall_writes()
        trainer.save_checkpoint(os.environ["FAULT_CKPT"])


if __name__ == "__main__":
    main()
