"""The small character GPT as a LightningModule and LightningDataModule, plus two console callbacks. Shared
by ``train_gpt.py`` (LightningCLI) and the tests; it does not import lightning_zero itself, so a CLI built
on it can name ``lightning_zero.ZeroStrategy`` by class path alone."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from gpt import GPT, corpus, sample_batch
from torch.utils.data import DataLoader, IterableDataset


class RandomWindows(IterableDataset):
    """Endless random windows of the corpus, seeded per rank so ranks see different text."""

    def __init__(self, batch_size: int, block: int, seed: int) -> None:
        self.batch_size, self.block, self.seed = batch_size, block, seed

    def __iter__(self):  # noqa: ANN204
        data = corpus()
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield sample_batch(data, self.batch_size, self.block, generator)


class LitGPT(pl.LightningModule):
    """A character-level GPT trained with AdamW.

    Args:
        width: embedding width.
        depth: transformer blocks.
        heads: attention heads per block.
        block: context length in characters.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(self, width: int = 64, depth: int = 2, heads: int = 4, block: int = 64, lr: float = 3e-3,
                 weight_decay: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = GPT(width=width, depth=depth, heads=heads, block=block)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model.loss(*batch)
        self.log("loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class CharData(pl.LightningDataModule):
    """Random windows of this repository's own sources (nothing to download); each rank its own stream.

    Args:
        batch_size: windows per micro-batch on each rank.
        block: window length (the CLI links it to ``model.block``).
        seed: base seed; rank r draws with ``seed + r``.
    """

    def __init__(self, batch_size: int = 8, block: int = 64, seed: int = 1) -> None:
        super().__init__()
        self.batch_size, self.block, self.seed = batch_size, block, seed

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return DataLoader(RandomWindows(self.batch_size, self.block, self.seed + rank), batch_size=None)


class PrintLoss(pl.Callback):
    """Prints the loss every ``every`` optimizer steps and at the last one, from rank 0."""

    def __init__(self, every: int = 10) -> None:
        self.every = every

    def on_train_batch_end(self, trainer: pl.Trainer, *_: object) -> None:
        step = trainer.global_step
        stepped = not trainer.fit_loop._should_accumulate()
        if trainer.is_global_zero and stepped and (step % self.every == 0 or step == trainer.max_steps):
            print(f"step {step:3d}  loss {trainer.callback_metrics['loss'].item():.4f}", flush=True)


class MemoryReport(pl.Callback):
    """At the end of fit, each rank's model-state bytes against ddp's 4Ψ + 4Ψ + 8Ψ for fp32 AdamW
    (Lightning's bf16-mixed under ddp keeps fp32 weights and gradients, so the same 16Ψ)."""

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        from lightning_zero import model_state_bytes

        engines = getattr(trainer.strategy, "engines", [])
        # under zero3 a parameter is an empty tensor between uses: count from the engine's layout
        psi = sum(r.numel for r in engines[0].layout.params) if engines else sum(
            p.numel() for p in module.parameters())
        ddp_bytes = 16 * psi
        if engines:
            held = model_state_bytes(engines[0])
            line = (f"rank {trainer.global_rank}: {held.total / 2**20:.2f} MiB of model state (params "
                    f"{held.parameters / 2**20:.2f}, grads {held.gradients / 2**20:.2f}, master "
                    f"{held.master / 2**20:.2f}, optimizer {held.optimizer_state / 2**20:.2f}) "
                    f"vs ddp {ddp_bytes / 2**20:.2f} MiB ({held.total / ddp_bytes:.2f}x)")
        else:
            line = f"rank {trainer.global_rank}: ddp holds {ddp_bytes / 2**20:.2f} MiB of model state"
        lines = [None] * trainer.world_size
        torch.distributed.all_gather_object(lines, line)
        if trainer.is_global_zero:
            print(f"{psi:,} parameters, {trainer.world_size} ranks")
            print("\n".join(lines), flush=True)
