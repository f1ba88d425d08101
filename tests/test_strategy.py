"""ZeroStrategy's names, settings, precision pairing, bad input and lifecycle inside Lightning."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher

import lightning_zero  # noqa: F401 - registers the names
from lightning_zero import ZeroPrecision, ZeroStrategy
from tests.lit_helpers import LitLoops, LitTiny, loader, trainer

NAMES = {
    "zero1": (1, _SubprocessScriptLauncher, None),
    "zero2": (2, _SubprocessScriptLauncher, None),
    "zero1_spawn": (1, _MultiProcessingLauncher, "spawn"),
    "zero2_spawn": (2, _MultiProcessingLauncher, "spawn"),
    "zero1_notebook": (1, _MultiProcessingLauncher, "fork"),
    "zero2_notebook": (2, _MultiProcessingLauncher, "fork"),
    "zero3": (3, _SubprocessScriptLauncher, None),
    "zero3_spawn": (3, _MultiProcessingLauncher, "spawn"),
    "zero3_notebook": (3, _MultiProcessingLauncher, "fork"),
    "zero1_offload": (1, _SubprocessScriptLauncher, None),
    "zero2_offload": (2, _SubprocessScriptLauncher, None),
    "zero3_offload": (3, _SubprocessScriptLauncher, None),
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_each_name_gives_its_stage_and_launcher(name: str) -> None:
    stage, launcher, start_method = NAMES[name]
    assert StrategyRegistry[name]["init_params"]["stage"] == stage
    fit = pl.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False)
    assert isinstance(fit.strategy, ZeroStrategy) and fit.strategy.config.stage == stage
    assert isinstance(fit.strategy.launcher, launcher)
    if start_method is not None:
        assert fit.strategy.launcher._start_method == start_method
    assert isinstance(fit.strategy.precision_plugin, ZeroPrecision)
    assert fit.strategy.launcher.is_interactive_compatible == (start_method == "fork")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stage": 4}, "stage must be one of"),
        ({"reduce_policy": "sometimes"}, "reduce_policy must be one of"),
        ({"bucket_numel": 0}, "bucket_numel must be a positive integer"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ZeroStrategy(**kwargs)


@pytest.mark.parametrize(("precision", "storage", "master"), [
    ("32-true", torch.float32, torch.float32),
    ("bf16-mixed", torch.bfloat16, torch.float32),
    ("bf16-true", torch.bfloat16, torch.bfloat16),
    ("16-true", torch.float16, torch.float16),
])
def test_trainer_precision_is_paired_with_zero_precision(precision: str, storage, master) -> None:
    fit = pl.Trainer(strategy="zero2", accelerator="cpu", devices=2, precision=precision, logger=False)
    plugin = fit.strategy.precision_plugin
    assert isinstance(plugin, ZeroPrecision) and plugin.precision == precision
    assert (plugin.policy.storage, plugin.policy.master) == (storage, master)


def test_unsupported_precision_fails_when_the_trainer_is_built() -> None:
    with pytest.raises(ValueError, match="cannot run DoublePrecision"):
        pl.Trainer(strategy="zero2", accelerator="cpu", devices=2, precision="64-true")


def test_explicit_zero_precision_is_kept() -> None:
    plugin = ZeroPrecision("32-true")
    fit = pl.Trainer(strategy=ZeroStrategy(stage=1), accelerator="cpu", devices=2, plugins=[plugin])
    assert fit.strategy.precision_plugin is plugin
    with pytest.raises(ValueError, match="not supported by ZeRO"):
        ZeroPrecision("64-true")  # type: ignore[arg-type]


def fit_then_loops_then_fit_again(stage: int) -> dict[str, Any]:
    module = LitLoops("adamw")
    trainer(ZeroStrategy(stage=stage, bucket_numel=150)).fit(module, loader(6, 1), loader(2, 1))
    after_fit = {n: p.detach().clone() for n, p in module.net.named_parameters()}
    gathered = [torch.empty(0)] * torch.distributed.get_world_size()
    flat = torch.cat([p.reshape(-1) for p in after_fit.values()])
    torch.distributed.all_gather_object(gathered, flat)
    same_on_all_ranks = all(torch.equal(flat, other) for other in gathered)
    loops = trainer(ZeroStrategy(stage=stage))
    val = loops.validate(module, loader(2, 1), verbose=False)[0]["val_loss"]
    test = loops.test(module, loader(2, 1), verbose=False)[0]["test_loss"]
    predictions = loops.predict(module, loader(2, 1))
    hooks_before = sum(len(p._post_accumulate_grad_hooks or {}) for p in module.parameters())
    second = trainer(ZeroStrategy(stage=stage, bucket_numel=150), max_steps=3)
    second.fit(module, loader(6, 1))
    hooks_after = sum(len(p._post_accumulate_grad_hooks or {}) for p in module.parameters())
    moved = max((p.detach() - after_fit[n]).abs().max().item() for n, p in module.net.named_parameters())
    return {"same_on_all_ranks": same_on_all_ranks, "val": val, "test": test,
            "predictions": len(predictions), "hooks": (hooks_before, hooks_after), "moved": moved,
            "second_steps": second.global_step}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_lifecycle_validate_test_predict_and_fit_again(pools, stage: int) -> None:
    for result in pools(2).run(fit_then_loops_then_fit_again, stage):
        assert result["same_on_all_ranks"]
        assert result["val"] > 0 and result["test"] > 0 and result["predictions"] == 2
        assert result["hooks"] == (0, 0)  # teardown removed every gradient hook
        assert result["second_steps"] == 3 and result["moved"] > 0


class AddGroupMidFit(pl.Callback):
    """A user's own unfreezing, without BaseFinetuning: a frozen layer joins the optimizer at step 2."""

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, *_: Any) -> None:
        if trainer.global_step == 2:
            module.net.frozen.requires_grad_(True)
            trainer.optimizers[0].add_param_group({"params": list(module.net.frozen.parameters()), "lr": 0.01})


