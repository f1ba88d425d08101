"""Same start on every rank, and bad input refused early, on every rank, without a hang."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_zero import ZeroConfig, ZeroEngine
from tests.dist_pool import RankError
from tests.helpers import build_model


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stage": 4}, "stage must be one of"),
        ({"stage": 0}, "stage must be one of"),
        ({"bucket_numel": 0}, "bucket_numel must be a positive integer"),
        ({"bucket_numel": -5}, "bucket_numel must be a positive integer"),
        ({"reduce_policy": "sometimes"}, "reduce_policy must be one of"),
    ],
)
def test_bad_config_names_the_fix(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        ZeroConfig(**kwargs)


def engine_without_process_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        ZeroEngine(nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))


def test_engine_needs_a_process_group() -> None:
    engine_without_process_group()


def ranks_start_from_rank_zero() -> list[float]:
    model = build_model(seed=dist.get_rank())  # every rank draws different weights
    model.register_buffer("counter", torch.full((2,), float(dist.get_rank())))
    engine = ZeroEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), ZeroConfig(bucket_numel=100))
    reference = build_model(seed=0)
    for (name, param), (_, expected) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(param, expected), name
    assert torch.equal(model.counter, torch.zeros(2))
    engine.close()
    return [p.sum().item() for p in model.parameters()]


def test_ranks_start_from_rank_zero(pools) -> None:
    results = pools(3).run(ranks_start_from_rank_zero)
    assert results[0] == results[1] == results[2]


def model_differs_on_last_rank(kind: str) -> None:
    model = build_model()
    last = dist.get_rank() == dist.get_world_size() - 1
    if last and kind == "shape":
        model.head = nn.Linear(11, 4)
    if last and kind == "requires_grad":
        model.embed.bias.requires_grad_(False)
    if last and kind == "buffer":
        model.register_buffer("stat", torch.zeros(3))
    elif kind == "buffer":
        model.register_buffer("stat", torch.zeros(4))
    ZeroEngine(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))


@pytest.mark.parametrize(("kind", "names"), [("shape", "head.weight"), ("requires_grad", "embed.bias"),
                                             ("buffer", "stat")])
def test_ranks_that_disagree_fail_on_every_rank(pools, kind, names) -> None:
    with pytest.raises(RankError) as info:
        pools(3).run(model_differs_on_last_rank, kind)
    assert sorted(info.value.tracebacks) == [0, 1, 2]
    for text in info.value.tracebacks.values():
        assert "ranks build different models" in text and names in text
