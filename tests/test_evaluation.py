"""Stage 3 in evaluation loops: each unit gathered around its forward as in training (not the whole model),
ranks with different numbers of forward calls never hang, ranks running different modules fail together
naming them, and ``check_gathers`` names a training divergence at the forward that causes it."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_zero import ZeroConfig, ZeroStrategy
from lightning_zero.sharding.engine import ZeroEngine
from lightning_zero.sharding.parameters import UnitDivergenceError
from tests.lit_helpers import SettledDDPStrategy, trainer

BLOCKS, WIDTH = 8, 24


class Blocks(pl.LightningModule):
    """A stack of equal blocks (one stage-3 unit each) and a head. Each block's forward hook samples the
    gathered bytes of this rank while the block computes; ``mode`` picks the loop in which it samples."""

    def __init__(self, generate: bool = False, per_rank_head: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH)) for _ in range(BLOCKS))
        self.head_a, self.head_b = nn.Linear(WIDTH, 1), nn.Linear(WIDTH, 1)
        self.generate, self.per_rank_head = generate, per_rank_head
        self.peaks: dict[str, int] = {}
        for block in self.blocks:
            block.register_forward_hook(self._sample)

    def _sample(self, *_: Any) -> None:
        if self._trainer is None:  # under Fabric
            return
        strategy = self.trainer.strategy
        if not isinstance(strategy, ZeroStrategy) or not strategy.engines:
            return
        held = sum(b.flat.untyped_storage().nbytes() for b in strategy.engines[0].buckets if not b.persistent)
        loop = "training" if self.trainer.training else "evaluation"
        self.peaks[loop] = max(self.peaks.get(loop, 0), held)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        # ``per_rank_head``: in evaluation, rank 1 runs another head (a task per rank)
        head = self.head_b if self.per_rank_head and self.global_rank == 1 and not self.training else self.head_a
        return head(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), on_epoch=True, sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        # "generation": a number of forward calls that differs between ranks and batches
        for _ in range(1 + batch_idx + 2 * self.global_rank if self.generate else 1):
            x = torch.tanh(self(x)).expand(-1, WIDTH)
        return x

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def rows(batches: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * 4, WIDTH, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True).tanh()), batch_size=4)


def loops(kind: str, generate: bool = True) -> dict[str, Any]:
    """Train 3 steps, then validate, test and predict with 3 batches on rank 0 and 1 on the others."""
    rank = dist.get_rank()
    if kind == "ddp":
        strategy: Any = SettledDDPStrategy(find_unused_parameters=True)
    else:
        strategy = ZeroStrategy(stage=3, persist_numel=0, **({"eval_gather": "whole"} if kind == "whole" else {}))
    module = Blocks(generate=generate)
    fit = trainer(strategy, max_steps=3, limit_val_batches=3, num_sanity_val_steps=2, val_check_interval=2,
                  check_val_every_n_epoch=None)
    start = time.perf_counter()
    fit.fit(module, rows(4, rank), rows(3 if rank == 0 else 1, 10 + rank))
    validated = fit.callback_metrics["val_loss"].item()
    tested = fit.test(module, rows(3 if rank == 0 else 1, 20 + rank), verbose=False)[0]["val_loss"]
    predicted = torch.cat(fit.predict(module, rows(3 if rank == 0 else 1, 30 + rank)))
    whole = sum(p.numel() * p.element_size() for p in module.blocks.parameters())
    return {"validated": validated, "tested": tested, "predicted": predicted, "peaks": module.peaks,
            "whole": whole, "seconds": time.perf_counter() - start}


@pytest.mark.parametrize("world_size", [2, 3])
def test_evaluation_gathers_per_unit_with_uneven_forward_counts(pools, world_size: int) -> None:
    """Validation (sanity check and inside fit), test and predict with 3 batches on rank 0 and 1 on the
    others, predict running a different number of forward calls per rank and batch: results equal to the
    whole-model gather and to ddp, and evaluation holds what training holds: two blocks."""
    ddp = pools(world_size).run(loops, "ddp")
    unit = pools(world_size).run(loops, "unit")
    whole = pools(world_size).run(loops, "whole")
    for rank in range(world_size):
        got, same, reference = unit[rank], whole[rank], ddp[rank]
        assert got["validated"] == same["validated"] and got["tested"] == same["tested"]
        assert torch.equal(got["predicted"], same["predicted"])
        torch.testing.assert_close(got["predicted"], reference["predicted"], rtol=1e-5, atol=1e-6)
        assert abs(got["validated"] - reference["validated"]) <= 1e-5 * abs(reference["validated"])
        peaks = {loop: bytes_ / got["whole"] for loop, bytes_ in got["peaks"].items()}
        print(f"ws={world_size} rank {rank}: peak share of the blocks held during training "
              f"{peaks['training']:.2f}, evaluation {peaks['evaluation']:.2f} (eval_gather='whole': "
              f"{same['peaks']['evaluation'] / got['whole']:.2f}); {got['seconds']:.1f}s against "
              f"{same['seconds']:.1f}s ('whole') and {reference['seconds']:.1f}s (ddp)")
        # the block computing, the one prefetched and at most a head (25 elements): training's window
        assert peaks["evaluation"] <= 2.05 / BLOCKS and peaks["training"] <= 2.05 / BLOCKS
        assert same["peaks"]["evaluation"] >= got["whole"]


def per_rank_heads_in_evaluation(eval_gather: str) -> str:
    fit = trainer(ZeroStrategy(stage=3, persist_numel=0, eval_gather=eval_gather), max_steps=1)
    module = Blocks(per_rank_head=True)
    try:
        fit.fit(module, rows(1, 0), rows(2, 0))  # the sanity check validates first
    except UnitDivergenceError as exc:
        return str(exc)
    return "fitted"


def test_ranks_running_different_modules_in_evaluation_fail_together_naming_them(pools) -> None:
    start = time.perf_counter()
    errors = pools(2).run(per_rank_heads_in_evaluation, "unit")
    print(errors[0], f"({time.perf_counter() - start:.1f}s)")
    for error in errors:
        assert "rank 0 was about to run 'head_a' (25 elements); rank 1 was about to run 'head_b'" in error, error
        assert "eval_gather='whole'" in error
    assert pools(2).run(per_rank_heads_in_evaluation, "whole") == ["fitted", "fitted"]


def divergent_training_forward(check: bool, common_steps: int, case: str) -> dict[str, Any]:
    """After ``common_steps`` steps alike, rank 1 runs another head (``case`` "equal": of the same size,
    "wide": of another size), or no head at all ("exit", an early exit)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"trunk": nn.Linear(16, 16), "head_a": nn.Linear(16, 4),
                           "head_b": nn.Linear(16, 8 if case == "wide" else 4)})
    engine = ZeroEngine(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        ZeroConfig(stage=3, persist_numel=0, check_gathers=check))
    for _ in range(common_steps):
        model["head_a"](model["trunk"](torch.randn(2, 16))).sum().backward()
        engine.step()
    before = [b.shard.clone() for b in engine.buckets]
    reached = "nothing"
    try:
        out = model["trunk"](torch.randn(2, 16))
        if dist.get_rank() == 0 or case != "exit":
            out = (model["head_a"] if dist.get_rank() == 0 else model["head_b"])(out)
        reached = "backward"
        out.sum().backward()
        reached = "step"
        engine.step()
        error = ""
    except RuntimeError as exc:
        error = str(exc)
    unchanged = all(torch.equal(b.shard, saved) for b, saved in zip(engine.buckets, before))
    engine.close()
    return {"error": error, "reached": reached, "unchanged": unchanged}


