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


def sends_against_sums(world_parts: int, uneven: bool) -> list[str]:
    """gloo's reduce-scatter by sends, straight from parameter pieces (some missing, a dtype to convert, more
    pieces than one message takes), against the slice of an all-reduced flat copy."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(rank)
    sizes = [int(s) for s in torch.randint(1, 9, (world_parts,), generator=torch.Generator().manual_seed(0))]
    numel = sum(sizes) + 3  # padding at the end
    numel += (-numel) % world
    bounds = None
    if uneven:
        order = torch.randperm(numel - 1, generator=torch.Generator().manual_seed(1))
        cut = sorted(int(c) + 1 for c in order[:world - 1])
        bounds = (0, *cut, numel)
    parts, offset = [], 0
    for index, size in enumerate(sizes):
        missing = (index + rank) % 5 == 0  # ranks miss different pieces
        values = None if missing else torch.randn(size, generator=generator)
        if values is not None and index % 7 == 3:
            values = values.to(torch.float64)  # read() converts
        parts.append((offset, size, values))
        offset += size
    source = collectives.GradientParts(numel, torch.float32, torch.device("cpu"), parts)
    flat = source.flat()
    reference = flat.clone()
    dist.all_reduce(reference)
    lo, hi = (bounds[rank], bounds[rank + 1]) if bounds else (rank * numel // world, (rank + 1) * numel // world)
    problems = []
    for add in (False, True):
        output = torch.full((hi - lo,), 0.5)
        start = output.clone()
        handle = collectives._reduce_scatter_by_sends(output, source, None, bounds, 17, add)
        handle.wait()
        expected = reference[lo:hi] + (start if add else 0)
        if not torch.allclose(output, expected, rtol=1e-6, atol=1e-6):  # 3 ranks: another order of the sum
            problems.append(f"rank {rank} add={add}: worst {(output - expected).abs().max():.2e}")
    comm = collectives.Comm(None, torch.device("cpu"))  # the flat form goes through the same sends
    output = torch.empty(hi - lo)
    comm.reduce_scatter(output, flat.clone(), bounds).wait()
    if not torch.allclose(output, reference[lo:hi], rtol=1e-6, atol=1e-6):
        problems.append(f"rank {rank} flat: worst {(output - reference[lo:hi]).abs().max():.2e}")
    return problems


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("pieces", [5, 3 * collectives._MAX_MESSAGES])
def test_reduce_scatter_by_sends_sums_exactly(pools, world_size: int, pieces: int) -> None:
    for uneven in (False, True):
        for problems in pools(world_size).run(sends_against_sums, pieces, uneven):
            assert problems == []
