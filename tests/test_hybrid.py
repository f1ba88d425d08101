"""Hybrid sharding (``shard_size``): groups of S consecutive ranks shard, groups are replicas. Parity against
DistributedDataParallel over every rank, same seed and data, per-tensor ||delta|| / ||ref|| after 10 steps."""

from __future__ import annotations

from typing import Any

import pytest

from lightning_zero import ZeroConfig, ZeroStrategy
from tests.helpers import relative_errors, train_ddp, train_zero, twin_models
from tests.lit_helpers import LitTiny, SettledDDPStrategy, loader, trainer

STEPS = 10
TOLERANCE = 1e-5


def hybrid_parity(stage: int, optimizer: str, accumulate: int, policy: str, shard_size: int) -> dict[str, float]:
    model, reference = twin_models()
    ref_losses = train_ddp(reference, optimizer, STEPS, accumulate, None)
    config = ZeroConfig(stage=stage, bucket_numel=150, reduce_policy=policy, shard_size=shard_size,
                        **({"persist_numel": 0} if stage == 3 else {}))
    engine, losses = train_zero(model, optimizer, STEPS, config, accumulate, None)
    shards = engine.world_size
    engine.materialize_module()
    errors = relative_errors(model, reference)
    worst_loss = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, ref_losses))
    engine.close()
    return {"worst_param": max(errors.values()), "worst_loss": worst_loss, "shards": shards}


CASES = [
    (stage, opt, acc, policy)
    for stage in (1, 2, 3)
    for opt in ("sgd", "adamw")
    for acc, policy in ((1, "auto"), (4, "boundary"), (4, "every_micro_batch"))
]


@pytest.mark.parametrize(("world_size", "shard_size"), [(4, 2), (6, 2)])
def test_hybrid_parity_with_ddp(pools, world_size: int, shard_size: int) -> None:
    pool = pools(world_size)
    failures = []
    for case in CASES if world_size == 4 else [c for c in CASES if c[2] == 4 or c[1] == "adamw"]:
        result = pool.run(hybrid_parity, *case, shard_size)[0]
        print(f"{world_size // shard_size} replicas x {shard_size} shards {case}: worst param "
              f"{result['worst_param']:.2e}, worst loss {result['worst_loss']:.2e}")
        assert result["shards"] == shard_size
        if not (result["worst_param"] <= TOLERANCE and result["worst_loss"] <= TOLERANCE):
            failures.append((case, result))
    assert not failures, failures


# ----------------------------------------------------------------------------------------- the Trainer
def trainer_hybrid(stage: int, optimizer: str, accumulate: int, precision: str, offload: str) -> dict[str, Any]:
    """Lightning ``ddp`` (32-true), or flat ZeRO of the same stage (bf16-mixed, where ddp's autocast differs),
    against ZeRO with ``shard_size=2``: 10 optimizer steps, same data."""
    models = {}
    reference: Any = (SettledDDPStrategy(find_unused_parameters=True) if precision == "32-true" else
                      ZeroStrategy(stage=stage, bucket_numel=150))
    for name, strategy in (("reference", reference),
                           ("hybrid", ZeroStrategy(stage=stage, bucket_numel=150, shard_size=2, offload=offload))):
        model = LitTiny(optimizer, schedule=True)
        fit = trainer(strategy, accumulate_grad_batches=accumulate, precision=precision)
        fit.fit(model, loader(STEPS * accumulate, accumulate))
        models[name] = model
        if name == "hybrid":
            engine = fit.strategy.engines[0]
            comm = fit.strategy.communication()
            shards, replicas = engine.world_size, engine.dp_size // engine.world_size
    errors = relative_errors(models["hybrid"].net, models["reference"].net)
    return {"worst": max(errors.values()), "shards": shards, "replicas": replicas, "comm": comm}


@pytest.mark.parametrize(("stage", "optimizer", "accumulate", "precision", "offload"), [
    (1, "sgd", 4, "32-true", "none"),
    (2, "adamw", 1, "32-true", "none"),
    (3, "adamw", 4, "32-true", "none"),
    (2, "adamw", 4, "32-true", "optimizer"),
    (3, "sgd", 1, "bf16-mixed", "none"),
])
def test_hybrid_through_the_trainer(pools, stage: int, optimizer: str, accumulate: int, precision: str,
                                    offload: str) -> None:
    result = pools(4).run(trainer_hybrid, stage, optimizer, accumulate, precision, offload)[0]
    print(f"zero{stage} {optimizer} acc {accumulate} {precision} offload={offload}, 2 replicas x 2 shards: "
          f"{result['worst']:.2e} from {'ddp' if precision == '32-true' else 'flat zero'}; bytes of the last step "
          f"{result['comm']}")
    assert (result["shards"], result["replicas"]) == (2, 2)
    assert result["worst"] <= (1e-5 if precision == "32-true" else 1e-3), result
    assert result["comm"].get("all_reduce_across", 0) > 0, result["comm"]
