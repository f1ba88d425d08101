"""Stage 3 with ``after_fit="sharded"``: the whole model is never on one rank, from setup to after fit:
training, validation inside fit, a save, the end of fit and ``validate``/``test``/``predict`` afterwards; the
weights, the evaluation results and the checkpoint equal those of ``after_fit="whole"``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
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


class SampledStack(pl.LightningModule):
    """test_memory's four-block stack in the Trainer; a rank's model-state bytes are sampled at every module's
    forward entry and exit, every gradient's arrival, after a sharded save inside fit, at the end of fit and
    after it."""

    def __init__(self, tmp: str) -> None:
        super().__init__()
        from tests.test_memory import _Stack

        self.net, self.tmp = _Stack(), tmp
        self.samples: dict[str, list[int]] = {}
        for module in self.net.modules():
            module.register_forward_pre_hook(self._sample)
            module.register_forward_hook(self._sample)

    def on_fit_start(self) -> None:
        for p in self.net.parameters():
            p.register_post_accumulate_grad_hook(self._sample)

    def sample(self, where: str) -> None:
        from lightning_zero import model_state_bytes

        engines = getattr(self.trainer.strategy, "engines", [])
        if engines:
            self.samples.setdefault(where, []).append(model_state_bytes(engines[0]).total)

    def _sample(self, *_: Any) -> None:
        if self._trainer is not None:
            self.sample("training" if self.trainer.training else "validation")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(100 * batch_idx + dist.get_rank())
        return self.net(torch.randn(8, 64, generator=gen)).square().mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        gen = torch.Generator().manual_seed(7 + batch_idx + dist.get_rank())
        self.net(torch.randn(8, 64, generator=gen))

    def on_train_batch_end(self, *args: Any) -> None:
        self.sample("after step")
        if self.trainer.global_step == 2:
            self.trainer.save_checkpoint(f"{self.tmp}/inside.ckpt")
            self.sample("save")

    def on_train_end(self) -> None:
        self.sample("end of fit")

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters())


def whole_fit_bytes(tmp: str) -> dict[str, Any]:
    module = SampledStack(tmp)
    block = sum(p.numel() for p in module.net.blocks[0].parameters())
    strategy = ZeroStrategy(stage=3, persist_numel=0, bucket_numel=block, after_fit="sharded")
    fit = trainer(strategy, max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=2,
                  num_sanity_val_steps=1)
    data = torch.utils.data.DataLoader(list(range(4)), batch_size=1)
    fit.fit(module, data, torch.utils.data.DataLoader(list(range(2)), batch_size=1))
    module.sample("after fit")
    psi = sum(p.numel() for p in SampledStack(tmp).parameters())
    return {"samples": module.samples, "block": 4 * block, "world": dist.get_world_size(), "psi": psi}


def test_a_rank_holds_the_formula_plus_the_window_through_the_whole_fit(pools, tmp_path) -> None:
    """Training, validation inside fit, a sharded save inside fit, the end of fit and after it: a rank's
    model-state bytes never exceed what it holds after a step (16 bytes per owned element under fp32 AdamW)
    by more than test_memory's window (the bucket filling, the reductions in flight, the gathered unit and
    the one prefetched), and hold exactly that formula at the end of fit and after it."""
    from lightning_zero.sharding.gradients import _MAX_IN_FLIGHT

    for got in pools(2).run(whole_fit_bytes, str(tmp_path)):
        samples, block, n = got["samples"], got["block"], got["world"]
        formula = max(samples["after step"])
        assert 0 <= formula - 16 * got["psi"] / n <= 16 * 4 * n  # 16 bytes per owned element, padding aside
        window = (1 + _MAX_IN_FLIGHT * (1 + 1 / n) + 2) * block
        peaks = {where: max(values) for where, values in samples.items()}
        print({where: f"{(peak - formula) / block:+.2f} blocks" for where, peak in peaks.items()},
              f"(formula {formula:,} bytes, window bound {window / block:.2f} blocks)")
        assert set(peaks) == {"training", "validation", "after step", "save", "end of fit", "after fit"}
        assert all(peak <= formula + window for peak in peaks.values()), peaks
        assert peaks["validation"] <= formula + 2 * block  # the unit computing and the one prefetched
        assert peaks["save"] == peaks["end of fit"] == peaks["after fit"] == formula
