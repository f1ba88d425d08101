"""ZeroPrecision: the Precision half of the ZeRO pair. It owns the dtype policy, autocast, fp16 loss
scaling, and the order of one optimizer step: reduce (folding in 1/(N*scale)), check overflow globally,
hooks and clipping over the shards, step the slices, all-gather. A non-finite loss or gradient never
reaches the weights: fp16 skips the step and shrinks the loss scale; other precisions raise or skip."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.types import Optimizable
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_zero.config import PrecisionName, PrecisionPolicy
from lightning_zero.loss_scaler import DynamicLossScaler
from lightning_zero.sharding.engine import ZeroEngine
from lightning_zero.sharding.whereabouts import mark

__all__ = ["ZeroPrecision", "ZeroPrecisionCore", "cast_floats"]


class ZeroPrecisionCore:
    """What the Trainer's ``ZeroPrecision`` and Fabric's ``ZeroFabricPrecision`` share: the dtype policy,
    autocast, fp16 loss scaling and the order of one sharded optimizer step. Not used on its own.

    ``"bf16-mixed"`` / ``"16-mixed"``: parameters and gradients stored in the 16-bit dtype (norms, vectors and
    embeddings kept in fp32), autocast for compute, fp32 master slices, buffers left in fp32.
    ``"bf16-true"`` / ``"16-true"``: the whole module in the 16-bit dtype, no fp32 master. fp16 uses dynamic
    loss scaling (``initial_scale_power``, ``loss_scale_window``, ``hysteresis``, ``consecutive_hysteresis``,
    ``min_loss_scale``, as in DeepSpeed). ``reduce_dtype`` and ``accumulate_dtype`` set how gradients are
    summed across ranks and micro-batches (fp32 by default).

    Args:
        precision: "32-true", "bf16-mixed", "16-mixed" (with dynamic loss scaling), "bf16-true" or "16-true".
        reduce_dtype: dtype gradients are summed across ranks in (a torch dtype or its name; fp32 default).
        accumulate_dtype: dtype gradients accumulate across micro-batches in (fp32 default).
        initial_scale_power: fp16 only: the loss scale starts at 2**this.
        loss_scale_window: fp16 only: clean steps before the scale doubles.
        hysteresis: fp16 only: overflows tolerated before the scale halves.
        consecutive_hysteresis: fp16 only: refill the hysteresis on every clean step.
        min_loss_scale: fp16 only: an overflow at this scale raises ``LossScaleAtMinimumError``.
    """

    def __init__(
        self,
        precision: PrecisionName = "32-true",
        reduce_dtype: torch.dtype | DTypeName = torch.float32,
        accumulate_dtype: torch.dtype | DTypeName = torch.float32,
        initial_scale_power: int = 16,
        loss_scale_window: int = 1000,
        hysteresis: int = 2,
        consecutive_hysteresis: bool = False,
        min_loss_scale: float = 1.0,
    ) -> None:
        self.policy = PrecisionPolicy.from_precision(precision, _dtype(reduce_dtype), _dtype(accumulate_dtype))
        self.precision = precision
        knobs = {"initial_scale_power": (initial_scale_power, 16), "loss_scale_window": (loss_scale_window, 1000),
                 "hysteresis": (hysteresis, 2), "consecutive_hysteresis": (consecutive_hysteresis, False),
                 "min_loss_scale": (min_loss_scale, 1.0)}
        changed = [name for name, (value, default) in knobs.items() if value != default]
        if changed and not self.policy.needs_loss_scaling:
            raise ValueError(f"{', '.join(changed)} tune fp16 loss scaling, which {precision!r} does not use: drop "
                             "them, or use precision '16-mixed'")
        self.scaler = (
            DynamicLossScaler(initial_scale_power, loss_scale_window, hysteresis, consecutive_hysteresis,
                              min_loss_scale)
            if self.policy.needs_loss_scaling else None
        )
        self.device_type = "cpu"
        self.skipped_steps = 0
        #: What a non-finite loss or gradient does outside fp16 loss scaling: "raise" (naming the step and
        #: ranks) or "skip" the step on every rank. The strategy's ``nonfinite=`` sets it.
        self.nonfinite: Literal["raise", "skip"] = "raise"
        self._engines: dict[int, ZeroEngine] = {}
        #: Which of its engine's optimizers is stepping (inside ``optimizer_step``; None otherwise), so the
        #: hooks before the step read that optimizer's gradients.
        self.stepping: int | None = None

    # ------------------------------------------------------------------ binding
    def bind(self, optimizer: Optimizer, engine: ZeroEngine) -> None:
        """Route ``optimizer``'s steps and clipping through ``engine`` (called by the strategy)."""
        self._engines[id(optimizer)] = engine

    def release(self) -> None:
        """Forget every engine (the strategy is setting up again)."""
        self._engines.clear()

    def engine_for(self, optimizer: Any) -> ZeroEngine:
        """The engine sharding ``optimizer`` (a ``LightningOptimizer`` or Fabric optimizer is unwrapped)."""
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        try:
            return self._engines[id(optimizer)]
        except KeyError:
            raise RuntimeError(
                f"this optimizer is not sharded by lightning-zero: {type(self).__name__} works with the ZeRO "
                "strategies only (strategy='zero1', 'zero2' or 'zero3'), and optimizers must come from "
                "configure_optimizers() (Trainer) or go through fabric.setup(model, optimizer) (Fabric)"
            ) from None

    # ------------------------------------------------------------------ module and compute
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """``*-true`` casts the whole module (mixed: the engine casts parameters)."""
        if self.policy.whole_module_dtype is not None:
            module = module.to(self.policy.whole_module_dtype)
        return module

    def forward_context(self) -> contextlib.AbstractContextManager:
        if self.policy.compute is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.policy.compute)

    def convert_input(self, data: Any) -> Any:
        if self.policy.compute is None and self.policy.storage != torch.float32:
            return cast_floats(data, self.policy.storage)
        return data

    def tensor_init_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ backward and step
    def _before_backward(self, tensor: Tensor, flagged: list[ZeroEngine] | None = None) -> Tensor:
        """Flag a non-finite loss for the ``flagged`` engines (default: all bound) and apply the fp16 loss
        scale, in fp32 (2**16 times a 16-bit loss would overflow), telling every engine the scale it divides
        out: the loss may reach the parameters of any of them."""
        mark("backward")
        for engine in {id(e): e for e in self._engines.values()}.values():  # an engine may serve several optimizers
            engine.begin_backward()
        flagged = list(self._engines.values()) if flagged is None else flagged
        nonfinite = ~torch.isfinite(tensor.detach()).all()  # read in the step's one flag exchange: no sync here
        for engine in flagged:
            engine.loss_nonfinite = nonfinite | engine.loss_nonfinite
        if self.scaler is None:
            return tensor
        for engine in self._engines.values():
            engine.loss_scale = self.scaler.scale  # divided out once, when the gradients are reduced
        if tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.float()
        return tensor * self.scaler.scale

    @property
    def loss_scale(self) -> float:
        """The current fp16 loss scale (1.0 without loss scaling)."""
        return self.scaler.scale if self.scaler is not None else 1.0

    def _step_engine(self, engine: ZeroEngine, closure: Callable[[], Any], before_step: Callable[[], None],
                     step_name: str, optimizer: Any = None) -> Any:
        """Run ``closure``, then one sharded step of ``optimizer`` (one of the engine's; None: all): a
        non-finite loss or gradient on any rank skips it on every rank (fp16: shrink the loss scale;
        otherwise raise or skip by ``nonfinite``)."""
        which = None if optimizer is None else engine.index_of(optimizer)
        with torch.enable_grad():  # as torch's optimizers run a closure
            closure_result = closure()
        mark("optimizer step")
        bad_loss, bad_grad = engine.nonfinite_ranks()
        if self.scaler is not None:
            self.scaler.update(bool(bad_loss or bad_grad))  # an overflow: skip, shrink the scale
        if bad_loss or bad_grad:
            self.skipped_steps += 1
            # Named before the gradients are dropped (a collective; every rank is here).
            names = engine.nonfinite_params() if self.scaler is None and bad_grad and not bad_loss else []
            engine.skip_step(which)  # weights and optimizer state untouched
            if self.scaler is None:
                message = _nonfinite_message(step_name, bad_loss, bad_grad, names)
                if self.nonfinite == "raise":
                    raise FloatingPointError(
                        f"{message}; no weights were updated. Pass nonfinite='skip' to the strategy to skip such "
                        "steps, or look for the cause (learning rate, data, a log of zero)."
                    )
                rank_zero_warn(f"{message}: step skipped on every rank (nonfinite='skip')")
            return closure_result
        self.stepping = which
        try:
            before_step()
            engine.step(optimizer=which)
        finally:
            self.stepping = None
        return closure_result

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"precision": self.precision, "skipped_steps": self.skipped_steps}
        if self.scaler is not None:
            state["loss_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        if self.scaler is not None and "loss_scaler" in state_dict:
            self.scaler.load_state_dict(state_dict["loss_scaler"])


class ZeroPrecision(ZeroPrecisionCore, Precision):
    __doc__ = f"""Precision plugin for the Trainer's ``ZeroStrategy``; ``Trainer(precision=...)`` pairs it
    automatically. ``on_before_optimizer_step`` and clipping see true (unscaled, averaged) gradients; an fp16
    overflow on any rank skips the step, the hooks and clipping on every rank and leaves weights and optimizer
    state untouched. After ``fit`` the module gets whole fp32 weights back.

    {ZeroPrecisionCore.__doc__.split(chr(10), 2)[2].strip()}
    """

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Check the pairing, then cast as the policy says."""
        trainer = getattr(module, "_trainer", None)
        # ZeroStrategy marks itself, so this module needs no import of the strategy (which imports this one).
        if trainer is not None and not getattr(trainer.strategy, "pairs_with_zero_precision", False):
            raise ValueError(
                f"ZeroPrecision works only with ZeroStrategy, not {type(trainer.strategy).__name__}: use "
                "strategy='zero1', 'zero2' or 'zero3', or drop ZeroPrecision and pass precision=... to the Trainer"
            )
        return super().convert_module(module)

    @override
    def pre_backward(self, tensor: Tensor, module: pl.LightningModule) -> Tensor:  # type: ignore[override]
        Precision.pre_backward(self, tensor, module)  # the on_before_backward hooks
        return self._before_backward(tensor)

    @override
    def optimizer_step(  # type: ignore[override]
        self,
        optimizer: Optimizable,
        model: pl.LightningModule,
        closure: Callable[[], Any],
        **kwargs: Any,
    ) -> Any:
        trainer = getattr(model, "_trainer", None)
        step_name = f"optimizer step {trainer.global_step}" if trainer is not None else "this optimizer step"
        return self._step_engine(self.engine_for(optimizer), closure,
                                 lambda: self._after_closure(model, optimizer), step_name, optimizer)

    @override
    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: int | float) -> None:
        engine = self.engine_for(optimizer)
        engine.clip_grad_norm_(float(clip_val), optimizer=engine.index_of(optimizer))

    @override
    def clip_grad_by_value(self, optimizer: Optimizer, clip_val: int | float) -> None:
        engine = self.engine_for(optimizer)
        engine.clip_grad_value_(float(clip_val), optimizer=engine.index_of(optimizer))


DTypeName = Literal["float32", "bfloat16", "float16"]


def _dtype(value: torch.dtype | str) -> torch.dtype:
    """A torch dtype from itself or its name (YAML and command lines give names)."""
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in get_args(DTypeName):
        raise ValueError(f"dtype must be one of {get_args(DTypeName)} (or a torch dtype), got {value!r}")
    return getattr(torch, name)


def _nonfinite_message(step: str, bad_loss: list[int], bad_grad: list[int], names: list[str]) -> str:
    if bad_loss:
        return f"non-finite loss at {step} on rank(s) {bad_loss}"
    where = f" of {names[:5]}{' and more' if len(names) > 5 else ''}" if names else ""
    return (f"non-finite gradient{where} at {step} (the loss was finite on every rank), in the reduced shards "
            f"owned by rank(s) {bad_grad}: a reduced shard sums every rank's gradients, so the value may have come "
            "from any rank")


def cast_floats(data: Any, dtype: torch.dtype) -> Any:
    """``data`` with every floating-point tensor in ``dtype``, through any collection (namedtuples and
    dataclasses included)."""
    return apply_to_collection(data, Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t)


def check_several_optimizers(count: int, precision: ZeroPrecisionCore) -> None:
    """Refuse fp16 loss scaling with several optimizers of one model: one optimizer's overflow changes the
    scale under gradients the others have summed but not stepped yet."""
    if count > 1 and precision.scaler is not None:
        raise ValueError(
            f"16-mixed (fp16 with dynamic loss scaling) works with one optimizer per model, and this model has "
            f"{count}: use bf16-mixed, or one optimizer with several param groups"
        )
