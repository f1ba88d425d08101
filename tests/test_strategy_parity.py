"""ZeroStrategy inside Lightning's Trainer against Lightning's own ``ddp``: same seed and data, per-tensor
||delta|| / ||ref|| <= 1e-5 after 10 optimizer steps, and the same hooks per optimizer step."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

import lightning_zero  # noqa: F401 - registers the strategy names
from lightning_zero import ZeroStrategy
from tests.helpers import relative_errors
from tests.lit_helpers import LitTiny, loader, trainer

STEPS = 10


def trainer_parity(stage: int, optimizer: str, accumulate: int, policy: str, clip: tuple[str, float] | None,
                   extra_batches: int) -> dict[str, Any]:
    clip_kwargs = {} if clip is None else {"gradient_clip_algorithm": clip[0], "gradient_clip_val": clip[1]}
    length = STEPS * accumulate + extra_batches  # extra: Lightning forces a step on the epoch's last batch
    results = {}
    models = {}
    for name, strategy in (
        ("ddp", DDPStrategy(find_unused_parameters=True)),
        ("zero", ZeroStrategy(stage=stage, reduce_policy=policy, bucket_numel=150)),
    ):
        model = LitTiny(optimizer, schedule=True)
        fit = trainer(strategy, accumulate_grad_batches=accumulate, **clip_kwargs)
        fit.fit(model, loader(length, accumulate))
        models[name] = model
        results[name] = {"counts": dict(model.counts), "global_step": fit.global_step}
    errors = relative_errors(models["zero"].net, models["ddp"].net)
    return {"worst": max(errors.values()), **results, "grad_norms": models["zero"].grad_norms}


CASES = [
    (1, "sgd", 1, "auto", None, 0),
    (2, "sgd", 1, "auto", None, 0),
    (1, "sgd", 4, "boundary", None, 2),
    (2, "sgd", 4, "boundary", None, 2),
    (2, "sgd", 4, "every_micro_batch", None, 2),
    (1, "adamw", 4, "every_micro_batch", None, 0),
    (2, "sgd", 1, "auto", ("norm", 0.3), 0),
    (1, "sgd", 4, "boundary", ("value", 0.02), 0),
    (2, "adamw", 4, "auto", ("norm", 0.3), 1),
    (3, "sgd", 1, "auto", None, 0),
    (3, "sgd", 4, "boundary", ("value", 0.02), 2),
    (3, "adamw", 4, "auto", ("norm", 0.3), 1),
]


@pytest.mark.parametrize("world_size", [2, 3])
def test_trainer_parity_with_lightning_ddp(pools, world_size) -> None:
    cases = CASES if world_size == 2 else [CASES[3], CASES[6], CASES[8], CASES[11]]
    failures = []
    for case in cases:
        result = pools(world_size).run(trainer_parity, *case)[0]
        zero, ddp = result["zero"], result["ddp"]
        print(f"ws={world_size} {case}: worst {result['worst']:.2e}, steps {zero['global_step']}, "
              f"hooks {zero['counts']}")
        ok = result["worst"] <= 1e-5 and zero == ddp
        ok = ok and zero["counts"]["on_before_optimizer_step"] == zero["global_step"] == STEPS + (case[5] > 0)
        ok = ok and all(torch.isfinite(torch.tensor(result["grad_norms"])))
        if not ok:
            failures.append((case, result))
    assert not failures, failures


class CustomClipping(LitTiny):
    """A user's own clipping rule: clip by norm only after the second step."""

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        if self.trainer.global_step >= 2:
            self.clip_gradients(optimizer, gradient_clip_val=0.2, gradient_clip_algorithm="norm")


def custom_clipping_parity(stage: int) -> float:
    from tests.helpers import relative_errors

    nets = {}
    for name, strategy in (("ddp", DDPStrategy(find_unused_parameters=True)),
                           ("zero", ZeroStrategy(stage=stage, bucket_numel=150))):
        model = CustomClipping("sgd")
        trainer(strategy, accumulate_grad_batches=2).fit(model, loader(2 * STEPS, 2))
        nets[name] = model.net
    return max(relative_errors(nets["zero"], nets["ddp"]).values())


@pytest.mark.parametrize("stage", [1, 2])
def test_users_configure_gradient_clipping_is_honoured(pools, stage: int) -> None:
    worst = max(pools(2).run(custom_clipping_parity, stage))
    print(f"custom clipping stage {stage}: {worst:.2e}")
    assert worst <= 1e-5
