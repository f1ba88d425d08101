"""Optimizers that read whole parameters (Adafactor, Muon, a LAMB written here) under every stage: the
whole-parameter layout ([Note: whole parameters]) against DistributedDataParallel with the same
optimizer, per-tensor ||delta|| / ||ref|| <= 1e-5 after 10 steps; its balance, its state dicts and
checkpoints across world sizes."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_zero import ZeroConfig, ZeroEngine, needs_whole_params
from lightning_zero.sharding.layout import BySize, plan_layout
from lightning_zero.sharding.state import consolidate
from tests.helpers import _loop, build_model, param_groups, relative_errors

STEPS = 10
TOLERANCE = 1e-5


class LAMB(torch.optim.Optimizer):
    """LAMB (You et al. 2019): Adam's moments, then each parameter's step scaled by its trust ratio
    ||p|| / ||update||, a norm over the whole parameter."""

    def __init__(self, params: Any, lr: float = 0.01, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m = state["exp_avg"] / (1 - beta1 ** state["step"])
                v = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
                update = m / (v.sqrt() + group["eps"]) + group["weight_decay"] * p
                p_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, torch.ones_like(p_norm))
                p.add_(update, alpha=-group["lr"] * float(trust))


class MatrixNet(nn.Module):
    """Matrices only (Muon steps 2-D parameters alone), of three shapes, one unused on odd steps."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(7, 13, bias=False)
        self.hidden = nn.Linear(13, 11, bias=False)
        self.branch = nn.Linear(11, 11, bias=False)
        self.head = nn.Linear(11, 3, bias=False)

    def forward(self, x: torch.Tensor, use_branch: bool = True) -> torch.Tensor:
        h = torch.tanh(self.hidden(torch.tanh(self.embed(x))))
        if use_branch:
            h = h + self.branch(h)
        return self.head(h)


def _matrix_net(seed: int = 0) -> MatrixNet:
    torch.manual_seed(seed)
    return MatrixNet()


# name: (model factory, optimizer factory)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.optim.Optimizer]]] = {
    "adafactor": (build_model, lambda m: torch.optim.Adafactor(param_groups(m, 0.01), lr=0.01)),
    "lamb": (build_model, lambda m: LAMB(param_groups(m, 0.01), weight_decay=0.01)),
    "muon": (_matrix_net, lambda m: torch.optim.Muon(m.parameters(), lr=0.02)),
}


def whole_parity(name: str, stage: int, accumulate: int, comm: str = "auto", offload: str = "none") -> dict[str, Any]:
    make_model, make_opt = CASES[name]
    reference, model = make_model(), make_model()
    ddp = DistributedDataParallel(reference, find_unused_parameters=True)
    _loop(ddp, make_opt(reference), STEPS, accumulate, None, 0, engine=None)
    opt = make_opt(model)
    engine = ZeroEngine(model, opt, ZeroConfig(stage=stage, bucket_numel=150, unit_numel=100, comm=comm,
                                                  offload=offload))
    whole = engine.whole_params
    # every optimizer entry is a whole parameter in its own shape, owned by exactly one rank
    shapes = [tuple(entry.master.shape) for b in engine.trainable_buckets for entry in b.entries]
    owned = sum(entry.master.numel() for b in engine.trainable_buckets for entry in b.entries)
    _loop(model, opt, STEPS, accumulate, None, 0, engine=engine)
    # one reduction of the buckets (no padding) per step: ddp's gradient bytes, never more
    trainable = sum(b.plan.numel for b in engine.trainable_buckets) * 4
    reduced = engine.last_step_traffic.get("reduce_scatter", 0)
    engine.materialize_module()
    errors = relative_errors(model, reference)
    moved = max(relative_errors(make_model(), reference).values())
    engine.close()
    counts = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([float(owned)]))
    return {"worst": max(errors.values()), "moved": moved, "whole": whole, "shapes": shapes,
            "owned": [int(c.item()) for c in counts], "reduced": reduced / trainable}


