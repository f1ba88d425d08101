"""Lightning's checkpoint calls on what ZeroStrategy saves, as under ``ddp``: ``Trainer.validate/test
(ckpt_path=...)`` on a sharded directory, ``save_checkpoint`` before ``fit``, and the user's hooks in
``ddp``'s order on resume (stages 1-2; stage 3 restores after setup, as Lightning's FSDP and DeepSpeed do)."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist

from lightning_zero import ZeroStrategy, is_sharded_checkpoint
from tests.lit_helpers import LitLoops, SettledDDPStrategy, loader, trainer


def _strategy(kind: str) -> Any:
    # LitTiny skips a branch on odd steps: ddp needs find_unused_parameters for it.
    return SettledDDPStrategy(find_unused_parameters=True) if kind == "ddp" else ZeroStrategy(stage=int(kind[-1]))


def validate_from_directory(tmp: str) -> dict[str, Any]:
    """zero3 trains and saves a sharded directory; every strategy validates and tests from it."""
    path = os.path.join(tmp, "z3.ckpt")
    fit = trainer(_strategy("zero3"), max_steps=3)
    fit.fit(LitLoops("adamw"), loader(3, 1))
    fit.save_checkpoint(path)
    losses = {}
    for kind in ("zero1", "zero2", "zero3", "ddp"):
        check = trainer(_strategy(kind))
        val = check.validate(LitLoops("adamw"), loader(2, 1), ckpt_path=path, verbose=False)[0]["val_loss"]
        test = check.test(LitLoops("adamw"), loader(2, 1), ckpt_path=path, verbose=False)[0]["test_loss"]
        losses[kind] = (val, test)
    return {"sharded": is_sharded_checkpoint(path), "losses": losses}


def test_validate_and_test_from_a_sharded_directory(pools, tmp_path) -> None:
    result = pools(2).run(validate_from_directory, str(tmp_path))[0]
    assert result["sharded"]
    print(result["losses"])
    reference = result["losses"]["ddp"]
    for kind, losses in result["losses"].items():
        assert losses == pytest.approx(reference, rel=1e-6, abs=0), kind


def _save_before_fit(path: str, kind: str) -> dict[str, torch.Tensor]:
    """In this process, with no process group: ``trainer.save_checkpoint`` before ``fit``, as a user can."""
    assert not dist.is_initialized()
    torch.manual_seed(0)
    module = LitLoops("adamw")
    early = pl.Trainer(strategy=_strategy(kind), accelerator="cpu", devices=2, logger=False,
                       enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    early.strategy.connect(module)  # attached, not launched: what a save before fit sees
    early.save_checkpoint(path)
    return {k: v.clone() for k, v in module.state_dict().items()}


def resume_from_early(path: str, kind: str) -> dict[str, Any]:
    resumed = trainer(_strategy(kind), max_steps=2)
    module = LitLoops("adamw")
    with torch.no_grad():
        for param in module.parameters():
            param.add_(1.0)  # the checkpoint, not this, must decide the starting point
    resumed.fit(module, loader(2, 1), ckpt_path=path)
    return {"trained": module.state_dict(), "steps": resumed.global_step}


@pytest.mark.parametrize("kind", ["ddp", "zero2", "zero3"])
def test_save_checkpoint_before_fit_as_under_ddp(pools, tmp_path, kind: str) -> None:
    path = str(tmp_path / f"before-{kind}.ckpt")
    untrained = _save_before_fit(path, kind)
    assert os.path.isfile(path)  # one plain file, as ddp writes
    results = pools(2).run(resume_from_early, path, kind)
    assert results[0]["steps"] == 2
    # Two steps from the saved (untrained) weights, not from the shifted module passed to fit.
    for name, value in results[0]["trained"].items():
        assert (value - untrained[name]).abs().max() < 0.5, name


class HookOrder(LitLoops):
    """Records the user hooks Lightning calls around a resume."""

    def __init__(self) -> None:
        super().__init__("adamw")
        self.calls: list[str] = []

    def setup(self, stage: str) -> None:
        self.calls.append("setup")

    def configure_optimizers(self) -> Any:
        self.calls.append("configure_optimizers")
        return super().configure_optimizers()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.calls.append("on_load_checkpoint")

    def on_fit_start(self) -> None:
        self.calls.append("on_fit_start")


def hook_order_on_resume(tmp: str, kind: str) -> list[str]:
    path = os.path.join(tmp, f"order-{kind}.ckpt")
    first = trainer(_strategy(kind), max_steps=1)
    first.fit(LitLoops("adamw"), loader(1, 1))
    first.save_checkpoint(path)
    module = HookOrder()
    trainer(_strategy(kind), max_steps=2).fit(module, loader(2, 1), ckpt_path=path)
    dist.barrier()
    return module.calls


def test_hooks_run_in_ddp_order_on_resume(pools, tmp_path) -> None:
    orders = {kind: pools(2).run(hook_order_on_resume, str(tmp_path), kind)[0]
              for kind in ("ddp", "zero1", "zero2", "zero3")}
    print(orders)
    assert orders["ddp"].index("on_load_checkpoint") < orders["ddp"].index("configure_optimizers")
    assert orders["zero1"] == orders["zero2"] == orders["ddp"]
    # Stage 3 restores into the engine's slices, after setup (documented on restore_checkpoint_after_setup).
    assert sorted(orders["zero3"]) == sorted(orders["ddp"])
    assert orders["zero3"].index("on_load_checkpoint") > orders["zero3"].index("configure_optimizers")


def ema_resume(tmp: str, kind: str) -> dict[str, Any]:
    """EMAWeightAveraging over 6 steps, saved at step 3 and resumed from there; then validation from the
    saved checkpoint (the average is what it evaluates)."""
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    path = os.path.join(tmp, kind)
    saver = ModelCheckpoint(dirpath=path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    first = trainer(_strategy(kind), max_steps=3, callbacks=[EMAWeightAveraging(decay=0.5), saver],
                    enable_checkpointing=True)
    torch.manual_seed(0)
    first.fit(LitLoops("adamw"), loader(6, 1))
    saved = os.path.join(path, "step=3.ckpt")
    module = LitLoops("adamw")
    trainer(_strategy(kind), max_steps=6, callbacks=[EMAWeightAveraging(decay=0.5)]).fit(
        module, loader(6, 1), ckpt_path=saved)
    val = trainer(_strategy(kind)).validate(LitLoops("adamw"), loader(2, 1), ckpt_path=saved, verbose=False)
    return {"final": {k: v.clone() for k, v in module.state_dict().items()}, "val": val[0]["val_loss"]}


def test_ema_weight_averaging_resumes_as_under_ddp(pools, tmp_path) -> None:
    results = {kind: pools(2).run(ema_resume, str(tmp_path), kind)[0] for kind in ("ddp", "zero1", "zero2")}
    reference = results["ddp"]
    for kind in ("zero1", "zero2"):
        got = results[kind]
        print(f"{kind}: val from the saved average {got['val']} (ddp {reference['val']})")
        assert got["val"] == pytest.approx(reference["val"], rel=1e-6, abs=0)
        for name, value in reference["final"].items():
            assert torch.allclose(got["final"][name], value, rtol=1e-5, atol=1e-7), (kind, name)


def fresh_after_fit(tmp: str, kind: str) -> bool:
    """The same Trainer fits one module, then tests a fresh one from the saved checkpoint: the fresh one
    must get the saved weights (not the engines of the fit before)."""
    path = os.path.join(tmp, f"again-{kind}.ckpt")
    fit = trainer(_strategy(kind), max_steps=3)
    trained = LitLoops("adamw")
    fit.fit(trained, loader(3, 1))
    fit.save_checkpoint(path)
    expected = {k: v.clone() for k, v in trained.state_dict().items()}
    fresh = LitLoops("adamw")
    with torch.no_grad():
        for param in fresh.parameters():
            param.add_(1.0)
    fit.test(fresh, loader(1, 1), ckpt_path=path, verbose=False)
    return all(torch.allclose(fresh.state_dict()[k], v) for k, v in expected.items())


@pytest.mark.parametrize("kind", ["zero1", "zero2", "zero3"])
def test_a_second_module_loads_the_checkpoint_not_the_first(pools, tmp_path, kind: str) -> None:
    assert all(pools(2).run(fresh_after_fit, str(tmp_path), kind))
