"""Stage 3 refuses, on every rank and naming the fix, Lightning's weight-averaging and pruning callbacks,
which read parameters between uses; stages 1-2 run them as ddp does, except ModelPruning's lottery-ticket
reset, refused under every stage. A second backward through a retained graph works under every stage."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelPruning, StochasticWeightAveraging
from torch import nn

from lightning_zero import ZeroStrategy
from tests.lit_helpers import LitTiny, SettledDDPStrategy, loader, trainer

CALLBACKS = {
    "swa": lambda: StochasticWeightAveraging(swa_lrs=1e-2),
    "ema": lambda: EMAWeightAveraging(),
    "pruning": lambda: ModelPruning("l1_unstructured", amount=0.5),
    "pruning-no-reset": lambda: ModelPruning("l1_unstructured", amount=0.5, use_lottery_ticket_hypothesis=False),
}


def fit_with(name: str, stage: int) -> str:
    fit = trainer(ZeroStrategy(stage=stage), max_steps=2, max_epochs=2, callbacks=[CALLBACKS[name]()])
    try:
        fit.fit(LitTiny("adamw"), loader(2, 1))
    except ValueError as exc:
        return str(exc)
    return "trained"


@pytest.mark.parametrize("name", ["ema", "pruning-no-reset", "swa"])
def test_callbacks_that_rewrite_weights_are_refused_under_stage_3(pools, name: str) -> None:
    errors = pools(2).run(fit_with, name, 3)
    print(errors[0])
    kind = type(CALLBACKS[name]()).__name__
    assert all(e.startswith(f"{kind} reads and rewrites the model's parameters") and "zero1 or zero2" in e
               for e in errors), errors


class BackwardTwice(LitTiny):
    """Manual optimization with two backward passes through one retained graph per step."""

    def __init__(self) -> None:
        super().__init__("adamw")
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y, step = batch
        loss = nn.functional.mse_loss(self.net(x, use_branch=int(step) % 2 == 0), y)
        self.manual_backward(loss, retain_graph=True)
        self.manual_backward(loss * 0.5)
        optimizer = self.optimizers()
        optimizer.step()
        optimizer.zero_grad()


def fit_backward_twice(stage: int) -> dict[str, torch.Tensor]:
    module = BackwardTwice()
    units = {"persist_numel": 0, "unit_numel": 0} if stage == 3 else {}
    trainer(ZeroStrategy(stage=stage, bucket_numel=150, **units), max_steps=4).fit(module, loader(4, 1))
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_a_second_backward_through_a_retained_graph_works_under_every_stage(pools) -> None:
    """ddp refuses this ("mark a variable ready only once"); stage 1 keeps whole gradients as autograd
    sums them, so it is the reference for stages 2 and 3 (every unit gathered on its own, stage 3)."""
    reference = pools(2).run(fit_backward_twice, 1)[0]
    initial = LitTiny("adamw").state_dict()
    assert any(not torch.equal(reference[k], v) for k, v in initial.items())
    for stage in (2, 3):
        got = pools(2).run(fit_backward_twice, stage)[0]
        worst = max(((got[k] - v).norm() / max(v.norm(), 1e-12)).item() for k, v in reference.items())
        print(f"stage {stage}: two backward passes per step, worst {worst:.1e} against stage 1")
        assert worst <= 1e-5


def weights_with(name: str, kind: str) -> dict[str, torch.Tensor]:
    strategy: Any = SettledDDPStrategy(find_unused_parameters=True) if kind == "ddp" else ZeroStrategy(
        stage=int(kind[-1]), bucket_numel=150)
    module = LitTiny("adamw")
    fit = trainer(strategy, max_steps=4, max_epochs=2, callbacks=[CALLBACKS[name]()])
    fit.fit(module, loader(2, 1))
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_the_lottery_ticket_reset_is_refused_under_every_stage(pools) -> None:
    """Lightning's default ModelPruning replaces each parameter's .data: under zero1 it trained 41% away
    from ddp before this refusal."""
    for stage in (1, 2, 3):
        for error in pools(2).run(fit_with, "pruning", stage):
            assert "ModelPruning" in error and "use_lottery_ticket_hypothesis=False" in error, error


@pytest.mark.parametrize("name", ["ema", "pruning-no-reset", "swa"])
def test_stages_1_and_2_run_these_callbacks_as_ddp_does(pools, name: str) -> None:
    """What the refusal above recommends: the same weights as under ddp."""
    reference = pools(2).run(weights_with, name, "ddp")[0]
    for kind in ("zero1", "zero2"):
        got = pools(2).run(weights_with, name, kind)[0]
        assert got.keys() == reference.keys(), (kind, sorted(got), sorted(reference))
        worst = max(((got[k].float() - v.float()).norm() / max(v.float().norm(), 1e-12)).item()
                    for k, v in reference.items())
        print(f"{name} under {kind}: worst {worst:.1e} against ddp")
        assert worst <= 1e-5, (kind, worst)
