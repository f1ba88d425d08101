"""Exact per-rank byte accounting of model state: what this rank holds in parameters, gradients,
fp32 master slices and optimizer state, on the device and (optimizer offload) in host memory, each storage
counted once however many views point into it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lightning_zero.sharding.engine import ZeroEngine

__all__ = ["HostBytes", "ModelStateBytes", "model_state_bytes"]


@dataclass(frozen=True)
class HostBytes:
    """Model state one rank keeps in host memory under ``ZeroConfig(offload="optimizer")``: the master
    slices, the gradient slices copied there for the optimizer, and the optimizer state. All zero otherwise."""

    master: int = 0
    gradients: int = 0
    optimizer_state: int = 0

    @property
    def total(self) -> int:
        """The three, summed."""
        return self.master + self.gradients + self.optimizer_state


@dataclass(frozen=True)
class ModelStateBytes:
    """Bytes one rank holds, by kind. ``parameters`` to ``in_flight`` are on the device (the parameters'
    device); ``in_flight`` is transient bucket buffers of unfinished reductions. ``host`` is what optimizer
    offload keeps in host memory instead. ``total`` counts both places, ``device_total`` the device alone
    (the same without offload)."""

    parameters: int
    gradients: int
    master: int
    optimizer_state: int
    in_flight: int
    host: HostBytes = HostBytes()

    @property
    def device_total(self) -> int:
        """The device's bytes: what offload is meant to shrink."""
        return self.parameters + self.gradients + self.master + self.optimizer_state + self.in_flight

    @property
    def total(self) -> int:
        """Everything this rank holds, device and host."""
        return self.device_total + self.host.total


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
    """What this rank holds right now for ``engine``'s model (no collective). Offloaded tensors count as host
    bytes by their role, not their device, so a CPU-only run reports the same split as a GPU run."""
    seen: set[int] = set()
    buckets = engine.buckets
    parameters = _storage_bytes([*engine.module.parameters(), *(b.shard for b in buckets if b.is_flat)], seen)
    master = _storage_bytes((b.master for b in buckets if b.master is not None), seen)
    grads = [t for b in buckets for t in (b.grad_shard, b.grad_full, b.late) if t is not None]
    grads += [p.grad for p in engine.module.parameters() if p.grad is not None]
    gradients = _storage_bytes(grads, seen)
    host_gradients = _storage_bytes((b.host_grad for b in buckets if b.host_grad is not None), seen)
    optimizer_state = _storage_bytes(
        (value for sharded in engine.optimizers for values in sharded.optimizer.state.values()
         for value in values.values() if torch.is_tensor(value)), seen
    )
    if engine.offload:
        return ModelStateBytes(parameters, gradients, 0, 0, engine.in_flight_bytes,
                               HostBytes(master, host_gradients, optimizer_state))
    return ModelStateBytes(parameters, gradients, master, optimizer_state, engine.in_flight_bytes)