@pytest.mark.parametrize("case", ["equal", "wide", "exit"])
@pytest.mark.parametrize(("check", "common_steps"), [(False, 0), (False, 3), (True, 3)])
def test_a_training_divergence_is_named_at_once_on_every_rank(pools, check: bool, common_steps: int,
                                                               case: str) -> None:
    """Heads of different sizes would abort inside gloo ("Received data size doesn't match"), heads of equal
    sizes would pair their gathers, and an early exit would pair a gather with a gradient reduction: the
    units' announcements (see [Note: unit announcements]) make every rank raise first, in the first step or
    any later one, naming both, with no weight changed."""
    start = time.perf_counter()
    results = pools(2).run(divergent_training_forward, check, common_steps, case)
    print(f"{case}, after {common_steps} steps, check_gathers={check}: {time.perf_counter() - start:.2f}s, "
          f"{results[0]['error']}")
    for result in results:
        assert result["unchanged"], result
        if case == "exit":  # rank 1 learns it at its backward, rank 0 after the head's forward
            assert result["reached"] == ("nothing" if result is results[0] else "backward"), result
            assert ("rank 0 was about to run 'head_a' (68 elements) as unit call 2 of its forward; rank 1 had "
                    "ended its forward after 1 unit call. No gather was paired") in result["error"], result
        else:
            assert result["reached"] == "nothing", result
            assert ("rank 0 was about to run 'head_a' (68 elements) as unit call 2 of its forward; rank 1 was "
                    f"about to run 'head_b' ({136 if case == 'wide' else 68} elements)") in result["error"], result
        assert "run every module on every rank" in result["error"]


