"""Which collectives run when: counted by wrapping the engine's collective functions."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_zero import ZeroConfig
from lightning_zero.sharding import collectives
from tests.helpers import build_model, loss_of, train_zero


def count_collectives(stage: int, policy: str, accumulate: int) -> dict[str, object]:
    model = build_model()
    engine, _ = train_zero(model, "sgd", 0, ZeroConfig(stage=stage, bucket_numel=150, reduce_policy=policy))
    calls: list[tuple[str, torch.dtype]] = []
    original_rs, original_ag = collectives._reduce_scatter, collectives._all_gather
    original_sends = collectives._reduce_scatter_by_sends  # how gloo runs a reduce-scatter
    original_bc = collectives._all_gather_by_broadcasts  # ... and an all-gather

    def reduce_scatter(output, flat, **kwargs):
        calls.append(("reduce_scatter", flat.dtype))
        return original_rs(output, flat, **kwargs)

    def reduce_scatter_by_sends(output, source, *args):
        calls.append(("reduce_scatter", source.dtype))
        return original_sends(output, source, *args)

    def all_gather(flat, shard, **kwargs):
        calls.append(("all_gather", flat.dtype))
        return (original_bc if dist.get_backend() == "gloo" else original_ag)(flat, shard, **kwargs)

    collectives._reduce_scatter, collectives._all_gather = reduce_scatter, all_gather
    collectives._reduce_scatter_by_sends = reduce_scatter_by_sends
    collectives._all_gather_by_broadcasts = all_gather
    per_micro_batch = []
    grads_after_backward = []
    try:
        for micro in range(accumulate):
            before = len(calls)
            if micro < accumulate - 1:
                with engine.no_sync():
                    loss_of(model, 0, micro, accumulate).backward()
            else:
                loss_of(model, 0, micro, accumulate).backward()
            per_micro_batch.append(len(calls) - before)
            grads_after_backward.append(sum(p.grad is not None for p in model.parameters()))
        before = len(calls)
        engine.step()
        at_step = [name for name, _ in calls[before:]]
    finally:
        collectives._reduce_scatter, collectives._all_gather = original_rs, original_ag
        collectives._reduce_scatter_by_sends = original_sends
        collectives._all_gather_by_broadcasts = original_bc
    trainable = sum(b.trainable for b in engine.layout.buckets)
    engine.close()
    return {"per_micro_batch": per_micro_batch, "at_step": at_step, "trainable": trainable,
            "dtypes": sorted({str(d) for _, d in calls}), "grads_after_backward": grads_after_backward}


@pytest.mark.parametrize(("stage", "policy"), [(1, "boundary"), (2, "boundary"), (2, "every_micro_batch"),
                                               (1, "every_micro_batch")])
def test_collectives_per_micro_batch(pools, stage, policy) -> None:
    result = pools(2).run(count_collectives, stage, policy, 4)[0]
    buckets = result["trainable"]
    if policy == "boundary":
        assert result["per_micro_batch"] == [0, 0, 0, buckets]  # nothing before the boundary
    else:
        assert result["per_micro_batch"] == [buckets] * 4
    assert result["at_step"] == ["all_gather"] * buckets  # reductions all finished during backward
    assert result["dtypes"] == ["torch.float32"]
    trainable_params = 11
    if stage == 1:  # full gradients stay, as views into the bucket buffers
        assert result["grads_after_backward"][-1] == trainable_params
    else:  # stage 2 hands every reduced gradient over and frees it
        assert result["grads_after_backward"][-1] == 0


def per_step_counters(stage: int) -> dict[str, object]:
    """``ZeroStrategy.communication()`` per optimizer step through the Trainer, with validation in between."""
    import lightning.pytorch as pl

    from lightning_zero import ZeroStrategy
    from tests.lit_helpers import LitLoops, loader, trainer

    seen: list[dict[str, int]] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *_: object) -> None:
            seen.append(trainer.strategy.communication())

    fit = trainer(ZeroStrategy(stage=stage, bucket_numel=150), max_steps=4, val_check_interval=1,
                  check_val_every_n_epoch=None, limit_val_batches=1, callbacks=[Record()])
    module = LitLoops("sgd")
    fit.fit(module, loader(8, 1), loader(1, 1))
    engine = fit.strategy.engines[0]
    padded = sum(b.padded_numel for b in engine.layout.buckets if b.trainable) * 4
    return {"seen": seen, "padded_trainable_bytes": padded}


@pytest.mark.parametrize("stage", [2, 3])
def test_strategy_reports_each_steps_communication(pools, stage: int) -> None:
    result = pools(2).run(per_step_counters, stage)[0]
    seen = result["seen"]
    print(f"zero{stage} per step: {seen[-1]}")
    assert len(seen) == 4 and all(step == seen[1] for step in seen[1:])  # validation gathers left out
    # every trainable bucket's fp32 gradient is reduce-scattered once per step (accumulate 1)
    assert seen[-1]["reduce_scatter"] == result["padded_trainable_bytes"]
