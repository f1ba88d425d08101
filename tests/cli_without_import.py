"""Run by test_cli (not a test itself): the example's LightningCLI in a script that never imports
lightning_zero, so ``--trainer.strategy=lightning_zero.ZeroStrategy`` must resolve by class path alone."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from lit_gpt import CharData, LitGPT  # noqa: E402


class Report(pl.Callback):
    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        if trainer.is_global_zero:
            print(f"strategy {type(strategy).__module__}.{type(strategy).__name__} config {strategy.config} "
                  f"precision {type(strategy.precision_plugin).__name__}({strategy.precision_plugin.precision}) "
                  f"steps {trainer.global_step}", flush=True)


if __name__ == "__main__":
    assert "lightning_zero" not in sys.modules
    LightningCLI(LitGPT, CharData, save_config_callback=None, seed_everything_default=0, trainer_defaults={
        "accelerator": "cpu", "devices": 2, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "callbacks": [Report()]})