class EarlyExit(Blocks):
    """From optimizer step 3 on, rank 1 skips the last block in training (an early exit)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.blocks):
            if self.training and self.global_rank == 1 and self.global_step >= 3 and index == BLOCKS - 1:
                break
            x = x + block(x)
        return self.head_a(x)


def fit_early_exit() -> dict[str, Any]:
    fit = trainer(ZeroStrategy(stage=3, persist_numel=0), max_steps=6)
    start = time.perf_counter()
    try:
        fit.fit(EarlyExit(), rows(6, 0))
        error = ""
    except UnitDivergenceError as exc:
        error = str(exc)
    return {"error": error, "step": fit.global_step, "seconds": time.perf_counter() - start}


def test_an_early_exit_after_some_steps_fails_every_rank_at_once_through_the_trainer(pools) -> None:
    results = pools(2).run(fit_early_exit)
    print(f"{results[0]['seconds']:.1f}s: {results[0]['error']}")
    for result in results:
        assert result["step"] == 3, result  # three steps trained, the fourth refused before any gather
        assert (f"rank 0 was about to run 'blocks.{BLOCKS - 1}' (1200 elements) as unit call {BLOCKS} of its "
                "forward; rank 1 was about to run 'head_a' (25 elements)") in result["error"], result


class NoUnitOnOneRank(Blocks):
    """From optimizer step 3 on, rank 1's training forward runs no unit at all: its loss comes from a weight
    the root owns (which stays gathered), so no hook of any unit fires on that rank."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.global_rank == 1 and self.global_step >= 3:
            return x[:, :1] * 0 + self.bias
        for block in self.blocks:
            x = x + block(x)
        return self.head_a(x) + self.bias


def fit_no_unit() -> dict[str, Any]:
    fit = trainer(ZeroStrategy(stage=3, persist_numel=0), max_steps=6)
    try:
        fit.fit(NoUnitOnOneRank(), rows(6, 0))
        error = ""
    except UnitDivergenceError as exc:
        error = str(exc)
    return {"error": error, "step": fit.global_step}


def test_a_forward_that_runs_no_unit_on_one_rank_is_named(pools) -> None:
    """The strategy announces "forward over" at every backward (``ZeroEngine.begin_backward``)."""
    results = pools(2).run(fit_no_unit)
    print(results[0]["error"])
    for result in results:
        assert result["step"] == 3, result
        assert ("rank 0 was about to run 'blocks.0' (1200 elements) as unit call 1 of its forward; rank 1 had "
                "ended its forward after 0 unit calls") in result["error"], result


def timed_steps(check: bool, steps: int = 30) -> tuple[float, int]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.Tanh()) for _ in range(12)])
    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters()), ZeroConfig(stage=3, persist_numel=0,
                                                                                  check_gathers=check))
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        model(torch.randn(8, 64)).sum().backward()
        engine.step()
        times.append(time.perf_counter() - begin)
    assert engine.sharder is not None
    announcements = engine.sharder.announcements
    engine.close()
    return sorted(times[5:])[len(times[5:]) // 2], announcements


def test_check_gathers_cost_is_measured(pools) -> None:
    """Not a speed target: prints what the announcements cost per step on 12 units (2 ranks, gloo), and
    the debugging check on top of them."""
    medians: dict[bool, float] = {}
    for check in (False, True, False, True):  # interleaved; the later run of each counts
        results = pools(2).run(timed_steps, check)
        medians[check] = max(median for median, _ in results)
        # each unit's forward, "forward over", and with the check each unit's backward gather
        assert all(count == 30 * (12 + 1 + (12 if check else 0)) for _, count in results), results
    print(f"check_gathers: median step {medians[True] * 1e3:.2f} ms against {medians[False] * 1e3:.2f} ms "
          f"without ({medians[True] / medians[False]:.2f}x), 12 units, 2 ranks on gloo")


def fabric_uneven_evaluation() -> dict[str, Any]:
    """A Fabric loop that evaluates a different number of batches per rank under zero3."""
    from lightning.fabric import Fabric

    fabric = Fabric(strategy="zero3", accelerator="cpu", devices=dist.get_world_size())
    fabric.launch()
    module = Blocks()
    model, optimizer = fabric.setup(module, torch.optim.AdamW(module.parameters(), lr=1e-2))
    for x, y in rows(2, dist.get_rank()):
        fabric.backward(nn.functional.mse_loss(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
    outputs = []
    with torch.no_grad(), fabric.strategy.evaluation(model):
        for x, _ in rows(3 if dist.get_rank() == 0 else 1, 7):
            outputs.append(model(x))
    with fabric.strategy.gathered_parameters():
        whole = {k: v.detach().clone() for k, v in module.state_dict().items()}
    plain = Blocks()
    plain.load_state_dict(whole)
    with torch.no_grad():
        reference = [plain(x) for x, _ in rows(3 if dist.get_rank() == 0 else 1, 7)]
    return {"equal": all(torch.equal(a, b) for a, b in zip(outputs, reference)), "count": len(outputs)}


def test_fabric_evaluation_block_allows_uneven_forward_counts(pools) -> None:
    results = pools(2).run(fabric_uneven_evaluation)
    assert [r["count"] for r in results] == [3, 1] and all(r["equal"] for r in results)
