"""Optimizer calls that must go through the engine once ZeRO has re-pointed an optimizer at its slices.

[Note: routed optimizer calls]
Fabric wraps the optimizer in a ``_FabricOptimizer`` whose class derives from the optimizer's own class, so
``optimizer.zero_grad()``, ``optimizer.state_dict()`` and ``optimizer.load_state_dict()`` in the user's loop
resolve on that class, not on the instance. After ZeRO re-points the optimizer at this rank's slices those
three would act on slices only: ``zero_grad`` would leave the engine's gradient buckets full, and the state
dicts would hold one rank's share. So at setup the optimizer's class is swapped for a subclass (same name)
whose three methods go through the engine: ``zero_grad`` clears the engine's window, ``state_dict`` returns
the whole state keyed by parameter name (a collective), ``load_state_dict`` takes that or a ``ddp`` one.
The Trainer's strategy routes ``zero_grad`` alone, and only with several optimizers: each optimizer's
``zero_grad()`` then clears its own parameters' gradients in the engine, as under ``ddp`` (see [Note: several
optimizers]); Lightning's ``LightningOptimizer`` derives its class from the optimizer's in the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from lightning_zero.checkpoint import restore_optimizer
from lightning_zero.config import ZeroConfig
from lightning_zero.precision import ZeroPrecisionCore, check_several_optimizers
from lightning_zero.sharding.engine import ZeroEngine

__all__ = ["route_through_engine", "shard_together"]

_ROUTED: dict[tuple[type, tuple[str, ...]], type] = {}


ALL_METHODS = ("zero_grad", "state_dict", "load_state_dict")


def route_through_engine(optimizer: Optimizer, engine: ZeroEngine, methods: tuple[str, ...] = ALL_METHODS) -> None:
    """Send ``optimizer``'s ``methods`` (of ``zero_grad``, ``state_dict``, ``load_state_dict``) through
    ``engine``; see [Note: routed optimizer calls]."""
    cls = type(optimizer)
    if getattr(cls, "_lightning_zero_routed", False):
        cls = cls.__mro__[1]
    routed = _ROUTED.get((cls, methods))
    if routed is None:
        own = {"zero_grad": _zero_grad, "state_dict": _state_dict, "load_state_dict": _load_state_dict}
        routed = type(cls.__name__, (cls,), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__, "_lightning_zero_routed": True,
            **{name: own[name] for name in methods},
        })
        _ROUTED[(cls, methods)] = routed
    optimizer.__class__ = routed
    optimizer._lightning_zero_engine = engine  # type: ignore[attr-defined]


def _engine(optimizer: Any) -> tuple[Optimizer, ZeroEngine]:
    inner = getattr(optimizer, "_optimizer", optimizer)  # a _FabricOptimizer
    return inner, inner._lightning_zero_engine


def _zero_grad(self: Any, set_to_none: bool = True) -> None:
    inner, engine = _engine(self)
    if engine.window_open:
        engine.zero_grad(engine.index_of(inner) if len(engine.optimizers) > 1 else None)
    type(inner).__mro__[1].zero_grad(inner, set_to_none)


def _state_dict(self: Any) -> dict[str, Any]:
    inner, engine = _engine(self)
    return engine.sharded(inner).full_state_dict(engine.group)


def _load_state_dict(self: Any, state_dict: dict[str, Any]) -> None:
    inner, engine = _engine(self)
    restore_optimizer(engine, state_dict, None, engine.index_of(inner))


def shard_together(module: torch.nn.Module, optimizers: list[Optimizer], config: ZeroConfig,
                   precision: ZeroPrecisionCore, methods: tuple[str, ...]) -> ZeroEngine:
    """One engine for ``module`` and all its ``optimizers`` (see [Note: several optimizers]), each optimizer
    bound to it in the precision plugin and its ``methods`` routed through it."""
    check_several_optimizers(len(optimizers), precision)
    engine = ZeroEngine(module, optimizers, config, dtypes=precision.policy.slots())
    for optimizer in optimizers:
        precision.bind(optimizer, engine)
        if methods:
            route_through_engine(optimizer, engine, methods)
    return engine
