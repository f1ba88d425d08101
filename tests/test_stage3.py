"""Stage 3: parity with DDP, bytes per rank, the gathered window, tied weights, round trips."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_zero import ZeroConfig, ZeroEngine, model_state_bytes
from tests.test_parity import TOLERANCE, parity_case, tied_parity

CASES = [
    ("sgd", 1, "auto", None),
    ("sgd", 4, "boundary", None),
    ("sgd", 4, "every_micro_batch", ("norm", 0.5)),
    ("adamw", 4, "auto", None),
    ("adamw", 1, "auto", ("value", 0.01)),
]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_stage3_parity_with_ddp(pools, world_size: int) -> None:
    cases = CASES if world_size == 2 else CASES[1:4]
    failures = []
    for optimizer, accumulate, policy, clip in cases:
        result = pools(world_size).run(parity_case, 3, optimizer, accumulate, policy, clip, 150)[0]
        print(f"ws={world_size} stage 3 {optimizer} acc {accumulate} {policy} {clip}: "
              f"worst {result['worst_param']:.2e}, loss {result['worst_loss']:.2e}")
        if not (result["worst_param"] <= TOLERANCE and result["worst_loss"] <= TOLERANCE):
            failures.append((optimizer, accumulate, policy, clip, result))
    assert not failures, failures


def test_stage3_tied_weights_and_reused_layer(pools) -> None:
    errors = pools(3).run(tied_parity, 3)
    print(f"stage 3 tied: {max(errors):.2e}")
    assert max(errors) <= TOLERANCE


def stage3_bytes() -> dict[str, int]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 384), torch.nn.GELU(), torch.nn.Linear(384, 256),
                                torch.nn.GELU(), torch.nn.Linear(256, 64))
    psi = sum(p.numel() for p in model.parameters())
    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters()), ZeroConfig(stage=3))
    after_setup = model_state_bytes(engine).parameters
    model(torch.randn(4, 256)).square().mean().backward()
    engine.step()
    held = model_state_bytes(engine)
    gathered_after_step = engine.sharder.gathered
    engine.close()
    return {"psi": psi, "world": dist.get_world_size(), "total": held.total, "parameters": held.parameters,
            "after_setup": after_setup, "gathered": len(gathered_after_step), "in_flight": held.in_flight}


@pytest.mark.parametrize("world_size", [2, 4])
def test_stage3_bytes_per_rank_are_16_psi_over_n(pools, world_size: int) -> None:
    for got in pools(world_size).run(stage3_bytes):
        psi, n = got["psi"], got["world"]
        expected = 16 * psi / n
        print(f"stage 3 N={n}: {got['total']:,} bytes, 16Ψ/N = {expected:,.0f} ({got['total'] / expected - 1:+.3%})")
        assert got["gathered"] == 0 and got["in_flight"] == 0
        assert abs(got["after_setup"] - 4 * psi / n) <= 0.02 * 4 * psi / n  # never whole after setup
        assert abs(got["total"] - expected) <= 0.02 * expected
