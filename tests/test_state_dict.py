"""full_state_dict / load_full_state_dict round trips across world sizes, optimizer state included."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from lightning_zero import ZeroConfig, ZeroEngine
from tests.helpers import OPTIMIZERS, _lr, assert_same, build_model, param_groups, train_zero

FIRST, THEN = 3, 4


def save_after_training(stage: int, optimizer: str, path: str, continued_path: str) -> None:
    """Train FIRST steps, save the full state, then continue THEN steps and save the parameters."""
    model = build_model()
    engine, _ = train_zero(model, optimizer, FIRST, ZeroConfig(stage=stage, bucket_numel=150))
    state = engine.full_state_dict()
    if dist.get_rank() == 0:
        torch.save(state, path)
    _continue(engine, model, optimizer)
    engine.materialize_module()
    if dist.get_rank() == 0:
        torch.save({k: v.detach().clone() for k, v in model.named_parameters()}, continued_path)
    engine.close()


def _continue(engine: ZeroEngine, model: torch.nn.Module, optimizer: str) -> None:
    from tests.helpers import _loop

    _loop(model, engine.optimizer.optimizer, THEN, 1, None, FIRST, engine)


def load_and_continue(stage: int, optimizer: str, path: str, continued_path: str) -> float:
    """Load on this world size, check the state reads back identically, continue, compare."""
    model = build_model(seed=123)  # different weights: the load must overwrite them
    opt = OPTIMIZERS[optimizer](param_groups(model, _lr(optimizer)))
    engine = ZeroEngine(model, opt, ZeroConfig(stage=stage, bucket_numel=150))
    saved = torch.load(path, weights_only=True)
    engine.load_full_state_dict(saved)
    assert_same(saved, engine.full_state_dict())
    _continue(engine, model, optimizer)
    engine.materialize_module()
    expected = torch.load(continued_path, weights_only=True)
    engine.close()
    return max(
        ((p.detach() - expected[n]).norm() / expected[n].norm()).item() for n, p in model.named_parameters()
    )


@pytest.mark.parametrize(
    ("optimizer", "saved_on", "loaded_on", "stages"),
    [
        ("adamw", 2, 3, (2, 2)),
        ("sgd", 2, 4, (1, 2)),
        ("adamw", 4, 2, (2, 1)),
        ("sgd", 3, 2, (1, 1)),
        ("adamw", 2, 4, (3, 3)),
        ("sgd", 3, 2, (2, 3)),
        ("adamw", 4, 3, (3, 1)),
    ],
)
def test_round_trip_across_world_sizes(pools, tmp_path, optimizer, saved_on, loaded_on, stages) -> None:
    path, continued = os.fspath(tmp_path / "full.pt"), os.fspath(tmp_path / "continued.pt")
    pools(saved_on).run(save_after_training, stages[0], optimizer, path, continued)
    errors = pools(loaded_on).run(load_and_continue, stages[1], optimizer, path, continued)
    print(f"{optimizer} saved on {saved_on} (stage {stages[0]}), resumed on {loaded_on} (stage {stages[1]}): "
          f"worst relative error after {THEN} more steps {max(errors):.2e}")
    assert max(errors) <= 1e-5


def full_state_has_whole_tensors() -> dict[str, list[int]]:
    model = build_model()
    engine, _ = train_zero(model, "adamw", 2, ZeroConfig(stage=2, bucket_numel=150))
    state = engine.full_state_dict()
    engine.close()
    shapes = {name: list(p.shape) for name, p in model.named_parameters()}
    for name, shape in shapes.items():
        assert list(state["params"][name].shape) == shape
    for name, values in state["optimizer"]["state"].items():
        # the branch gets no gradient on odd steps, so AdamW stepped it once
        assert list(values["exp_avg"].shape) == shapes[name]
        assert values["step"].item() == (1.0 if name.startswith("branch") else 2.0)
    assert "frozen.weight" not in state["optimizer"]["state"]
    groups = state["optimizer"]["param_groups"]
    assert [len(g["params"]) for g in groups] == [5, 6] and groups[1]["lr"] == 0.005
    return shapes


def test_full_state_dict_is_whole_and_keyed_by_name(pools) -> None:
    pools(3).run(full_state_has_whole_tensors)


def local_states(stage: int, precision: str) -> dict[str, object]:
    from lightning_zero.config import PrecisionPolicy

    model = build_model()
    opt = OPTIMIZERS["adamw"](param_groups(model, _lr("adamw")))
    engine = ZeroEngine(model, opt, ZeroConfig(stage=stage, bucket_numel=150),
                        dtypes=PrecisionPolicy.from_precision(precision).slots())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "32-true"):
        _continue(engine, model, "adamw")
    local = engine.local_state_dict()
    full = engine.full_state_dict()
    engine.close()
    return {"local": local, "full": full}


@pytest.mark.parametrize(("stage", "precision", "world_size"), [(1, "32-true", 2), (2, "bf16-mixed", 3),
                                                                (3, "32-true", 4)])
def test_local_states_consolidate_in_one_process(pools, stage, precision, world_size) -> None:
    from lightning_zero.sharding.state import consolidate

    results = pools(world_size).run(local_states, stage, precision)
    consolidated = consolidate([r["local"] for r in reversed(results)])  # any order
    assert_same(results[0]["full"], consolidated)
    assert not any(r["local"]["whole"] for r in results[1:])  # unsharded parameters are kept once
    with pytest.raises(ValueError, match="every rank"):
        consolidate([r["local"] for r in results[1:]])
