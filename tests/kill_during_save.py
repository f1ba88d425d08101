"""Run by test_checkpoint (not a test itself): train LitTiny under zero2 on 2 CPU ranks to STEPS and save
to PATH. ``kill`` mode kills one rank with SIGKILL in the middle of that save, at MOMENT:

- ``rank-file``: rank 1 has written half of its file;
- ``before-commit``: rank 0 has written ``meta.pt`` and the new manifest under its temporary name.

usage: python tests/kill_during_save.py save|kill PATH STEPS [MOMENT]
"""

from __future__ import annotations

import io
import os
import signal
import sys
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_zero import ZeroStrategy
from lightning_zero import checkpoint as checkpoint_module
from tests.lit_helpers import LitTiny, loader


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(moment: str, rank: int) -> None:
    """Patch this rank's file writing so that it dies at ``moment`` of the next save."""
    if moment == "rank-file" and rank == 1:
        real_save = torch.save

        def half_then_die(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            print(f"rank 1: wrote {len(data) // 2} of {len(data)} bytes, killing myself", flush=True)
            die()

        torch.save = half_then_die
    if moment == "before-commit" and rank == 0:
        def die_instead(source: str, target: str) -> None:
            print(f"rank 0: about to commit {target}, killing myself", flush=True)
            die()

        checkpoint_module.os.replace = die_instead


def main() -> None:
    mode, path, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    trainer = pl.Trainer(
        strategy=ZeroStrategy(stage=2, bucket_numel=150, timeout=timedelta(seconds=30)), accelerator="cpu",
        devices=2, max_steps=steps, max_epochs=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )
    trainer.fit(LitTiny("adamw", schedule=True), loader(8, 1))
    if mode == "kill":
        arm(sys.argv[4], trainer.global_rank)
    trainer.save_checkpoint(path)
    print(f"rank {trainer.global_rank}: saved {path} at step {trainer.global_step}", flush=True)


if __name__ == "__main__":
    main()