@pytest.mark.parametrize("world_size", [2, 3])
def test_whole_tensor_optimizers_match_ddp_under_every_stage(pools, world_size) -> None:
    pool = pools(world_size)
    failures = []
    cases = [(name, stage, acc) for name in CASES for stage in (1, 2, 3) for acc in (1, 4) if (stage + acc) % 2 == 1
             or world_size == 2]
    cases += [("adafactor", 2, 4, "native"), ("muon", 3, 1, "native")]  # NCCL's call sequence, run on gloo
    cases += [("lamb", 3, 4, "auto", "optimizer"), ("muon", 2, 1, "auto", "optimizer")]  # state on the host
    for case in cases:
        result = pool.run(whole_parity, *case)[0]
        print(f"ws={world_size} {case}: worst {result['worst']:.2e} (moved {result['moved']:.2e}), "
              f"owned elements per rank {result['owned']}, reductions {result['reduced']}")
        ok = all(result["whole"]) and result["worst"] <= TOLERANCE and result["moved"] > 1e-3
        ok = ok and all(len(shape) >= 1 for shape in result["shapes"])
        # the buckets' exact bytes (no padding) per reducing backward: once per step at stage 1, every
        # micro-batch under stages 2-3's default policy
        stage, accumulate = case[1], case[2]
        ok = ok and result["reduced"] == (1.0 if stage == 1 else float(accumulate))
        if not ok:
            failures.append((case, result))
    assert not failures, failures


def test_layout_is_chosen_from_the_optimizer() -> None:
    model = build_model()
    params = list(model.parameters())
    assert needs_whole_params(torch.optim.Adafactor(params))
    assert needs_whole_params(LAMB(params))  # by its name, whatever allow_unknown says
    assert needs_whole_params(LAMB(params), allow_unknown=True)

    class Sign(torch.optim.SGD.__mro__[1]):  # a homemade class of unknown kind
        def step(self, closure: Any = None) -> None: ...

    assert needs_whole_params(Sign(params, {}))  # unknown: whole parameters are exact for it
    assert not needs_whole_params(Sign(params, {}), allow_unknown=True)  # vouched element-wise
    assert not needs_whole_params(torch.optim.AdamW(params))
    with pytest.raises(ValueError, match="LBFGS cannot be sharded by ZeRO: .*two-loop recursion"):
        needs_whole_params(torch.optim.LBFGS(params))
    with pytest.raises(ValueError, match="SparseAdam cannot be sharded by ZeRO: .*sparse gradients"):
        needs_whole_params(torch.optim.SparseAdam(params))


def test_whole_layout_balances_whole_parameters_with_uneven_bounds() -> None:
    sizes = [40, 7, 30, 5, 20, 9, 3]
    params = [(f"p{i}", nn.Parameter(torch.zeros(n))) for i, n in enumerate(sizes)]
    group_of = {p: 0 for _, p in params}
    layout = plan_layout(params, 3, BySize(10_000), group_of, whole=True)
    (bucket,) = layout.buckets
    assert bucket.bounds is not None and bucket.padded_numel == sum(sizes)  # no padding
    owned = [bucket.shard_size(rank) for rank in range(3)]
    assert sorted(owned) == [36, 38, 40]  # greedy: 40 | 30 + 5 + 3 | 20 + 9 + 7 (largest first, least loaded)
    for rank in range(3):
        pieces = layout.shard_slices(bucket, rank)
        assert all(p.start == 0 and p.numel == layout.params[p.param].numel for p in pieces)
        assert all(layout.owner(layout.params[p.param]) == rank for p in pieces)
    flat = plan_layout(params, 3, BySize(10_000), group_of)
    assert flat.buckets[0].bounds is None and flat.buckets[0].shard_numel == 38


