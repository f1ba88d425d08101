"""Optimizer offload (``ZeroConfig(offload="optimizer")``): parity against DDP, the same bits as without offload
in every precision, full and local state round trips across offload settings, refusal of optimizers that
cannot step on the CPU, and the device / host byte split against the formula and ``estimate_memory``."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_zero import PrecisionPolicy, ZeroConfig, ZeroEngine, model_state_bytes
from lightning_zero.loss_scaler import DynamicLossScaler
from lightning_zero.memory import ModelStateBytes
from lightning_zero.report import ZeroMeasurement, estimate_memory
from lightning_zero.sharding import optimizer as sharded_optimizer
from lightning_zero.sharding.optimizer import check_host_steppable
from lightning_zero.sharding.state import consolidate
from tests.helpers import (
    OPTIMIZERS,
    _lr,
    assert_same,
    batch,
    build_model,
    param_groups,
    relative_errors,
    train_ddp,
    train_zero,
    twin_models,
)

STEPS = 10
TOLERANCE = 1e-6
FACTORIES = {**OPTIMIZERS, "adamw-fused": lambda groups: torch.optim.AdamW(groups, lr=0.01, fused=True)}


def _offloaded(engine: ZeroEngine) -> bool:
    """Every master slice, gradient copy and optimizer state tensor is a host tensor of its own (sharing no
    storage with the device's parameter buffers), and nothing is page-locked on this CPU-only machine."""
    flat = [b for b in engine.buckets if b.is_flat]
    device = {t.untyped_storage().data_ptr() for b in flat for t in (b.flat, b.shard)}
    trainable = engine.trainable_buckets
    host = [t for b in trainable for t in (b.master, b.host_grad)]
    host += [v for state in engine.optimizer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return (engine.offload and bool(trainable) and all(b.master is not None and b.host_grad is not None
                                                        for b in trainable)
            and all(t.device.type == "cpu" and not t.is_pinned() and t.untyped_storage().data_ptr() not in device
                    for t in host))


def _difference(saved: object, loaded: object) -> str | None:
    """Where two nested states differ bitwise (None: identical)."""
    try:
        assert_same(saved, loaded)
    except AssertionError as error:
        return str(error) or "differ"
    return None


# ---------------------------------------------------------------------------------------------- parity
def parity_case(stage: int, optimizer: str, accumulate: int) -> dict[str, Any]:
    model, reference = twin_models()
    ref_losses = train_ddp(reference, optimizer, STEPS, accumulate)
    config = ZeroConfig(stage=stage, bucket_numel=150, offload="optimizer")
    engine, losses = train_zero(model, optimizer, STEPS, config, accumulate)
    offloaded = _offloaded(engine)
    engine.materialize_module()
    errors = relative_errors(model, reference)
    engine.close()
    worst_loss = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, ref_losses))
    return {"worst_param": max(errors.values()), "worst_loss": worst_loss, "offloaded": offloaded}


# (world size, stage, optimizer, accumulate): every stage, optimizer and accumulation at 2 ranks, pruned to
# each stage meeting both optimizers and both accumulations; uneven shards and stage 3 again at 3 ranks.
PARITY = [(2, 1, "sgd", 4), (2, 1, "adamw", 1), (2, 2, "sgd", 1), (2, 2, "adamw", 4), (2, 3, "sgd", 4),
          (2, 3, "adamw", 1), (3, 3, "sgd", 4)]


def test_parity_against_ddp(pools) -> None:
    failures = []
    for world_size, *case in PARITY:
        result = max(pools(world_size).run(parity_case, *case), key=lambda r: r["worst_param"])
        print(f"offload ws={world_size} {case}: worst param {result['worst_param']:.2e}, "
              f"worst loss {result['worst_loss']:.2e}")
        if not (result["offloaded"] and result["worst_param"] <= TOLERANCE and result["worst_loss"] <= TOLERANCE):
            failures.append((world_size, case, result))
    assert not failures, failures


