"""Lightning side of the tests: TinyNet as a LightningModule, per-rank data, and a Trainer factory that
runs inside a pool worker (the worker looks like a torchrun child, so Lightning joins its group)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, Dataset

from lightning_zero.sharding.collectives import wait_all
from tests.helpers import OPTIMIZERS, _lr, batch, build_model, param_groups


class MicroBatches(Dataset):
    """Item i is micro-batch (i // accumulate, i % accumulate) of this rank, made on the fly."""

    def __init__(self, length: int, accumulate: int) -> None:
        self.length, self.accumulate = length, accumulate

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        step, micro = divmod(index, self.accumulate)
        x, y = batch(step, micro, dist.get_rank(), dist.get_world_size())
        return x, y, step


class LitTiny(pl.LightningModule):
    """TinyNet trained with MSE; counts the hooks Lightning fires per optimizer step."""

    def __init__(self, optimizer: str = "sgd", schedule: bool = False) -> None:
        super().__init__()
        self.net = build_model()
        self.optimizer_name = optimizer
        self.schedule = schedule
        self.counts = {"on_before_optimizer_step": 0, "optimizer_step": 0, "training_step": 0}
        self.grad_norms: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.counts["training_step"] += 1
        x, y, step = batch
        return torch.nn.functional.mse_loss(self.net(x, use_branch=int(step) % 2 == 0), y)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.counts["on_before_optimizer_step"] += 1
        strategy = self.trainer.strategy
        if hasattr(strategy, "grad_norm"):
            self.grad_norms.append(strategy.grad_norm().item())

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        self.counts["optimizer_step"] += 1
        super().optimizer_step(*args, **kwargs)

    def configure_optimizers(self) -> Any:
        opt = OPTIMIZERS[self.optimizer_name](param_groups(self.net, _lr(self.optimizer_name)))
        if not self.schedule:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)}


class LitLoops(LitTiny):
    """LitTiny with validation, test and predict loops."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.training_step(batch, batch_idx), sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self.training_step(batch, batch_idx), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0])


def trainer(strategy: Any, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu", devices=dist.get_world_size(), num_nodes=1, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, deterministic=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(strategy=strategy, **defaults)


def loader(length: int, accumulate: int) -> DataLoader:
    return DataLoader(MicroBatches(length, accumulate), batch_size=None, shuffle=False)


class SpawnLoader:
    """A picklable stand-in for ``loader(length, accumulate)``, built inside each spawned rank."""

    def __init__(self, length: int, accumulate: int) -> None:
        self.length, self.accumulate = length, accumulate

    def __iter__(self):  # noqa: ANN204
        return iter(loader(self.length, self.accumulate))

    def __len__(self) -> int:
        return self.length


class SettledDDPStrategy(DDPStrategy):
    """Lightning's ``ddp`` as a reference, ending on a waited barrier like ``ZeroStrategy``.

    Plain ``ddp_spawn`` ranks abort now and then at exit on torch 2.13 with gloo ("terminate called without an
    active exception", about one run in six here); see [Note: keep finished work handles] in
    ``lightning_zero/sharding/collectives.py``.
    """

    def teardown(self) -> None:
        if dist.is_available() and dist.is_initialized():
            wait_all([dist.barrier(async_op=True)])
        super().teardown()
