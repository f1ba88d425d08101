"""ZeroPrecision: the Precision half of the ZeRO pair. It runs the optimizer step in ZeRO's order
(reduce, hooks, clip over the shards, step the slices, all-gather); for now in ``32-true`` only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.plugins.precision import Precision
from torch.optim import Optimizer
from typing_extensions import override

from lightning_zero.sharding.engine import ZeroEngine

__all__ = ["ZeroPrecision"]

_SUPPORTED = ("32-true",)


class ZeroPrecision(Precision):
    """Precision plugin for ``ZeroStrategy``.

    ``on_before_optimizer_step`` runs after the gradients are reduced, and clipping by norm or by value
    works on the shards (the global norm is all-reduced), as the plain plugin cannot do on sharded
    gradients.
    """

    def __init__(self, precision: Literal["32-true"] = "32-true") -> None:
        if precision not in _SUPPORTED:
            raise ValueError(
                f"ZeroPrecision supports precision {_SUPPORTED} for now, got {precision!r}; "
                "train in 32-true until mixed precision lands"
            )
        self.precision = precision
        self._engines: dict[int, ZeroEngine] = {}

    def bind(self, optimizer: Optimizer, engine: ZeroEngine) -> None:
        """Route ``optimizer``'s steps and clipping through ``engine`` (called by the strategy)."""
        self._engines[id(optimizer)] = engine

    def release(self) -> None:
        """Forget every engine (the strategy is tearing down)."""
        self._engines.clear()

    def engine_for(self, optimizer: Any) -> ZeroEngine:
        """The engine sharding ``optimizer`` (a ``LightningOptimizer`` is unwrapped)."""
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        try:
            return self._engines[id(optimizer)]
        except KeyError:
            raise RuntimeError(
                "this optimizer is not sharded by ZeroStrategy: optimizers must come from "
                "configure_optimizers() so the strategy can set them up"
            ) from None

    @override
    def optimizer_step(  # type: ignore[override]
        self,
        optimizer: Optimizer,
        model: pl.LightningModule,
        closure: Callable[[], Any],
        **kwargs: Any,
    ) -> Any:
        engine = self.engine_for(optimizer)
        closure_result = closure()
        engine.reduce_gradients()
        self._after_closure(model, optimizer)
        engine.step()
        return closure_result

    @override
    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: int | float) -> None:
        self.engine_for(optimizer).clip_grad_norm_(float(clip_val))

    @override
    def clip_grad_by_value(self, optimizer: Optimizer, clip_val: int | float) -> None:
        self.engine_for(optimizer).clip_grad_value_(float(clip_val))