# ---------------------------------------------------------------------------------------------- precisions
class _Run:
    """One engine trained like ``ZeroPrecision`` would: autocast under ``*-mixed``, a 16-bit module and
    inputs under ``*-true``, dynamic loss scaling (skipping overflowing steps) under fp16."""

    def __init__(self, precision: str, stage: int, optimizer: str, offload: str, seed: int = 0) -> None:
        self.policy = PrecisionPolicy.from_precision(precision)
        model = build_model(seed)
        if self.policy.compute is None and self.policy.storage != torch.float32:
            model = model.to(self.policy.storage)  # what ZeroPrecision.convert_module does
        self.model = model
        self.engine = ZeroEngine(model, FACTORIES[optimizer](param_groups(model, _lr(optimizer))),
                                 ZeroConfig(stage=stage, bucket_numel=150, offload=offload),
                                 dtypes=self.policy.slots())
        # 2**18 overflows fp16 gradients for the first steps here: the skip path runs.
        self.scaler = (DynamicLossScaler(initial_scale_power=18, hysteresis=1)
                       if self.policy.needs_loss_scaling else None)
        self.losses: list[float] = []
        self.skipped = 0

    def train(self, start: int, stop: int, accumulate: int = 1) -> None:
        policy = self.policy
        for step in range(start, stop):
            for micro in range(accumulate):
                x, y = batch(step, micro, dist.get_rank(), dist.get_world_size())
                autocast = torch.autocast("cpu", dtype=policy.compute) if policy.compute else contextlib.nullcontext()
                with self.engine.no_sync() if micro < accumulate - 1 else contextlib.nullcontext():
                    with autocast:
                        out = self.model(x if policy.compute else x.to(policy.storage), use_branch=step % 2 == 0)
                    loss = nn.functional.mse_loss(out.float(), y) / accumulate
                    self.losses.append(loss.item())
                    if self.scaler is not None:
                        self.engine.loss_scale = self.scaler.scale
                        loss = loss * self.scaler.scale
                    loss.backward()
            if self.scaler is not None:
                overflow = self.engine.found_nonfinite_gradient()
                self.scaler.update(overflow)
                if overflow:
                    self.skipped += 1
                    self.engine.skip_step()
                    continue
            self.engine.step()


def same_bits_as_on_device(precision: str, stage: int, optimizer: str, accumulate: int) -> dict[str, Any]:
    """Offload moves where the optimizer steps, not what it computes: state, losses and skips equal bitwise."""
    runs = {}
    for offload in ("none", "optimizer"):
        run = runs[offload] = _Run(precision, stage, optimizer, offload)
        run.train(0, STEPS, accumulate)
    on_device, offloaded = runs["none"], runs["optimizer"]
    result = {
        "state": _difference(on_device.engine.full_state_dict(), offloaded.engine.full_state_dict()),
        "losses": on_device.losses == offloaded.losses,
        "skipped": (on_device.skipped, offloaded.skipped),
        "offloaded": _offloaded(offloaded.engine),
    }
    for run in runs.values():
        run.engine.close()
    return result


# (precision, stage, optimizer, accumulate): bf16-mixed in every stage, then each other precision once.
PRECISIONS = [
    ("bf16-mixed", 1, "sgd", 4), ("bf16-mixed", 2, "adamw", 1), ("bf16-mixed", 3, "adamw", 4),
    ("16-mixed", 2, "adamw", 2), ("bf16-true", 1, "adamw", 2), ("bf16-true", 3, "sgd", 1),
    ("32-true", 1, "sgd", 1), ("32-true", 2, "adamw-fused", 1),
]


def test_offload_equals_on_device_bitwise_in_every_precision(pools) -> None:
    failures = []
    for case in PRECISIONS:
        for rank, result in enumerate(pools(2).run(same_bits_as_on_device, *case)):
            skipped = result["skipped"]
            fp16_skips = 0 < skipped[0] < STEPS if case[0] == "16-mixed" else skipped[0] == 0
            ok = (result["state"] is None and result["losses"] and skipped[0] == skipped[1] and fp16_skips
                  and result["offloaded"])
            if not ok:
                failures.append((case, rank, result))
        print(f"offload {case}: bitwise equal to no offload, skipped steps {result['skipped'][0]}")
    assert not failures, failures


