"""Dynamic loss scaling for fp16, with DeepSpeed's knobs: the scale, its backoff on overflow (after
``hysteresis`` overflows), its growth after ``loss_scale_window`` clean steps, and a floor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["DynamicLossScaler", "LossScaleAtMinimumError"]


class LossScaleAtMinimumError(RuntimeError):
    """fp16 gradients overflowed with the loss scale already at its minimum."""


@dataclass
class DynamicLossScaler:
    """Scale of the loss before backward; every rank holds the same state (updates use global overflow).

    On overflow the step is skipped; ``hysteresis`` overflows in a row (without a clean step in between
    when ``consecutive_hysteresis``) halve the scale, never below ``min_loss_scale``; an overflow at the
    minimum raises. ``loss_scale_window`` clean steps double it.
    """

    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.loss_scale_window < 1 or self.hysteresis < 1:
            raise ValueError("loss_scale_window and hysteresis must be >= 1")
        if self.min_loss_scale <= 0 or 2.0**self.initial_scale_power < self.min_loss_scale:
            raise ValueError("min_loss_scale must be > 0 and at most 2**initial_scale_power")
        self.scale = 2.0**self.initial_scale_power
        self.hysteresis_left = self.hysteresis
        self.clean_steps = 0

    def update(self, overflow: bool) -> None:
        """Account for one optimizer step that overflowed (and was skipped) or did not."""
        if overflow:
            self.clean_steps = 0
            if self.hysteresis_left > 1:
                self.hysteresis_left -= 1
                return
            if self.scale <= self.min_loss_scale:
                raise LossScaleAtMinimumError(
                    f"fp16 gradients overflowed with the loss scale at its minimum ({self.min_loss_scale}); "
                    "training has diverged or needs a wider dtype: try precision='bf16-mixed', a lower "
                    "learning rate, or gradient clipping"
                )
            self.scale = max(self.scale / 2.0, self.min_loss_scale)
            return
        if self.consecutive_hysteresis:
            self.hysteresis_left = self.hysteresis
        self.clean_steps += 1
        if self.clean_steps == self.loss_scale_window:
            self.scale *= 2.0
            self.clean_steps = 0
            self.hysteresis_left = self.hysteresis

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the current scale and counters."""
        return {"scale": self.scale, "hysteresis_left": self.hysteresis_left, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``."""
        self.scale = float(state["scale"])
        self.hysteresis_left = int(state["hysteresis_left"])
        self.clean_steps = int(state["clean_steps"])
