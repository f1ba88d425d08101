"""Byte accounting held to the ZeRO table (fp32): stage 1 = 4Ψ + 4Ψ + KΨ/N, stage 2 = 4Ψ + (4 + K)Ψ/N,
K = 8 for Adam (two moments), 4 for SGD with momentum, counted exactly, within 2%."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_zero import ZeroConfig, ZeroEngine, model_state_bytes

BUCKET = 2**16


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 384), nn.GELU(), nn.Linear(384, 256), nn.GELU(), nn.Linear(256, 64))


def bytes_after_step(stage: int, optimizer: str) -> dict[str, int]:
    model = _model()
    psi = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters()) if optimizer == "adamw" else torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9)
    engine = ZeroEngine(model, opt, ZeroConfig(stage=stage, bucket_numel=BUCKET))
    model(torch.randn(4, 256)).square().mean().backward()
    in_flight_after_backward = model_state_bytes(engine).in_flight
    engine.step()
    measured = model_state_bytes(engine)
    engine.close()
    return {"psi": psi, "world": dist.get_world_size(), "parameters": measured.parameters,
            "gradients": measured.gradients, "master": measured.master,
            "optimizer_state": measured.optimizer_state, "in_flight": measured.in_flight,
            "in_flight_after_backward": in_flight_after_backward}


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize(("optimizer", "k"), [("adamw", 8), ("sgd", 4)])
def test_bytes_per_rank_match_the_zero_table(pools, world_size, stage, optimizer, k) -> None:
    for got in pools(world_size).run(bytes_after_step, stage, optimizer):
        psi, n = got["psi"], got["world"]
        grads = 4 * psi if stage == 1 else 4 * psi / n
        expected = 4 * psi + grads + k * psi / n
        total = got["parameters"] + got["gradients"] + got["master"] + got["optimizer_state"] + got["in_flight"]
        print(f"stage {stage} N={n} {optimizer}: {total} bytes, formula {expected:.0f} "
              f"({total / expected - 1:+.3%}); params {got['parameters']}, grads {got['gradients']}, "
              f"optimizer {got['optimizer_state']}")
        assert got["master"] == 0 and got["in_flight"] == 0 and got["in_flight_after_backward"] == 0
        assert abs(got["parameters"] - 4 * psi) <= 0.02 * 4 * psi
        assert abs(got["gradients"] - grads) <= 0.02 * grads
        assert abs(got["optimizer_state"] - k * psi / n) <= 0.02 * k * psi / n
        assert abs(total - expected) <= 0.02 * expected