# ---------------------------------------------------------------------------------------------- checkpoints
def cross_round_trip(precision: str, stage: int) -> dict[str, Any]:
    """Train with and without offload; load each one's full state into a fresh engine of the other kind;
    write a parameter back through ``gathered_parameters``; continue all four. Everything stays bitwise equal
    (the loads overwrite a model built from another seed, so a missed master shows)."""
    half = STEPS // 2
    runs = {offload: _Run(precision, stage, "adamw", offload) for offload in ("optimizer", "none")}
    for run in runs.values():
        run.train(0, half)
    saved = {offload: run.engine.full_state_dict() for offload, run in runs.items()}
    for source, target in (("optimizer", "none"), ("none", "optimizer")):
        loaded = runs[f"{target} <- {source}"] = _Run(precision, stage, "adamw", target, seed=1)
        loaded.engine.load_full_state_dict(saved[source])
    out: dict[str, Any] = {"loaded": [_difference(saved["none"], run.engine.full_state_dict())
                                      for run in runs.values()]}

    # Each rank's slices, read from its host masters and state, consolidate to the same whole state.
    out["consolidated"] = []
    for name in ("optimizer", "optimizer <- none"):
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, runs[name].engine.local_state_dict())
        out["consolidated"].append(_difference(saved["none"], consolidate(ranks)))

    for run in runs.values():
        with run.engine.gathered_parameters([run.model.head.bias], modifier_rank=0):
            if dist.get_rank() == 0:
                with torch.no_grad():
                    run.model.head.bias.add_(0.25)
    out["written_back"] = all(
        not torch.equal(run.engine.full_params()["head.bias"], saved["none"]["params"]["head.bias"])
        for run in runs.values())
    for run in runs.values():
        run.train(half, STEPS)
    final = [run.engine.full_state_dict() for run in runs.values()]
    out["continued"] = [_difference(final[0], other) for other in final[1:]]
    for run in runs.values():
        run.engine.materialize_module()
    modules = [{n: p.detach() for n, p in run.model.named_parameters()} for run in runs.values()]
    out["materialized"] = [_difference(modules[0], other) for other in modules[1:]]
    out["whole"] = _difference(final[0]["params"], {n: p.float() for n, p in modules[0].items()})
    for run in runs.values():
        run.engine.close()
    return out


@pytest.mark.parametrize(("precision", "stage"), [("32-true", 1), ("bf16-mixed", 2), ("32-true", 3), ("bf16-mixed", 3)])
def test_state_round_trips_between_offload_and_not(pools, precision: str, stage: int) -> None:
    for result in pools(2).run(cross_round_trip, precision, stage):
        assert result["loaded"] == [None] * 4, result
        assert result["consolidated"] == [None, None], result
        assert result["written_back"], result
        assert result["continued"] == [None] * 3, result
        assert result["materialized"] == [None] * 3, result
        assert result["whole"] is None, result


# ---------------------------------------------------------------------------------------------- refusals
def test_config_refuses_an_unknown_offload() -> None:
    with pytest.raises(ValueError, match=r"offload must be 'none' .* or 'optimizer'"):
        ZeroConfig(offload="cpu")  # type: ignore[arg-type]


class FusedAdam(torch.optim.AdamW):
    """Stands for apex's / DeepSpeed's CUDA-only ``FusedAdam`` (found by its name)."""


def test_optimizers_that_cannot_step_on_the_cpu_are_refused(monkeypatch) -> None:
    params = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=r"capturable=True .* drop capturable=True, or .* offload='none'"):
        check_host_steppable(torch.optim.AdamW(params, capturable=True))
    with pytest.raises(ValueError, match=r"FusedAdam runs CUDA-only fused kernels.*torch\.optim\.AdamW.*'none'"):
        check_host_steppable(FusedAdam(params))
    fused = torch.optim.AdamW(params, fused=True)
    check_host_steppable(fused)  # this torch has fused CPU kernels (tested for parity above)
    monkeypatch.setattr(sharded_optimizer, "_cpu_has_fused_kernels", lambda: False)
    with pytest.raises(ValueError, match=r"fused=True .* no fused CPU kernel.*drop fused=True, or .* offload='none'"):
        check_host_steppable(fused)
    check_host_steppable(torch.optim.SGD(params, lr=0.1, momentum=0.9))


