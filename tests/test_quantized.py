"""Quantized stage 3 gathers (``quantize_gathers``, ZeRO++'s qwZ): int8 blocks with fp32 scales."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_zero import ZeroConfig, ZeroEngine, ZeroStrategy
from lightning_zero.sharding.collectives import QUANT_BLOCK, quantize_blocks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


def test_blocks_round_within_half_a_step_of_their_own_scale() -> None:
    torch.manual_seed(0)
    values = torch.randn(3 * QUANT_BLOCK + 17) * torch.logspace(-3, 2, 3 * QUANT_BLOCK + 17)
    quantized, scales = quantize_blocks(values, 4)
    assert quantized.dtype == torch.int8 and quantized.numel() == 4 * QUANT_BLOCK and scales.numel() == 4
    back = (quantized.view(4, QUANT_BLOCK).float() * scales[:, None]).view(-1)[: values.numel()]
    error = (back - values).abs().view(-1)
    bound = scales.repeat_interleave(QUANT_BLOCK)[: values.numel()] / 2
    assert bool((error <= bound * (1 + 1e-6)).all())
    assert torch.equal(quantize_blocks(torch.zeros(5), 1)[0], torch.zeros(QUANT_BLOCK, dtype=torch.int8))


def gpt_losses(quantize: bool, steps: int) -> dict[str, Any]:
    from gpt import GPT, corpus, sample_batch

    torch.manual_seed(0)
    model = GPT()
    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters(), lr=3e-3),
                        ZeroConfig(stage=3, persist_numel=0, quantize_gathers=quantize))
    data, generator = corpus(), torch.Generator().manual_seed(torch.distributed.get_rank())
    losses = []
    for _ in range(steps):
        x, y = sample_batch(data, 8, 64, generator)
        loss = model.loss(x, y)
        loss.backward()
        engine.step()
        losses.append(loss.item())
    gathered = engine.last_step_traffic.get("all_gather", 0)
    engine.close()
    return {"losses": losses, "gathered": gathered}


def test_quantized_gathers_train_the_example_gpt_as_exact_ones_do_for_a_quarter_of_the_bytes(pools) -> None:
    steps = 200
    exact = pools(2).run(gpt_losses, False, steps)[0]
    quantized = pools(2).run(gpt_losses, True, steps)[0]
    tail = slice(steps - 20, steps)
    exact_tail = sum(exact["losses"][tail]) / 20
    quantized_tail = sum(quantized["losses"][tail]) / 20
    print(f"example GPT, zero3, 2 ranks, {steps} steps: mean loss of the last 20 steps {exact_tail:.4f} exact, "
          f"{quantized_tail:.4f} quantized ({quantized_tail / exact_tail - 1:+.2%}); first loss "
          f"{exact['losses'][0]:.4f}; gather bytes per step {exact['gathered']:,} exact, {quantized['gathered']:,} "
          f"quantized ({quantized['gathered'] / exact['gathered']:.3f}x)")
    assert abs(quantized_tail / exact_tail - 1) <= 0.02
    assert quantized_tail < 0.8 * exact["losses"][0]  # it learnt
    # int8 for fp32, plus one fp32 scale per 256 elements
    assert quantized["gathered"] <= (0.25 + 4 / QUANT_BLOCK / 4 + 0.01) * exact["gathered"]


@pytest.mark.parametrize("stage", [1, 2])
def test_quantized_gathers_need_stage_3(stage: int) -> None:
    with pytest.raises(ValueError, match="quantize_gathers quantizes stage 3's parameter gathers"):
        ZeroStrategy(stage=stage, quantize_gathers=True)


def read_back_after_quantized_training() -> dict[str, float]:
    """After steps with quantized gathers: ``gathered_parameters`` (no modifier, and with one) and
    ``materialize_module`` give the exact slices, not their int8 rounding."""
    from gpt import GPT, corpus, sample_batch

    torch.manual_seed(0)
    model = GPT()
    engine = ZeroEngine(model, torch.optim.SGD(model.parameters(), lr=1e-2),
                        ZeroConfig(stage=3, persist_numel=0, quantize_gathers=True))
    data, generator = corpus(), torch.Generator().manual_seed(0)
    for _ in range(3):
        model.loss(*sample_batch(data, 4, 64, generator)).backward()
        engine.step()
    exact = engine.full_params()
    model.loss(*sample_batch(data, 4, 64, generator))  # leaves the last unit gathered (rounded) for a backward
    gaps = {}
    with engine.gathered_parameters():
        gaps["read"] = max((p.detach() - exact[n]).abs().max().item() for n, p in model.named_parameters())
    with engine.gathered_parameters(modifier_rank=0):
        pass
    gaps["written back"] = max((v - exact[n]).abs().max().item() for n, v in engine.full_params().items())
    engine.materialize_module()
    gaps["materialized"] = max((p.detach() - exact[n]).abs().max().item() for n, p in model.named_parameters())
    engine.close()
    return gaps


def test_quantized_gathers_never_reach_values_read_or_kept(pools) -> None:
    for gaps in pools(2).run(read_back_after_quantized_training):
        assert gaps == {"read": 0.0, "written back": 0.0, "materialized": 0.0}, gaps
