"""Train the small GPT with ZeRO inside Lightning's Trainer, then compare per-rank model-state bytes with
what ``ddp`` would hold.

    python examples/train_gpt.py --strategy zero2 --devices 2

Lightning's subprocess launcher starts the second process (as for ``ddp``); data is this repository's
own sources, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt import GPT, corpus, sample_batch  # noqa: E402

from lightning_zero import model_state_bytes  # noqa: E402


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
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.model = GPT()
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model.loss(*batch)
        self.log("loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


class PrintLoss(pl.Callback):
    def __init__(self, every: int) -> None:
        self.every = every

    def on_train_batch_end(self, trainer: pl.Trainer, *_: object) -> None:
        step = trainer.global_step
        if trainer.is_last_batch or (step % self.every == 0 and trainer.fit_loop._should_accumulate() is False):
            if trainer.is_global_zero:
                print(f"step {step:3d}  loss {trainer.callback_metrics['loss'].item():.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="zero2")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed, bf16-true")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fits", type=int, default=1, help="fit this many times in one process")
    args = parser.parse_args()

    torch.set_num_threads(1)
    for fit in range(args.fits):
        pl.seed_everything(0, verbose=False)
        module = LitGPT()
        trainer = pl.Trainer(
            strategy=args.strategy, accelerator="cpu", devices=args.devices, max_steps=args.max_steps,
            precision=args.precision,
            accumulate_grad_batches=args.accumulate, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[PrintLoss(10), MemoryReport()],
            use_distributed_sampler=False,
        )
        seed = 1 + trainer.global_rank
        if trainer.is_global_zero:
            print(f"fit {fit + 1} of {args.fits} with strategy {args.strategy!r}", flush=True)
        trainer.fit(module, DataLoader(RandomWindows(args.batch_size, module.model.block, seed), batch_size=None))


class MemoryReport(pl.Callback):
    """At the end of fit, each rank's model-state bytes against ddp's 4Ψ + 4Ψ + 8Ψ for fp32 AdamW
    (Lightning's bf16-mixed under ddp keeps fp32 weights and gradients, so the same 16Ψ)."""

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
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


if __name__ == "__main__":
    main()
