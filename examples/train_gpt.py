"""Train the small character GPT with ZeRO through LightningCLI: every Trainer, ZeroStrategy and model
option is a flag or a YAML key, validated against the type hints.

    python examples/train_gpt.py fit --config examples/configs/zero2.yaml
    python examples/train_gpt.py fit --trainer.strategy=zero3 --trainer.precision=bf16-mixed
    python examples/train_gpt.py fit --trainer.strategy=lightning_zero.ZeroStrategy \\
        --trainer.strategy.stage=2 --trainer.strategy.reduce_policy=boundary
    python examples/train_gpt.py fit --trainer.strategy.help lightning_zero.ZeroStrategy

Defaults: 2 CPU processes (Lightning's subprocess launcher starts the second), 30 optimizer steps of 2
micro-batches; data is this repository's own sources, so nothing is downloaded. Rank 0 prints the loss,
then every rank's model-state bytes against what ``ddp`` would hold.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lit_gpt import CharData, LitGPT, MemoryReport, PrintLoss  # noqa: E402

import lightning_zero  # noqa: E402, F401 - registers "zero1", "zero2", "zero3", ... with Lightning

DEFAULTS = {
    "accelerator": "cpu", "devices": 2, "strategy": "zero2", "max_steps": 30, "accumulate_grad_batches": 2,
    "logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
    "callbacks": [PrintLoss(10), MemoryReport()],
}


class GPTCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.block", "data.block")


def main(args: list[str] | None = None) -> None:
    torch.set_num_threads(1)  # one core per rank on the 2-core default
    GPTCLI(LitGPT, CharData, trainer_defaults=DEFAULTS, seed_everything_default=0, save_config_callback=None,
           args=args)


if __name__ == "__main__":
    main()
