"""Mixed precision: bf16 against a reference with the same casting, the memory table, fp16 loss scaling
(overflow on one rank, hysteresis, growth, the minimum, resume), and bad input."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_zero import ZeroConfig, ZeroEngine, ZeroPrecision, ZeroStrategy, model_state_bytes
from lightning_zero.config import PrecisionPolicy
from lightning_zero.loss_scaler import DynamicLossScaler, LossScaleAtMinimumError
from lightning_zero.sharding.layout import full_precision_params
from tests.dist_pool import RankError
from tests.helpers import OPTIMIZERS, _lr, build_model, loss_of, param_groups
from tests.lit_helpers import LitTiny, loader, trainer

STEPS = 10


# ---------------------------------------------------------------------------------------------- parity
def _reference_step(model: nn.Module, masters: dict[str, torch.Tensor], accumulated: dict[str, torch.Tensor],
                    reduce_now: bool) -> None:
    """Stage 0 with fp32 masters: fp32 all-reduce of the bf16 gradients, summed in fp32."""
    for name, param in model.named_parameters():
        if name not in masters or param.grad is None:
            continue
        if reduce_now:
            grad = param.grad.float()
            dist.all_reduce(grad)
            accumulated[name] = accumulated.get(name, torch.zeros_like(grad)) + grad
            param.grad = None


def bf16_parity(stage: int, optimizer: str, accumulate: int, policy: str) -> float:
    model = build_model()
    reference = copy.deepcopy(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    masters = {n: p.detach().clone() for n, p in reference.named_parameters() if n in trainable}
    # Matrices are stored in bf16; norms, vectors and embeddings stay fp32 (their own masters).
    kept = full_precision_params(reference)
    wide = {n for n, p in reference.named_parameters() if p in kept}
    assert wide and len(wide) < len(trainable)
    for name, param in reference.named_parameters():
        if name in trainable and name not in wide:
            param.data = param.data.to(torch.bfloat16)
    master_model = copy.deepcopy(build_model())  # holds fp32 master tensors as parameters, for the optimizer
    with torch.no_grad():
        for name, param in master_model.named_parameters():
            if name in masters:
                param.copy_(masters[name])
    ref_opt = OPTIMIZERS[optimizer](param_groups(master_model, _lr(optimizer)))
    engine = ZeroEngine(model, OPTIMIZERS[optimizer](param_groups(model, _lr(optimizer))),
                        ZeroConfig(stage=stage, bucket_numel=150, reduce_policy=policy),
                        dtypes=PrecisionPolicy.from_precision("bf16-mixed").slots())
    every = engine.reduce_policy == "every_micro_batch"
    for step in range(STEPS):
        accumulated: dict[str, torch.Tensor] = {}
        for micro in range(accumulate):
            last = micro == accumulate - 1
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ref_loss = loss_of(reference, step, micro, accumulate)
            ref_loss.backward()
            _reference_step(reference, masters, accumulated, reduce_now=every or last)
            with engine.no_sync() if not last else torch.enable_grad():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = loss_of(model, step, micro, accumulate)
                loss.backward()
        for name, param in master_model.named_parameters():
            param.grad = accumulated[name] / dist.get_world_size() if name in accumulated else None
        ref_opt.step()
        ref_opt.zero_grad()
        with torch.no_grad():
            for name, param in reference.named_parameters():
                if name in trainable:
                    param.copy_(dict(master_model.named_parameters())[name])
        engine.step()
    full = engine.full_params()
    engine.close()
    assert all(p.dtype == (torch.float32 if n in wide else torch.bfloat16)
               for n, p in model.named_parameters() if n in trainable)
    return max(
        ((full[n] - p.detach()).norm() / p.detach().norm()).item()
        for n, p in master_model.named_parameters() if n in trainable
    )


@pytest.mark.parametrize("world_size", [2, 3])
def test_bf16_mixed_matches_stage_0_with_fp32_masters(pools, world_size: int) -> None:
    cases = [(1, "sgd", 1, "auto"), (2, "sgd", 4, "boundary"), (2, "adamw", 4, "every_micro_batch"),
             (1, "adamw", 4, "boundary")]
    worst = {case: max(pools(world_size).run(bf16_parity, *case)) for case in cases}
    print({k: f"{v:.1e}" for k, v in worst.items()})
    assert all(v <= 1e-5 for v in worst.values()), worst


# ---------------------------------------------------------------------------------------------- memory
def bf16_bytes(stage: int, reduce_dtype: torch.dtype, accumulate_dtype: torch.dtype) -> dict[str, int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 384), nn.GELU(), nn.Linear(384, 256), nn.GELU(), nn.Linear(256, 64))
    psi = sum(p.numel() for p in model.parameters())
    policy = PrecisionPolicy.from_precision("bf16-mixed", reduce_dtype, accumulate_dtype)
    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters()),
                        ZeroConfig(stage=stage, bucket_numel=2**16), dtypes=policy.slots())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(4, 256)).float().square().mean()
    loss.backward()
    engine.step()
    held = model_state_bytes(engine)
    engine.close()
    return {"psi": psi, "world": dist.get_world_size(), "total": held.total, "in_flight": held.in_flight,
            "gradients": held.gradients, "parameters": held.parameters}


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_mixed_bytes_per_rank(pools, world_size: int, stage: int) -> None:
    for reduce_dtype, label in ((torch.bfloat16, "bf16 reduce/accumulate"), (torch.float32, "fp32 default")):
        got = pools(world_size).run(bf16_bytes, stage, reduce_dtype, reduce_dtype)[0]
        psi, n = got["psi"], got["world"]
        formula = (2 * psi + 2 * psi + 12 * psi / n) if stage == 1 else (2 * psi + 14 * psi / n)
        # An fp32 gradient slice costs 4 bytes per owned element instead of 2 (stage 2: +2Ψ/N); stage 1
        # keeps it beside its bf16 full gradients instead of reducing in place (+4Ψ/N).
        extra = 0 if reduce_dtype == torch.bfloat16 else (4 * psi / n if stage == 1 else 2 * psi / n)
        expected = formula + extra
        print(f"bf16-mixed stage {stage} N={n} {label}: {got['total']:,} bytes, expected {expected:,.0f} "
              f"(formula {formula:,.0f} + {extra:,.0f}), {got['total'] / expected - 1:+.3%}")
        assert got["in_flight"] == 0 and got["parameters"] == pytest.approx(2 * psi, rel=0.02)
        assert abs(got["total"] - expected) <= 0.02 * expected


# ---------------------------------------------------------------------------------------------- scaler
def test_scaler_hysteresis_growth_and_minimum() -> None:
    scaler = DynamicLossScaler(initial_scale_power=3, loss_scale_window=2, hysteresis=2, min_loss_scale=2.0)
    scaler.update(True)
    assert scaler.scale == 8.0  # first overflow eaten by hysteresis
    scaler.update(True)
    assert scaler.scale == 4.0
    scaler.update(True)
    assert scaler.scale == 2.0  # hysteresis stays spent until the next growth
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 4.0 and scaler.hysteresis_left == 2  # grown after the window
    scaler.update(True)
    scaler.update(True)
    assert scaler.scale == 2.0
    with pytest.raises(LossScaleAtMinimumError, match="minimum"):
        scaler.update(True)
    with pytest.raises(ValueError):
        DynamicLossScaler(loss_scale_window=0)


class Overflowing(LitTiny):
    """Injects an inf, on rank 0 only, into one gradient element that another rank owns, at chosen
    optimizer steps; records weights, the scale and whether the optimizer stepped."""

    def __init__(self, overflow_steps: tuple[int, ...]) -> None:
        super().__init__("sgd")
        self.overflow_steps = set(overflow_steps)
        self.trace: list[dict[str, Any]] = []
        self._before: torch.Tensor | None = None

    def on_fit_start(self) -> None:
        target = self.net.head.weight
        if dist.get_rank() == 0:
            target.register_hook(self._inject)

    def _inject(self, grad: torch.Tensor) -> torch.Tensor:
        if self.trainer.global_step in self.overflow_steps:
            grad = grad.clone()
            grad.view(-1)[-1] = float("inf")  # the head's last element lives in the last rank's slice
        return grad

    def on_train_start(self) -> None:
        self.start_scale = self.trainer.precision_plugin.loss_scale

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._before = torch.cat([p.detach().float().reshape(-1) for p in self.net.parameters()])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        after = torch.cat([p.detach().float().reshape(-1) for p in self.net.parameters()])
        self.trace.append({"step": self.trainer.global_step, "unchanged": torch.equal(after, self._before),
                           "scale": self.trainer.precision_plugin.loss_scale})


def fp16_overflow_run(overflow_steps: tuple[int, ...], window: int, power: int, hysteresis: int,
                      steps: int, ckpt: str | None = None) -> dict[str, Any]:
    plugin = ZeroPrecision("16-mixed", initial_scale_power=power, loss_scale_window=window,
                           hysteresis=hysteresis, min_loss_scale=1.0)
    module = Overflowing(overflow_steps)
    fit = trainer(ZeroStrategy(stage=2, bucket_numel=150), plugins=[plugin], max_steps=steps,
                  enable_checkpointing=False)
    fit.fit(module, loader(steps + 4, 1))
    owner = None
    if ckpt is not None:
        fit.save_checkpoint(ckpt)
    return {"trace": module.trace, "skipped": plugin.skipped_steps, "scale": plugin.loss_scale,
            "state": plugin.state_dict(), "owner": owner, "dtype": str(next(module.net.parameters()).dtype)}


def test_fp16_overflow_on_one_rank_skips_everywhere(pools) -> None:
    # hysteresis 2: the overflow at step 2 is absorbed, the one at step 3 halves the scale; window 3 then
    # doubles it after three clean steps (steps 4, 5, 6).
    results = pools(2).run(fp16_overflow_run, (2, 3), 3, 8, 2, 8)
    for result in results:
        # the step counter does not move on a skipped step? Lightning counts it; what matters is the weights
        trace = {entry["step"]: entry for entry in result["trace"]}
        unchanged = [entry["unchanged"] for entry in result["trace"]]
        print(f"trace: {[(e['step'], e['unchanged'], e['scale']) for e in result['trace']]}")
        assert unchanged == [False, False, True, True, False, False, False, False]
        scales = [entry["scale"] for entry in result["trace"]]
        assert scales == [256.0, 256.0, 256.0, 128.0, 128.0, 128.0, 256.0, 256.0]
        assert result["skipped"] == 2 and result["dtype"] == "torch.float32"  # fp32 weights after fit
        assert trace and results[0]["trace"] == results[1]["trace"]


def test_fp16_overflow_at_minimum_scale_raises_on_every_rank(pools) -> None:
    with pytest.raises(RankError) as info:
        pools(2).run(fp16_overflow_run, (1, 2, 3), 1000, 1, 1, 6)
    assert sorted(info.value.tracebacks) == [0, 1]
    assert all("LossScaleAtMinimumError" in text for text in info.value.tracebacks.values())


def fp16_resume(path: str) -> dict[str, Any]:
    first = fp16_overflow_run((1, 2), 1000, 8, 1, 4, ckpt=path)
    plugin = ZeroPrecision("16-mixed", initial_scale_power=8, hysteresis=1)
    module = Overflowing(())
    fit = trainer(ZeroStrategy(stage=1, bucket_numel=150), plugins=[plugin], max_steps=6, max_epochs=3)
    fit.fit(module, loader(10, 1), ckpt_path=path)
    assert fit.global_step == 6 and len(module.trace) == 2
    return {"saved": first["state"], "resumed_first_scale": module.start_scale, "state": plugin.state_dict()}


def test_fp16_loss_scale_is_restored_on_resume(pools, tmp_path) -> None:
    result = pools(2).run(fp16_resume, str(tmp_path / "fp16.ckpt"))[0]
    assert result["saved"]["loss_scaler"]["scale"] == 64.0  # 256 halved twice (hysteresis 1)
    assert result["resumed_first_scale"] == 64.0 and result["state"]["skipped_steps"] == 2


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_precision_input_names_the_fix() -> None:
    with pytest.raises(ValueError, match="not supported by ZeRO"):
        ZeroPrecision("64-true")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="master=torch.float32"):
        PrecisionPolicy(torch.bfloat16, torch.bfloat16, torch.float32, torch.float32, torch.float16)
    with pytest.raises(ValueError, match="floating point"):
        PrecisionPolicy(torch.bfloat16, None, torch.int32, torch.float32, torch.float32)


def zero_precision_on_ddp() -> None:
    from lightning.pytorch.strategies import DDPStrategy

    trainer(DDPStrategy(), plugins=[ZeroPrecision("bf16-mixed")]).fit(LitTiny(), loader(2, 1))


def test_zero_precision_on_a_non_zero_strategy_is_refused(pools) -> None:
    with pytest.raises(RankError) as info:
        pools(2).run(zero_precision_on_ddp)
    assert all("works only with ZeroStrategy" in text for text in info.value.tracebacks.values())


def bf16_trainer_run() -> dict[str, Any]:
    module = LitTiny("adamw")
    fit = trainer(ZeroStrategy(stage=2, bucket_numel=150), precision="bf16-mixed", max_steps=4)
    fit.fit(module, loader(4, 1))
    return {"dtype": str(module.net.head.weight.dtype), "plugin": type(fit.precision_plugin).__name__,
            "norm_dtype": str(module.net.norm.weight.dtype)}


def test_bf16_mixed_through_the_trainer_returns_fp32_weights(pools) -> None:
    for result in pools(2).run(bf16_trainer_run):
        assert result == {"dtype": "torch.float32", "plugin": "ZeroPrecision", "norm_dtype": "torch.float32"}


# ---------------------------------------------------------------------------------------------- 100 steps
LOSS_MARGIN = 0.01  # relative, on the mean loss of the last 10 of 100 steps (measured: 0.01%)


def gpt_loss_curve(precision: str, stage: int) -> list[float]:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from gpt import GPT, corpus, sample_batch

    torch.manual_seed(0)
    model = GPT()
    policy = PrecisionPolicy.from_precision(precision)
    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters(), lr=3e-3),
                        ZeroConfig(stage=stage, bucket_numel=2**15), dtypes=policy.slots())
    data = corpus()
    generator = torch.Generator().manual_seed(1 + dist.get_rank())
    losses = []
    for _ in range(100):
        x, y = sample_batch(data, 8, model.block, generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=policy.compute is not None):
            loss = model.loss(x, y)
        loss.backward()
        engine.step()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / dist.get_world_size())
    engine.close()
    return losses


def test_bf16_mixed_100_step_loss_tracks_fp32(pools) -> None:
    fp32 = pools(2).run(gpt_loss_curve, "32-true", 2)[0]
    bf16 = pools(2).run(gpt_loss_curve, "bf16-mixed", 2)[0]
    end32, end16 = sum(fp32[-10:]) / 10, sum(bf16[-10:]) / 10
    print(f"100 steps: fp32 {fp32[0]:.3f} -> {end32:.4f}, bf16-mixed {bf16[0]:.3f} -> {end16:.4f} "
          f"({end16 / end32 - 1:+.2%})")
    assert end32 < 0.6 * fp32[0]  # it learned
    assert abs(end16 - end32) <= LOSS_MARGIN * end32


# ---------------------------------------------------------------------------------------------- fp32 kept
def kept_dtypes(built: str) -> dict[str, tuple[str, str]]:
    """(storage, master) dtype of each parameter's bucket under bf16-mixed, for a model built whole in fp32,
    under ``sharded_init`` (stage 3), or already in bf16."""
    from lightning_zero.sharding.init import sharded_init

    torch.manual_seed(0)
    context = sharded_init() if built == "sharded_init" else contextlib.nullcontext()
    with context:
        model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 8), nn.LayerNorm(8))
    if built == "bf16":
        model = model.to(torch.bfloat16)
    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters()), ZeroConfig(stage=3 if built != "whole" else 2),
                        dtypes=PrecisionPolicy.from_precision("bf16-mixed").slots())
    out = {}
    for record in engine.layout.params:
        slots = engine.layout.buckets[record.bucket].dtypes
        out[record.fqn] = (str(slots.storage).removeprefix("torch."), str(slots.master).removeprefix("torch."))
    engine.close()
    return out


def test_mixed_precision_keeps_what_autocast_never_casts_in_fp32(pools) -> None:
    for built in ("whole", "sharded_init"):  # a placeholder's true shape decides, not its empty one
        got = pools(2).run(kept_dtypes, built)[0]
        assert got["1.weight"] == ("bfloat16", "float32"), (built, got)  # a matrix autocast casts
        for name in ("0.weight", "1.bias", "2.weight", "2.bias"):  # embedding, vector, norm
            assert got[name] == ("float32", "float32"), (built, name, got)
    # Parameters already in bf16 keep an fp32 master slice (nothing in fp32 to keep).
    got = pools(2).run(kept_dtypes, "bf16")[0]
    assert all(dtypes == ("bfloat16", "float32") for dtypes in got.values()), got
