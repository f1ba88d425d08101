"""Shared pieces of the distributed tests: a small model with every awkward feature, its data, and
training loops for the engine and for the DistributedDataParallel reference."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_zero import ZeroConfig, ZeroEngine

GLOBAL_BATCH = 12  # divisible by 2, 3 and 4, so every world size sees the same global batch


class TinyNet(nn.Module):
    """449 trainable elements (odd), a frozen layer, a branch without gradients on odd steps, a 1-element
    parameter and a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(7, 13)
        self.hidden = nn.Linear(13, 11)
        self.frozen = nn.Linear(11, 11)
        self.frozen.requires_grad_(False)
        self.branch = nn.Linear(11, 11)
        self.norm = nn.LayerNorm(11)
        self.head = nn.Linear(11, 3)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, use_branch: bool = True) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        h = torch.tanh(self.hidden(h))
        h = self.frozen(h)
        if use_branch:
            h = h + self.branch(h)
        return self.head(self.norm(h)) * self.scale


def build_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def param_groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """Two groups with different lr and weight decay; the frozen layer stays out."""
    first = [model.embed.weight, model.embed.bias, model.hidden.weight, model.hidden.bias, model.scale]
    second = [p for n, p in model.named_parameters() if n.startswith(("branch", "norm", "head"))]
    return [
        {"params": first, "lr": lr, "weight_decay": 0.0},
        {"params": second, "lr": lr * 0.5, "weight_decay": 0.01},
    ]


OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]]], torch.optim.Optimizer]] = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=0.01),
    "adafactor": lambda groups: torch.optim.Adafactor(groups, lr=0.01),  # whole parameters
}


def batch(step: int, micro: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch of (step, micro); ranks see different rows."""
    gen = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(GLOBAL_BATCH, 7, generator=gen)
    y = torch.randn(GLOBAL_BATCH, 3, generator=gen)
    rows = GLOBAL_BATCH // world_size
    return x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]


def loss_of(model: nn.Module, step: int, micro: int, accumulate: int) -> torch.Tensor:
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = batch(step, micro, rank, world)
    out = model(x, use_branch=step % 2 == 0)
    return nn.functional.mse_loss(out, y) / accumulate


def train_ddp(model: nn.Module, optimizer: str, steps: int, accumulate: int = 1, clip: tuple[str, float] | None = None,
              start: int = 0) -> list[float]:
    """The reference: DistributedDataParallel with ``no_sync`` accumulation."""
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    opt = OPTIMIZERS[optimizer](param_groups(model, _lr(optimizer)))
    return _loop(ddp, opt, steps, accumulate, clip, start, engine=None)


def train_zero(model: nn.Module, optimizer: str, steps: int, config: ZeroConfig, accumulate: int = 1,
               clip: tuple[str, float] | None = None, start: int = 0) -> tuple[ZeroEngine, list[float]]:
    opt = OPTIMIZERS[optimizer](param_groups(model, _lr(optimizer)))
    engine = ZeroEngine(model, opt, config)
    return engine, _loop(model, opt, steps, accumulate, clip, start, engine=engine)


def _lr(optimizer: str) -> float:
    return 0.05 if optimizer == "sgd" else 0.01


def _loop(model: nn.Module, opt: torch.optim.Optimizer, steps: int, accumulate: int,
          clip: tuple[str, float] | None, start: int, engine: ZeroEngine | None) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        total = 0.0
        for micro in range(accumulate):
            last = micro == accumulate - 1
            sync = engine.no_sync() if engine is not None else model.no_sync()
            if last:
                loss = loss_of(model, step, micro, accumulate)
                loss.backward()
            else:
                with sync:
                    loss = loss_of(model, step, micro, accumulate)
                    loss.backward()
            total += loss.item()
        losses.append(total)
        if engine is not None:
            if clip is not None:
                (engine.clip_grad_norm_ if clip[0] == "norm" else engine.clip_grad_value_)(clip[1])
            engine.step()
        else:
            if clip is not None:
                params = [p for p in model.parameters() if p.grad is not None]
                if clip[0] == "norm":
                    torch.nn.utils.clip_grad_norm_(params, clip[1])
                else:
                    torch.nn.utils.clip_grad_value_(params, clip[1])
            opt.step()
            opt.zero_grad(set_to_none=True)
    return losses


def relative_errors(model: nn.Module, reference: nn.Module) -> dict[str, float]:
    """Per tensor ||p - ref|| / ||ref||: the one parity metric of the project."""
    ref = dict(reference.named_parameters())
    return {
        name: ((p.detach() - ref[name].detach()).norm() / ref[name].detach().norm().clamp_min(1e-12)).item()
        for name, p in model.named_parameters()
    }


def twin_models(seed: int = 0) -> tuple[TinyNet, TinyNet]:
    model = build_model(seed)
    return model, copy.deepcopy(model)


def assert_same(saved: object, loaded: object, where: str = "") -> None:
    """Nested dicts, lists and tensors equal exactly (tensors bitwise)."""
    if isinstance(saved, dict):
        assert isinstance(loaded, dict) and saved.keys() == loaded.keys(), where
        for key in saved:
            assert_same(saved[key], loaded[key], f"{where}/{key}")
    elif isinstance(saved, (list, tuple)):
        assert len(saved) == len(loaded), where
        for i, (a, b) in enumerate(zip(saved, loaded)):
            assert_same(a, b, f"{where}[{i}]")
    elif torch.is_tensor(saved):
        assert torch.equal(saved, loaded), where
    else:
        assert saved == loaded, where