def refused_before_anything_moves() -> dict[str, Any]:
    model = build_model()
    before = [p.data_ptr() for p in model.parameters()]
    try:
        ZeroEngine(model, torch.optim.AdamW(model.parameters(), capturable=True),
                   ZeroConfig(stage=2, offload="optimizer"))
    except ValueError as error:
        message = str(error)
    else:
        message = "accepted"
    untouched = before == [p.data_ptr() for p in model.parameters()]  # not flattened into bucket buffers
    ZeroEngine(model, torch.optim.AdamW(model.parameters(), capturable=True), ZeroConfig(stage=2)).close()
    return {"message": message, "untouched": untouched}


def test_engine_refuses_at_construction(pools) -> None:
    """Refused on every rank before any collective or parameter move; the same optimizer without offload is
    accepted (the refusal is about stepping on the CPU)."""
    for result in pools(2).run(refused_before_anything_moves):
        assert "capturable=True" in result["message"] and "offload='none'" in result["message"], result
        assert result["untouched"], result


# ---------------------------------------------------------------------------------------------- bytes
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 384), nn.GELU(), nn.Linear(384, 256), nn.GELU(), nn.Linear(256, 64))


def held_bytes(cases: list[tuple[int, str]]) -> list[dict[str, Any]]:
    """Per (stage, precision): what this rank holds after one AdamW step, with and without offload."""
    rows = []
    for stage, precision in cases:
        policy = PrecisionPolicy.from_precision(precision)
        held = {}
        for offload in ("none", "optimizer"):
            model = _mlp()
            engine = ZeroEngine(model, torch.optim.AdamW(model.parameters()),
                                ZeroConfig(stage=stage, bucket_numel=2**16, unit_numel=0, offload=offload),
                                dtypes=policy.slots())
            autocast = torch.autocast("cpu", dtype=policy.compute) if policy.compute else contextlib.nullcontext()
            with autocast:
                loss = model(torch.randn(4, 256)).float().square().mean()
            loss.backward()
            engine.step()
            held[offload] = model_state_bytes(engine)
            engine.close()
        rows.append(held)
    return rows


@pytest.mark.parametrize("world_size", [2, 3])
def test_bytes_split_between_device_and_host(pools, world_size: int) -> None:
    """fp32 AdamW (K = 8), Ψ parameters, N ranks, after a step with offload="optimizer":
    device: parameters 4Ψ (stage 3: 4Ψ/N), gradients 4Ψ (stage 1) or 4Ψ/N, no master, no optimizer state;
    host: master 4Ψ/N + gradient copy 4Ψ/N + optimizer state KΨ/N. bf16-mixed: device parameters 2Ψ (stage 3:
    2Ψ/N), gradients 2Ψ + 4Ψ/N (stage 1: bf16 buffers beside the fp32 slice) or 4Ψ/N; the same host bytes.
    Each within 2%, and within 2% of ``estimate_memory(..., offload="optimizer")``."""
    psi = sum(p.numel() for p in _mlp().parameters())
    n = world_size
    cases = [(stage, precision) for stage in (1, 2, 3) for precision in ("32-true", "bf16-mixed")]
    per_rank = pools(world_size).run(held_bytes, cases)
    for index, (stage, precision) in enumerate(cases):
        size = 4 if precision == "32-true" else 2
        params = size * psi / (n if stage == 3 else 1)
        grads = 4 * psi if stage == 1 and size == 4 else (2 * psi + 4 * psi / n if stage == 1 else 4 * psi / n)
        host = {"master": 4 * psi / n, "gradients": 4 * psi / n, "optimizer_state": 8 * psi / n}
        estimate = estimate_memory(_mlp(), stage, n, precision, "adamw", offload="optimizer")
        for rank, rows in enumerate(per_rank):
            held: ModelStateBytes = rows[index]["optimizer"]
            on_device: ModelStateBytes = rows[index]["none"]
            where = f"stage {stage} N={n} {precision} rank {rank}: {held}"
            pairs = [(held.parameters, params, estimate.parameters), (held.gradients, grads, estimate.gradients),
                     *((getattr(held.host, key), value, getattr(estimate.host, key)) for key, value in host.items())]
            for got, formula, estimated in pairs:
                assert abs(got - formula) <= 0.02 * formula and abs(got - estimated) <= 0.02 * estimated, where
            assert held.master == held.optimizer_state == held.in_flight == 0, where
            assert abs(held.total - estimate.total) <= 0.02 * estimate.total, where
            # What offload takes off the device is exactly the master (if separate) and the optimizer state.
            assert on_device.device_total - held.device_total == on_device.master + on_device.optimizer_state, where
            assert held.total == held.device_total + held.host.total and on_device.host.total == 0, where
        held, on_device = per_rank[0][index]["optimizer"], per_rank[0][index]["none"]
        print(f"offload stage {stage} N={n} {precision:<10}: device {held.device_total:>9,} (estimated "
              f"{estimate.device_total:>9,}), host {held.host.total:>9,} (estimated {estimate.host.total:>9,}, "
              f"formula {sum(host.values()):>9,.0f}); without offload device {on_device.device_total:>9,}")
    metrics = ZeroMeasurement(1, held, {}).metrics()
    assert metrics["zero/bytes/host_master"] == held.host.master and metrics["zero/bytes/total"] == held.total
    table = estimate.table(held)
    assert "(optimizer offloaded to CPU)" in table and "host: optimizer" in table and "device total" in table


