"""Exact per-rank byte accounting of model state: what this rank holds in parameters, gradients,
fp32 master slices and optimizer state, each storage counted once however many views point into it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lightning_zero.sharding.engine import ZeroEngine

__all__ = ["ModelStateBytes", "model_state_bytes"]


@dataclass(frozen=True)
class ModelStateBytes:
    """Bytes one rank holds, by kind. ``in_flight`` is transient bucket buffers of unfinished reductions."""

    parameters: int
    gradients: int
    master: int
    optimizer_state: int
    in_flight: int

    @property
    def total(self) -> int:
        """Everything above, summed."""
        return self.parameters + self.gradients + self.master + self.optimizer_state + self.in_flight


def _storage_bytes(tensors: Iterable[torch.Tensor], seen: set[int]) -> int:
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def model_state_bytes(engine: ZeroEngine) -> ModelStateBytes:
    """What this rank holds right now for ``engine``'s model (no collective)."""
    seen: set[int] = set()
    parameters = _storage_bytes([*engine.module.parameters(), *engine.param_shards.values()], seen)
    master = _storage_bytes(engine.masters.values(), seen)
    grads = [state.shard for state in engine.reducer.buckets]
    grads += [state.full for state in engine.reducer.buckets if state.full is not None]
    grads += [p.grad for p in engine.module.parameters() if p.grad is not None]
    gradients = _storage_bytes(grads, seen)
    state = engine.optimizer.optimizer.state
    optimizer_state = _storage_bytes(
        (value for values in state.values() for value in values.values() if torch.is_tensor(value)), seen
    )
    return ModelStateBytes(parameters, gradients, master, optimizer_state, engine.reducer.in_flight_bytes)
