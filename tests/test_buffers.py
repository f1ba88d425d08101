"""Buffers as under ``ddp``: rank 0's broadcast before each training step (BatchNorm statistics, and the
validation metrics computed with them, equal ``ddp``'s), ``broadcast_buffers=False`` as ``ddp``'s, and
``sync_batchnorm=True`` refused by name on CPU instead of ignored."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lightning_zero import ZeroStrategy
from tests.lit_helpers import loader, trainer


class LitNorm(pl.LightningModule):
    """A BatchNorm between two linear layers; each rank sees other rows, so its running statistics differ."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(7, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
        self.val_losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        return nn.functional.mse_loss(self.net(x + dist.get_rank()), y)  # rank-dependent statistics

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, _ = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.val_losses.append(float(self.trainer.callback_metrics["val_loss"]))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def fit_norm(kind: str, broadcast: bool) -> dict[str, Any]:
    if kind == "ddp":
        strategy: Any = DDPStrategy(broadcast_buffers=broadcast)
    else:
        strategy = ZeroStrategy(stage=int(kind[-1]), broadcast_buffers=broadcast)
    fit = trainer(strategy, max_steps=4, val_check_interval=1, check_val_every_n_epoch=None, limit_val_batches=1,
                  num_sanity_val_steps=0)
    module = LitNorm()
    fit.fit(module, loader(8, 1), loader(1, 1))
    norm = module.net[1]
    return {"val": module.val_losses, "mean": norm.running_mean.clone(), "var": norm.running_var.clone()}


def test_buffers_and_validation_follow_ddp(pools) -> None:
    reference = {broadcast: pools(2).run(fit_norm, "ddp", broadcast) for broadcast in (True, False)}
    # The case can fail: the broadcast changes what rank 1 validates with.
    assert reference[True][1]["val"] != pytest.approx(reference[False][1]["val"], rel=1e-6, abs=0)
    for broadcast, kind in ((True, "zero2"), (True, "zero3"), (False, "zero2")):
        result = pools(2).run(fit_norm, kind, broadcast)
        for rank, (got, want) in enumerate(zip(result, reference[broadcast])):
            print(f"{kind} broadcast={broadcast} rank {rank}: val {got['val']} (ddp {want['val']})")
            assert got["val"] == pytest.approx(want["val"], rel=1e-6, abs=0)
            assert torch.allclose(got["mean"], want["mean"], rtol=1e-6, atol=1e-7)
            assert torch.allclose(got["var"], want["var"], rtol=1e-6, atol=1e-7)


def sync_batchnorm_on_cpu() -> str:
    fit = trainer(ZeroStrategy(stage=2), max_steps=1, sync_batchnorm=True)
    try:
        fit.fit(LitNorm(), loader(2, 1))
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_sync_batchnorm_is_refused_by_name_on_cpu(pools) -> None:
    for error in pools(2).run(sync_batchnorm_on_cpu):
        assert "sync_batchnorm=True" in error and "SyncBatchNorm" in error