def test_estimate_with_offload_follows_the_formula() -> None:
    psi, n = 1_000_000, 4
    for stage in (1, 2, 3):
        plain = estimate_memory(psi, stage, n, "bf16-mixed", "adamw")
        offloaded = estimate_memory(psi, stage, n, "bf16-mixed", "adamw", offload="optimizer")
        assert offloaded.device_total == plain.total - plain.master - plain.optimizer_state
        assert (offloaded.host.master, offloaded.host.gradients, offloaded.host.optimizer_state) == (
            4 * psi // n, 4 * psi // n, 8 * psi // n)
        assert offloaded.ratio_to_ddp == offloaded.device_total / offloaded.ddp_total
    fp32 = estimate_memory(psi, 2, n, "32-true", "sgd", offload="optimizer")
    assert (fp32.parameters, fp32.gradients, fp32.master, fp32.optimizer_state) == (4 * psi, 4 * psi // n, 0, 0)
    assert fp32.host.total == 4 * psi // n + 4 * psi // n + 4 * psi // n  # master, gradient copy, momentum
    with pytest.raises(ValueError, match="offload='optimizer' is a ZeRO option"):
        estimate_memory(psi, 0, n, offload="optimizer")
    with pytest.raises(ValueError, match="offload must be"):
        estimate_memory(psi, 2, n, offload="nvme")  # type: ignore[arg-type]


def trainer_offload_run(stage: int, precision: str, tmp: str) -> dict[str, Any]:
    """Through the Trainer: ``zeroN_offload`` against ``zeroN``, then a sharded checkpoint saved with offload
    resumed without it."""
    import os

    from lightning_zero import ZeroStrategy
    from tests.lit_helpers import LitTiny, loader, trainer

    nets = {}
    for name in (f"zero{stage}", f"zero{stage}_offload"):
        module = LitTiny("adamw", schedule=True)
        fit = trainer(name, max_steps=4, max_epochs=3, precision=precision)
        fit.fit(module, loader(8, 1))
        assert fit.strategy.config.offload == ("optimizer" if name.endswith("offload") else "none")
        nets[name] = module.net
        if name.endswith("offload"):
            fit.save_checkpoint(os.path.join(tmp, "offloaded.ckpt"))
    resumed = LitTiny("adamw", schedule=True)
    trainer(ZeroStrategy(stage=stage), max_steps=6, max_epochs=3, precision=precision).fit(
        resumed, loader(8, 1), ckpt_path=os.path.join(tmp, "offloaded.ckpt"))
    return {"offload": max(relative_errors(nets[f"zero{stage}_offload"], nets[f"zero{stage}"]).values()),
            "resumed_steps": resumed.counts["optimizer_step"]}


@pytest.mark.parametrize(("stage", "precision"), [(1, "32-true"), (2, "bf16-mixed"), (3, "32-true")])
def test_offload_names_through_the_trainer(pools, tmp_path, stage: int, precision: str) -> None:
    results = pools(2).run(trainer_offload_run, stage, precision, str(tmp_path))
    print(f"zero{stage}_offload {precision} against zero{stage} through the Trainer: {results[0]['offload']:.1e}")
    assert all(r["offload"] == 0.0 and r["resumed_steps"] == 2 for r in results), results
