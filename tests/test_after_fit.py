"""Stage 3 with ``after_fit="sharded"``: the whole model is never on one rank, from setup to after fit:
training, validation inside fit, a save, the end of fit and ``validate``/``test``/``predict`` afterwards; the
weights, the evaluation results and the checkpoint equal those of ``after_fit="whole"``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_zero import ShardedCheckpoint, ZeroStrategy
from tests.lit_helpers import trainer
from tests.test_evaluation import BLOCKS, WIDTH, Blocks, rows


def sampled_fit(after_fit: str, tmp: str) -> dict[str, Any]:
    rank = dist.get_rank()
    strategy = ZeroStrategy(stage=3, persist_numel=0, after_fit=after_fit)
    module = Blocks()
    whole = sum(p.numel() * p.element_size() for p in module.parameters())
    fit = trainer(strategy, max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=2)
    fit.fit(module, rows(4, rank), rows(2, 10 + rank))
    held_after_fit = sum(p.numel() * p.element_size() for p in module.parameters())
    fit.save_checkpoint(f"{tmp}/{after_fit}.ckpt")
    validated = fit.validate(module, rows(3 if rank == 0 else 1, 20 + rank), verbose=False)[0]["val_loss"]
    predicted = torch.cat(fit.predict(module, rows(2, 30 + rank)))
    held_after_loops = sum(p.numel() * p.element_size() for p in module.parameters())
    with strategy.gathered_parameters():
        weights = {name: p.detach().clone() for name, p in module.named_parameters()}
    fit.fit_loop.epoch_loop.max_steps, fit.fit_loop.max_epochs = 6, 2
    fit.fit(module, rows(6, rank), rows(2, 10 + rank))  # fit again after a sharded end
    return {"whole": whole, "held_after_fit": held_after_fit, "held_after_loops": held_after_loops,
            "peaks": module.peaks, "validated": validated, "predicted": predicted, "weights": weights,
            "steps_again": fit.global_step}


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_sharded_end_of_fit_keeps_every_rank_to_its_slices(pools, tmp_path, world_size: int) -> None:
    sharded = pools(world_size).run(sampled_fit, "sharded", str(tmp_path))
    whole = pools(world_size).run(sampled_fit, "whole", str(tmp_path))
    for rank in range(world_size):
        got, reference = sharded[rank], whole[rank]
        shares = {loop: held / got["whole"] for loop, held in got["peaks"].items()}
        print(f"ws={world_size} rank {rank}: largest share of the model whole during training "
              f"{shares['training']:.2f}, evaluation {shares['evaluation']:.2f}; after fit "
              f"{got['held_after_fit'] / got['whole']:.2f} (after_fit='whole': "
              f"{reference['held_after_fit'] / reference['whole']:.2f}), after validate and predict "
              f"{got['held_after_loops'] / got['whole']:.2f}")
        block, head = 2 * (WIDTH * WIDTH + WIDTH), WIDTH + 1
        # at most two blocks and a head whole at once (the unit computing, the one prefetched), each flat
        # buffer padded to a multiple of the world size
        assert max(shares.values()) <= (2 * block + head + 3 * world_size) / (BLOCKS * block + 2 * head)
        assert got["held_after_fit"] == 0 and got["held_after_loops"] == 0  # persist_numel=0: nothing whole
        assert reference["held_after_fit"] == reference["whole"]
        assert got["validated"] == reference["validated"]
        assert torch.equal(got["predicted"], reference["predicted"])
        assert got["weights"].keys() == reference["weights"].keys()
        assert all(torch.equal(got["weights"][k], v) for k, v in reference["weights"].items())
        assert got["steps_again"] == reference["steps_again"] == 6
    saved = ShardedCheckpoint(str(tmp_path / "sharded.ckpt")).whole_params()
    assert all(torch.equal(saved[k], v) for k, v in whole[0]["weights"].items())


def test_after_fit_sharded_needs_stage_3_and_the_popen_launcher() -> None:
    with pytest.raises(ValueError, match="after_fit chooses what a stage 3 module .* nothing under stage 2"):
        ZeroStrategy(stage=2, after_fit="sharded")
    with pytest.raises(ValueError, match="start_method='popen'"):
        ZeroStrategy(stage=3, after_fit="sharded", start_method="spawn")
    with pytest.raises(ValueError, match="after_fit must be 'whole' or 'sharded'"):
        ZeroStrategy(stage=3, after_fit="cpu")