def add_param_group_mid_fit(stage: int) -> list[float]:
    module = LitTiny()
    before = module.net.frozen.weight.detach().clone()
    fit = trainer(ZeroStrategy(stage=stage), callbacks=[AddGroupMidFit()])
    fit.fit(module, loader(6, 1))
    after = module.net.frozen.weight.detach()
    gathered = [torch.zeros_like(after) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, after.contiguous())
    return [float((after - before).norm()), float(max((g - gathered[0]).abs().max() for g in gathered)),
            float(len(fit.optimizers[0].param_groups))]


@pytest.mark.parametrize("stage", [1, 3])
def test_add_param_group_mid_fit_replans_and_trains_the_new_group(pools, stage: int) -> None:
    moved, spread, groups = pools(2).run(add_param_group_mid_fit, stage)[0]
    assert moved > 1e-3 and spread == 0.0 and groups == 3, (moved, spread, groups)


def test_spawn_returns_trained_weights_to_the_parent() -> None:
    """zero2_spawn and ddp_spawn from this (parent) process: the parent's module ends equal."""
    from tests.helpers import relative_errors
    from tests.lit_helpers import SettledDDPStrategy, SpawnLoader

    results = {}
    for name in ("ddp_spawn", "zero2_spawn", "zero3_spawn"):
        module = LitTiny("sgd")
        initial = module.net.head.weight.detach().clone()
        strategy = name
        if name == "ddp_spawn":
            strategy = SettledDDPStrategy(start_method="spawn", find_unused_parameters=True)
        fit = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, accumulate_grad_batches=2)
        fit.fit(module, SpawnLoader(8, 2))
        assert not torch.equal(module.net.head.weight, initial)
        results[name] = module.net
    reference = results["ddp_spawn"]
    for name in ("zero2_spawn", "zero3_spawn"):
        worst = max(relative_errors(results[name], reference).values())
        print(f"{name} parity in the parent: {worst:.2e}")
        assert worst <= 1e-5


class UnevenLoops(LitLoops):
    """Rank 0 validates on three batches, the others on one, inside fit (stage 3)."""

    def val_dataloader(self) -> Any:
        return loader(3 if torch.distributed.get_rank() == 0 else 1, 1)


def uneven_loops_stage3() -> dict[str, Any]:
    module = UnevenLoops("sgd")
    fit = trainer(ZeroStrategy(stage=3), max_steps=4, num_sanity_val_steps=2, val_check_interval=2,
                  check_val_every_n_epoch=None)
    fit.fit(module, loader(8, 1))
    return {"steps": fit.global_step, "val": float(fit.callback_metrics["val_loss"])}


def test_stage3_uneven_validation_does_not_hang(pools) -> None:
    import time

    start = time.perf_counter()
    results = pools(2).run(uneven_loops_stage3)
    elapsed = time.perf_counter() - start
    print(f"uneven validation under zero3: {elapsed:.1f}s")
    assert all(r["steps"] == 4 for r in results) and results[0]["val"] == results[1]["val"]
    assert elapsed < 60


class WithMetric(LitLoops):
    def __init__(self) -> None:
        super().__init__("sgd")
        import torchmetrics

        self.metric = torchmetrics.MeanSquaredError()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, step = batch
        self.metric(self.net(x), y)
        self.log("val_mse", self.metric, on_epoch=True)


def metric_synced_under_zero3() -> float:
    module = WithMetric()
    fit = trainer(ZeroStrategy(stage=3), max_steps=2, limit_val_batches=2)
    fit.fit(module, loader(2, 1), loader(2 if torch.distributed.get_rank() == 0 else 1, 1))
    return float(fit.callback_metrics["val_mse"])


def test_torchmetrics_synced_across_ranks_under_zero3(pools) -> None:
    values = pools(2).run(metric_synced_under_zero3)
    assert values[0] == values[1] and values[0] > 0
