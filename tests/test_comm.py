"""The comm layer: the NCCL call sequence (``reduce_scatter_tensor``/``all_gather_into_tensor``, forced with
``comm="native"``) run on gloo against DDP, and a step that reads the host once (one flag exchange, no
``.item()``)."""

from __future__ import annotations

import pytest
import torch

from lightning_zero import ZeroConfig
from lightning_zero.sharding import collectives
from tests.helpers import relative_errors, train_ddp, train_zero, twin_models

STEPS = 10
TOLERANCE = 1e-5


def native_parity(stage: int, optimizer: str, accumulate: int, policy: str,
                  clip: tuple[str, float] | None) -> dict[str, object]:
    calls: list[str] = []
    originals = (collectives._reduce_scatter, collectives._all_gather,
                 collectives._reduce_scatter_by_sends, collectives._all_gather_by_broadcasts)

    def counted(name: str, function):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls.append(name)
            return function(*args, **kwargs)
        return wrapper

    collectives._reduce_scatter = counted("reduce_scatter_tensor", originals[0])
    collectives._all_gather = counted("all_gather_into_tensor", originals[1])
    collectives._reduce_scatter_by_sends = counted("gloo substitute", originals[2])
    collectives._all_gather_by_broadcasts = counted("gloo substitute", originals[3])
    try:
        model, reference = twin_models()
        train_ddp(reference, optimizer, STEPS, accumulate, clip)
        config = ZeroConfig(stage=stage, bucket_numel=150, reduce_policy=policy, comm="native",
                            **({"persist_numel": 0} if stage == 3 else {}))
        engine, _ = train_zero(model, optimizer, STEPS, config, accumulate, clip)
        engine.materialize_module()
    finally:
        (collectives._reduce_scatter, collectives._all_gather,
         collectives._reduce_scatter_by_sends, collectives._all_gather_by_broadcasts) = originals
    engine.close()
    return {"worst": max(relative_errors(model, reference).values()), "calls": sorted(set(calls))}


CASES = [
    (1, "sgd", 4, "boundary", ("norm", 0.5)),
    (2, "sgd", 4, "every_micro_batch", None),
    (2, "adamw", 1, "auto", ("value", 0.01)),
    (3, "sgd", 1, "auto", ("norm", 0.5)),
]


@pytest.mark.parametrize("world_size", [2, 3])
def test_native_collectives_match_ddp(pools, world_size: int) -> None:
    for case in CASES:
        result = pools(world_size).run(native_parity, *case)[0]
        print(f"ws={world_size} {case}: worst {result['worst']:.1e}, calls {result['calls']}")
        assert result["worst"] <= TOLERANCE
        assert result["calls"] == ["all_gather_into_tensor", "reduce_scatter_tensor"]


def host_reads_per_step(stage: int) -> dict[str, int]:
    """Count ``Tensor.item`` calls and flag exchanges over backward, clipping and the step."""
    model, _ = twin_models()
    config = ZeroConfig(stage=stage, bucket_numel=150, **({"persist_numel": 0} if stage == 3 else {}))
    engine, _ = train_zero(model, "sgd", 1, config)  # the first step adopts the observed order
    counts = {"item": 0, "exchange_flags": 0}
    item, exchange = torch.Tensor.item, collectives.exchange_flags

    def counted_item(self: torch.Tensor) -> object:
        counts["item"] += 1
        return item(self)

    def counted_exchange(*args: object) -> torch.Tensor:
        counts["exchange_flags"] += 1
        return exchange(*args)

    from lightning_zero.sharding import engine as engine_module

    torch.Tensor.item = counted_item  # type: ignore[method-assign]
    engine_module.exchange_flags = counted_exchange
    try:
        for step in range(1, 4):
            from tests.helpers import loss_of

            loss_of(model, step, 0, 1).backward()
            engine.clip_grad_norm_(0.5)
            engine.step()
    finally:
        torch.Tensor.item = item  # type: ignore[method-assign]
        engine_module.exchange_flags = exchange
    engine.close()
    return counts


@pytest.mark.parametrize("stage", [2, 3])
def test_one_host_read_per_step(pools, stage: int) -> None:
    for counts in pools(2).run(host_reads_per_step, stage):
        assert counts == {"item": 0, "exchange_flags": 3}
