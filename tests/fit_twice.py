"""Run by test_examples (not a test itself): fit the example GPT twice in one process under zero2, with
Lightning's subprocess launcher (its child process fits twice too)."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from lit_gpt import CharData, LitGPT, MemoryReport  # noqa: E402

import lightning_zero  # noqa: E402, F401

if __name__ == "__main__":
    torch.set_num_threads(1)
    for fit in range(2):
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(strategy="zero2", accelerator="cpu", devices=2, max_steps=4, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[MemoryReport()])
        if trainer.is_global_zero:
            print(f"fit {fit + 1} of 2", flush=True)
        trainer.fit(LitGPT(), CharData())