def whole_checkpoint(tmp: str, save: bool, stage: int) -> dict[str, Any]:
    """Adafactor: its factored state (row and column vectors) saved on one world size and stage and
    loaded on another, as local states and as a full state dict."""
    model = build_model()
    opt = torch.optim.Adafactor(param_groups(model, 0.01), lr=0.01)
    engine = ZeroEngine(model, opt, ZeroConfig(stage=stage, bucket_numel=150, unit_numel=100))
    rank = dist.get_rank()
    if save:
        _loop(model, opt, 3, 1, None, 0, engine=engine)
        torch.save(engine.local_state_dict(), os.path.join(tmp, f"rank{rank}.pt"))
        full = engine.full_state_dict()
        if rank == 0:
            torch.save(full, os.path.join(tmp, "full.pt"))
        engine.close()
        return {"factors": sorted({tuple(v.shape) for s in full["optimizer"]["state"].values()
                                   for k, v in s.items() if k.endswith("_var")})}
    files = sorted(f for f in os.listdir(tmp) if f.startswith("rank"))
    states = [torch.load(os.path.join(tmp, f), weights_only=False) for f in files]
    merged = consolidate(states)
    full = torch.load(os.path.join(tmp, "full.pt"), weights_only=False)
    from tests.helpers import assert_same
    assert_same(merged["optimizer"]["state"], full["optimizer"]["state"], "consolidated vs full")
    engine.load_full_state_dict(merged)
    _loop(model, opt, 2, 1, None, 3, engine=engine)
    after = engine.full_state_dict()
    engine.close()
    return {"state": {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                      for k, s in after["optimizer"]["state"].items()},
            "params": {k: v.clone() for k, v in after["params"].items()}}


def test_whole_state_crosses_world_sizes_and_stages(pools, tmp_path) -> None:
    saved = pools(2).run(whole_checkpoint, str(tmp_path), True, 2)[0]
    assert (13, 1) in saved["factors"] and (1, 7) in saved["factors"]  # embed.weight's row and column factors
    on3 = pools(3).run(whole_checkpoint, str(tmp_path), False, 3)[0]
    on2 = pools(2).run(whole_checkpoint, str(tmp_path), False, 1)[0]
    for fqn in on2["params"]:
        assert torch.allclose(on3["params"][fqn], on2["params"][fqn], rtol=1e-6, atol=1e-7), fqn
    for fqn, values in on2["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                assert torch.allclose(on3["state"][fqn][key], value, rtol=1e-5, atol=1e-8), (fqn, key)


def trainer_whole(tmp: str) -> dict[str, float]:
    """Adafactor with an LR schedule through the Trainer: parity with Lightning's ddp under each stage
    (accumulation and clipping), then a sharded save at step 4 resumed to step 10 under another stage and
    by plain ddp, against ddp's own save and resume."""
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_zero import ZeroStrategy
    from tests.lit_helpers import LitTiny, loader, trainer
    from tests.test_checkpoint import TOTAL, resume, train_and_save

    errors: dict[str, float] = {}
    ddp = LitTiny("adafactor", schedule=True)
    trainer(DDPStrategy(find_unused_parameters=True), accumulate_grad_batches=2, gradient_clip_val=0.3).fit(
        ddp, loader(20, 2))
    for stage in (1, 2, 3):
        zero = LitTiny("adafactor", schedule=True)
        trainer(ZeroStrategy(stage=stage, bucket_numel=150), accumulate_grad_batches=2, gradient_clip_val=0.3).fit(
            zero, loader(20, 2))
        errors[f"zero{stage} fit"] = max(relative_errors(zero.net, ddp.net).values())

    def ddp_strategy() -> DDPStrategy:
        return DDPStrategy(find_unused_parameters=True)

    reference_path = os.path.join(tmp, "ddp.ckpt")
    train_and_save(ddp_strategy(), reference_path, optimizer="adafactor")
    reference = resume(ddp_strategy(), reference_path, module=LitTiny("adafactor", schedule=True))
    for saved, resumed in ((2, 3), (3, 1)):
        path = os.path.join(tmp, f"zero{saved}.ckpt")
        train_and_save(ZeroStrategy(stage=saved, bucket_numel=150), path, optimizer="adafactor")
        net = resume(ZeroStrategy(stage=resumed, bucket_numel=150), path, module=LitTiny("adafactor", schedule=True))
        errors[f"zero{saved} save -> zero{resumed} resume to step {TOTAL}"] = max(
            relative_errors(net, reference).values())
    net = resume(ddp_strategy(), os.path.join(tmp, "zero3.ckpt"), module=LitTiny("adafactor", schedule=True))
    errors["zero3 directory -> ddp resume"] = max(relative_errors(net, reference).values())
    return errors


def test_adafactor_through_the_trainer_fits_and_resumes_as_under_ddp(pools, tmp_path) -> None:
    errors = pools(2).run(trainer_whole, str(tmp_path))[0]
    for case, error in errors.items():
        print(f"{case}: {error:.2e} against ddp")
    assert all(error <= TOLERANCE for error in errors.values()), errors
