"""The sharded optimizer: which optimizers are accepted, and the user's optimizer object keeps working."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn, optim

from lightning_zero import ZeroConfig, ZeroEngine, check_elementwise
from tests.helpers import _loop, build_model, param_groups, relative_errors


def _params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: optim.LBFGS(p), "two-loop recursion"),
        (lambda p: optim.Adafactor(p), "factors the second moment"),
        (lambda p: optim.SparseAdam(p), "sparse gradients"),
        (lambda p: optim.Muon([nn.Parameter(torch.zeros(3, 3))]), "orthogonalises"),
    ],
)
def test_non_elementwise_optimizers_are_refused_with_the_reason(make, reason) -> None:
    with pytest.raises(ValueError, match=reason):
        check_elementwise(make(_params()))


def test_subclass_of_a_refused_optimizer_is_refused() -> None:
    class MyLBFGS(optim.LBFGS):
        pass

    with pytest.raises(ValueError, match="two-loop recursion"):
        check_elementwise(MyLBFGS(_params()), allow_unknown=True)


def test_lamb_style_trust_ratio_is_refused_by_name() -> None:
    class LAMB(optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 1e-3})

    with pytest.raises(ValueError, match="trust ratio"):
        check_elementwise(LAMB(_params()))


def test_unknown_optimizer_needs_explicit_opt_in() -> None:
    class Custom(optim.SGD):
        pass

    with pytest.raises(ValueError, match="allow_unknown_optimizer=True"):
        check_elementwise(Custom(_params(), lr=0.1))
    check_elementwise(Custom(_params(), lr=0.1), allow_unknown=True)


ELEMENTWISE = {
    "SGD": lambda g: optim.SGD(g, lr=0.05, momentum=0.9, nesterov=True),
    "Adam": lambda g: optim.Adam(g, lr=0.01, amsgrad=True),
    "AdamW": lambda g: optim.AdamW(g, lr=0.01),
    "Adagrad": lambda g: optim.Adagrad(g, lr=0.05, lr_decay=0.01),
    "RMSprop": lambda g: optim.RMSprop(g, lr=0.01, momentum=0.5, centered=True),
    "Adamax": lambda g: optim.Adamax(g, lr=0.01),
    "NAdam": lambda g: optim.NAdam(g, lr=0.01),
    "RAdam": lambda g: optim.RAdam(g, lr=0.01),
    "Adadelta": lambda g: optim.Adadelta(g, lr=1.0),
    "ASGD": lambda g: optim.ASGD(g, lr=0.05),
    "Rprop": lambda g: optim.Rprop(g, lr=0.01),
}


def every_elementwise_optimizer_matches_ddp() -> dict[str, float]:
    from torch.nn.parallel import DistributedDataParallel

    worst = {}
    for name, make in ELEMENTWISE.items():
        model = build_model()
        reference = copy.deepcopy(model)
        ddp = DistributedDataParallel(reference, find_unused_parameters=True)
        ref_opt = make(param_groups(reference, 0.05))
        opt = make(param_groups(model, 0.05))
        engine = ZeroEngine(model, opt, ZeroConfig(stage=2, bucket_numel=150))
        scheduler = optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        ref_scheduler = optim.lr_scheduler.StepLR(ref_opt, step_size=3, gamma=0.5)
        for step in range(8):
            _loop(ddp, ref_opt, 1, 2, None, step, engine=None)
            _loop(model, opt, 1, 2, None, step, engine=engine)
            scheduler.step()
            ref_scheduler.step()
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == 0.05 * 0.25
        worst[name] = max(relative_errors(model, reference).values())
        engine.close()
    return worst


def test_every_elementwise_optimizer_matches_ddp_with_lr_schedule(pools) -> None:
    worst = pools(3).run(every_elementwise_optimizer_matches_ddp)[0]
    print({k: f"{v:.1e}" for k, v in worst.items()})
    assert all(v <= 1e-5 for v in worst.values()), worst


def users_optimizer_object_keeps_working() -> None:
    import warnings

    model = build_model()
    opt = optim.SGD(param_groups(model, 0.1), lr=0.1, momentum=0.9)
    groups = list(opt.param_groups)
    engine = ZeroEngine(model, opt, ZeroConfig(stage=1))
    assert engine.optimizer.optimizer is opt and all(a is b for a, b in zip(groups, opt.param_groups))
    scheduler = optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        _loop(model, opt, 1, 1, None, 0, engine=engine)
        scheduler.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(0.05 / 2)
    with pytest.raises(RuntimeError, match="step it through the engine"):
        opt.step()
    engine.close()


def test_users_optimizer_object_keeps_working(pools) -> None:
    pools(2).run(users_optimizer_object_keeps_working)


def optimizer_with_existing_state_is_sliced() -> None:
    """An optimizer that already stepped keeps its state: wrapping slices it, it is not reset."""
    model = build_model()
    opt = optim.Adam(param_groups(model, 0.1))
    model(torch.randn(2, 7)).sum().backward()
    opt.step()
    opt.zero_grad()
    reference = {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()}
                 for k, s in opt.state_dict()["state"].items()}
    names = [n for g in param_groups(model, 0.1) for n in g["params"]]
    engine = ZeroEngine(model, opt)
    full = engine.full_state_dict()["optimizer"]["state"]
    fqn = {p: n for n, p in model.named_parameters()}
    for index, param in enumerate(names):
        for key, value in reference[index].items():
            assert torch.equal(full[fqn[param]][key], value), (fqn[param], key)
    engine.close()


def test_optimizer_with_existing_state_is_sliced(pools) -> None:
    pools(3).run(optimizer_with_existing_state_is_sliced)


def foreign_tensor_or_nothing_trainable_is_refused() -> None:
    model = build_model()
    stray = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="not a parameter of the module"):
        ZeroEngine(model, optim.SGD([*model.parameters(), stray], lr=0.1))
    frozen = build_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        ZeroEngine(frozen, optim.SGD(frozen.parameters(), lr=0.1))


def test_foreign_tensor_or_nothing_trainable_is_refused(pools) -> None:
    pools(2).run(foreign_tensor_or_nothing_trainable_is_refused)
