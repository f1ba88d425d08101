"""Hybrid sharding (``shard_size``): groups of S consecutive ranks shard, groups are replicas. Parity against
DistributedDataParallel over every rank, same seed and data, per-tensor ||delta|| / ||ref|| after 10 steps."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_zero import (
    CheckpointError,
    ShardedCheckpoint,
    ZeroConfig,
    ZeroEngine,
    ZeroMeasurement,
    ZeroPrecision,
    ZeroStrategy,
    consolidate_checkpoint,
    model_state_bytes,
)
from tests.helpers import assert_same, relative_errors, train_ddp, train_zero, twin_models
from tests.lit_helpers import LitTiny, SettledDDPStrategy, loader, trainer
from tests.test_checkpoint import reload_and_save, train_and_save, zero

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
    """Lightning ``ddp`` (32-true), or flat ZeRO of the same stage and precision (elsewhere, where ddp's
    autocast differs), against ZeRO with ``shard_size=2``: 10 optimizer steps, same data."""
    models = {}
    reference: Any = (SettledDDPStrategy(find_unused_parameters=True) if precision == "32-true" else
                      ZeroStrategy(stage=stage, bucket_numel=150))
    for name, strategy in (("reference", reference),
                           ("hybrid", ZeroStrategy(stage=stage, bucket_numel=150, shard_size=2, offload=offload))):
        model = LitTiny(optimizer, schedule=True)
        # Lightning turns "16-mixed" into bf16 on CPU before a strategy sees it; the plugin keeps fp16.
        chosen = {"plugins": [ZeroPrecision(precision)]} if precision == "16-mixed" else {"precision": precision}
        fit = trainer(strategy, accumulate_grad_batches=accumulate, **chosen)
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
    (2, "adamw", 4, "16-mixed", "none"),
    (1, "adamw", 1, "bf16-true", "none"),
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


# ----------------------------------------------------------------------------------------- checkpoints
def test_a_hybrid_checkpoint_resumes_on_any_world_size_stage_and_shard_size(pools, tmp_path) -> None:
    """4 ranks as 2 x 2 (stage 2) -> 2 ranks flat (stage 3) -> 4 ranks as 2 x 2 (stage 3) -> 4 ranks as
    4 x 1 (stage 1) -> 6 ranks as 2 x 3 (stage 2): parameters and optimizer state bit for bit at every hop;
    only replica 0 writes slices."""
    first = str(tmp_path / "hybrid.ckpt")
    pools(4).run(train_and_save, zero(2, shard_size=2), first)
    manifest = ShardedCheckpoint(first).manifest
    pieces = [len(entry["pieces"]) for entry in manifest["ranks"]]
    print(f"slices written per rank (2 replicas x 2 shards): {pieces}")
    assert pieces[0] > 0 and pieces[1] > 0 and pieces[2:] == [0, 0]
    original = consolidate_checkpoint(first, optimizer=True)
    previous = first
    for world_size, stage, shard_size in ((2, 3, None), (4, 3, 2), (4, 1, 1), (6, 2, 3)):
        path = str(tmp_path / f"n{world_size}-stage{stage}-s{shard_size}.ckpt")
        pools(world_size).run(reload_and_save, previous, path, stage, shard_size)
        again = consolidate_checkpoint(path, optimizer=True)
        assert_same(original["state_dict"], again["state_dict"], path)
        assert_same(original["optimizer_states"], again["optimizer_states"], path)
        assert again["global_step"] == original["global_step"]
        previous = path


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("shard_size", [0, -2, True, 2.0, "nodes"])
def test_a_shard_size_that_is_no_size_is_refused_at_construction(shard_size: Any) -> None:
    with pytest.raises(ValueError, match="shard_size must be a positive integer dividing the world size, 'node'"):
        ZeroStrategy(stage=2, shard_size=shard_size)


def fit_with_shard_size(shard_size: int) -> str:
    try:
        trainer(ZeroStrategy(stage=2, shard_size=shard_size), max_steps=1).fit(LitTiny("sgd"), loader(1, 1))
    except ValueError as exc:
        return str(exc)
    return "fitted"


def engine_on_a_subgroup() -> str:
    """Ranks 0 and 1 of 4 shard over their own group with a shard size that does not fit it."""
    group = dist.new_group([0, 1])
    if dist.get_rank() > 1:
        return "not a member"
    model, _ = twin_models()
    try:
        ZeroEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), ZeroConfig(shard_size=4), process_group=group)
    except ValueError as exc:
        return str(exc)
    return "built"


def resume_another_model(path: str) -> str:
    module = LitTiny("adamw", schedule=True)
    module.net.head = torch.nn.Linear(11, 4)
    try:
        trainer(zero(2, shard_size=2), max_steps=6, max_epochs=3).fit(module, loader(8, 1), ckpt_path=path)
    except CheckpointError as exc:
        return str(exc)
    return "resumed"


def test_bad_hybrid_setups_fail_on_every_rank_before_training(pools, tmp_path) -> None:
    errors = pools(4).run(fit_with_shard_size, 3)
    print(errors[0])
    assert all("shard_size=3 (3 ranks per sharding group) does not divide the 4 ranks of this job: pick one of "
               "[1, 2, 4]" in error for error in errors), errors
    errors = pools(4).run(engine_on_a_subgroup)
    assert errors[2:] == ["not a member"] * 2
    assert all("does not divide the 2 ranks" in error for error in errors[:2]), errors
    path = str(tmp_path / "hybrid.ckpt")
    pools(4).run(train_and_save, zero(2, shard_size=2), path)
    errors = pools(4).run(resume_another_model, path)
    print(errors[0])
    assert all("does not match this model" in error and "net.head.weight" in error for error in errors), errors


# ----------------------------------------------------------------------------------------- bytes
def state_and_traffic(stage: int, shard_size: int | None) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64),
                                torch.nn.GELU(), torch.nn.Linear(64, 16))
    extra = {"persist_numel": 0} if stage == 3 else {}
    psi = sum(p.numel() for p in model.parameters())
    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters()),
                        ZeroConfig(stage=stage, bucket_numel=2000, shard_size=shard_size, **extra))
    for _ in range(2):
        model(torch.randn(4, 64)).square().mean().backward()
        engine.step()
    held = model_state_bytes(engine)
    owned = sum(b.shard_size * b.grad_shard.element_size() for b in engine.trainable_buckets)
    metrics = ZeroMeasurement(2, held, dict(engine.last_step_traffic)).metrics()
    result = {"bytes": (held.parameters, held.gradients, held.master, held.optimizer_state), "metrics": metrics,
              "traffic": dict(engine.last_step_traffic), "owned_grad_bytes": owned,
              "psi": psi}
    engine.close()
    return result


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_memory_per_rank_is_that_of_a_group_and_only_the_owned_slice_crosses_groups(pools, stage: int) -> None:
    hybrid = pools(4).run(state_and_traffic, stage, 2)
    flat = pools(2).run(state_and_traffic, stage, None)
    for rank, got in enumerate(hybrid):
        # the same slices as 2 ranks sharding alone, byte for byte
        assert got["bytes"] == flat[rank % 2]["bytes"], (rank, got["bytes"], flat[rank % 2]["bytes"])
        across = got["traffic"].pop("all_reduce_across")
        assert got["metrics"]["zero/comm_bytes/across_groups"] == across
        assert got["metrics"]["zero/comm_bytes/inside_groups"] == sum(
            n for kind, n in got["traffic"].items() if kind != "flags")
        assert "zero/comm_bytes/across_groups" not in flat[rank % 2]["metrics"]
        assert across == 2 * got["owned_grad_bytes"]  # one all-reduce of the owned gradient slice
        inside = {kind: n for kind, n in got["traffic"].items() if kind != "flags"}  # flags: every rank
        assert inside == {k: n for k, n in flat[rank % 2]["traffic"].items() if k != "flags"}, (inside, flat)
    psi = hybrid[0]["psi"]
    print(f"zero{stage}, Ψ={psi}, 2 replicas x 2 shards, rank 0: held {hybrid[0]['bytes']} (params, grads, "
          f"master, optimizer) = 2 ranks alone; per step inside the group {hybrid[0]['traffic']}, across groups "
          f"{across} bytes ({across / (4 * psi):.2f} x 4Ψ)")


# ----------------------------------------------------------------------------------------- several optimizers
def two_sgds_one_backward(stage: int) -> float:
    """One backward, then two SGD optimizers (scale-sensitive, unlike Adam or Muon) step one after the other:
    the second step must not sum across groups again the slices the first step's window already summed."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    reference = copy.deepcopy(model)
    ddp = DistributedDataParallel(reference)
    ref_opts = [torch.optim.SGD(reference[0].parameters(), lr=0.1), torch.optim.SGD(reference[2].parameters(), lr=0.1)]
    opts = [torch.optim.SGD(model[0].parameters(), lr=0.1), torch.optim.SGD(model[2].parameters(), lr=0.1)]
    engine = ZeroEngine(model, opts, ZeroConfig(stage=stage, bucket_numel=100, shard_size=2,
                                                **({"persist_numel": 0} if stage == 3 else {})))
    for step in range(5):
        torch.manual_seed(100 * step + dist.get_rank())
        x = torch.randn(4, 8)
        ddp(x).square().mean().backward()
        for opt in ref_opts:
            opt.step()
            opt.zero_grad()
        model(x).square().mean().backward()
        engine.step(optimizer=0)
        engine.step(optimizer=1)
    engine.materialize_module()
    worst = max(relative_errors(model, reference).values())
    engine.close()
    return worst


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_optimizers_stepping_after_one_backward_under_hybrid_sharding(pools, stage: int) -> None:
    worst = max(pools(4).run(two_sgds_one_backward, stage))
    print(f"zero{stage}, 2 x 2, two SGDs after one backward: worst {worst:.2e} from ddp")
    assert worst <= 1e-5
