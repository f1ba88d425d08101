"""Lightning's everyday machinery under ZeRO behaves as under ddp: logged values (sync_dist), torchmetrics,
EarlyStopping, LearningRateMonitor, the progress bar printing from rank 0 only, and torch.compile."""

from __future__ import annotations

import contextlib
import csv
import io
import os
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy

from lightning_zero import ZeroStrategy
from tests.dist_pool import RankError
from tests.helpers import relative_errors
from tests.lit_helpers import LitLoops, LitTiny, loader, trainer


class Everyday(LitLoops):
    """Logs a synced training loss, a torchmetrics validation metric, and the LR through a schedule."""

    def __init__(self) -> None:
        super().__init__("adamw", schedule=True)
        import torchmetrics

        self.val_mse = torchmetrics.MeanSquaredError()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, sync_dist=True, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, _ = batch
        self.val_mse(self.net(x), y)
        self.log("val_mse", self.val_mse, on_epoch=True, prog_bar=True)


def everyday_run(tmp: str, name: str) -> dict[str, Any]:
    strategy = DDPStrategy(find_unused_parameters=True) if name == "ddp" else ZeroStrategy(stage=int(name[-1]))
    stop = EarlyStopping(monitor="val_mse", patience=1, min_delta=1.0, mode="min")  # stops after epoch 2
    fit = trainer(strategy, max_epochs=6, logger=CSVLogger(os.path.join(tmp, name), name="", version=""),
                  callbacks=[stop, LearningRateMonitor(logging_interval="step")], enable_progress_bar=True,
                  log_every_n_steps=1)
    module = Everyday()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        fit.fit(module, loader(4, 1), loader(2, 1))
    rows = []
    if fit.is_global_zero:
        with open(os.path.join(tmp, name, "metrics.csv")) as f:
            rows = list(csv.DictReader(f))
    return {"epochs": fit.current_epoch, "stopped": stop.stopped_epoch, "rows": rows, "out": out.getvalue(),
            "err": err.getvalue(), "net": module.net}


def test_logging_metrics_callbacks_and_progress_bar_match_ddp(pools, tmp_path) -> None:
    tmp = str(tmp_path)
    reference = pools(2).run(everyday_run, tmp, "ddp")
    for name in ("zero2", "zero3"):
        results = pools(2).run(everyday_run, tmp, name)
        assert results[0]["epochs"] == reference[0]["epochs"] and results[0]["stopped"] == reference[0]["stopped"]
        assert [r.keys() for r in results[0]["rows"]] == [r.keys() for r in reference[0]["rows"]]
        for row, expected in zip(results[0]["rows"], reference[0]["rows"]):
            for key, value in expected.items():
                if value and key not in ("epoch", "step"):
                    assert abs(float(row[key]) - float(value)) <= 1e-5 * max(1.0, abs(float(value))), (key, row)
                else:
                    assert row[key] == value, (key, row, expected)
        worst = max(relative_errors(results[0]["net"], reference[0]["net"]).values())
        print(f"{name}: {len(results[0]['rows'])} logged rows equal to ddp's, stopped at epoch "
              f"{results[0]['stopped']}, weights {worst:.1e}")
        assert worst <= 1e-5
        # the progress bar is rank 0's alone, and ZeRO adds no output of its own on any rank
        assert "train_loss" in results[0]["out"] + results[0]["err"]
        assert "train_loss" not in results[1]["out"] + results[1]["err"]
        assert len(results[1]["out"] + results[1]["err"]) <= len(reference[1]["out"] + reference[1]["err"])


class CompiledTiny(LitTiny):
    """LitTiny whose training step goes through ``forward``, so ``torch.compile(module)`` compiles it."""

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        return self.net(x, use_branch=use_branch)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, step = batch
        return torch.nn.functional.mse_loss(self(x, use_branch=int(step) % 2 == 0), y)


def compiled_run(stage: int) -> float:
    nets = {}
    for name in ("ddp", "zero"):
        module = CompiledTiny("adamw")
        strategy = DDPStrategy(find_unused_parameters=True) if name == "ddp" else ZeroStrategy(stage=stage)
        trainer(strategy, max_steps=6).fit(torch.compile(module), loader(8, 1))
        nets[name] = module.net
    return max(relative_errors(nets["zero"], nets["ddp"]).values())


@pytest.mark.parametrize("stage", [1, 2])
def test_torch_compile_matches_compiled_ddp(pools, stage: int) -> None:
    worst = max(pools(2).run(compiled_run, stage))
    print(f"torch.compile (inductor) under zero{stage} against compiled ddp: {worst:.1e}")
    assert worst <= 1e-6


def test_torch_compile_with_stage_3_is_refused_with_the_reason(pools) -> None:
    with pytest.raises(RankError) as info:
        pools(2).run(compiled_run, 3)
    assert all("does not work with ZeRO stage 3 yet" in text for text in info.value.tracebacks.values())
