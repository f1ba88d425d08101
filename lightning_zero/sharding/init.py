"""Sharded initialisation for stage 3: a model built inside ``sharded_init`` never exists whole on one rank.

Every module is built and initialised as usual (its own ``reset_parameters`` consumes the random stream
exactly as without sharding); when the outermost ``__init__`` of a module instance returns, its own
parameters are cut down to this rank's even chunk and become empty tensors, so the peak is about 1/N of
the model plus the module being built. ``Module.apply(fn)`` run inside the context sees each module's
parameters whole while ``fn`` runs on it (``self.apply(init_weights)`` in ``__init__`` or in
``configure_model`` works, in the same order as without sharding). The engine later assembles its buckets
from the chunks, one bucket at a time.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lightning_zero.sharding.collectives import all_gather_into

__all__ = ["PendingChunk", "pending_chunks", "sharded_init"]


@dataclass
class PendingChunk:
    """This rank's even chunk of one parameter built under ``sharded_init``."""

    chunk: torch.Tensor  # 1D, ceil(numel / world) elements, zero-padded
    shape: torch.Size
    owner: weakref.ref  # the parameter; guards against a reused id

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _PendingChunks:
    """Parameters built under ``sharded_init`` and not yet taken over by an engine, keyed by identity
    (tensors cannot be dictionary keys compared by value)."""

    def __init__(self) -> None:
        self._by_id: dict[int, PendingChunk] = {}

    def __contains__(self, param: object) -> bool:
        entry = self._by_id.get(id(param))
        return entry is not None and entry.owner() is param

    def __getitem__(self, param: nn.Parameter) -> PendingChunk:
        if param not in self:
            raise KeyError("parameter has no pending chunk")
        return self._by_id[id(param)]

    def __setitem__(self, param: nn.Parameter, chunk: PendingChunk) -> None:
        self._by_id[id(param)] = chunk

    def pop(self, param: nn.Parameter, default: PendingChunk | None = None) -> PendingChunk | None:
        return self._by_id.pop(id(param)) if param in self else default

    def values(self) -> list[PendingChunk]:
        return [entry for entry in self._by_id.values() if entry.owner() is not None]

    def __len__(self) -> int:
        return len(self.values())


pending_chunks = _PendingChunks()


class _State:
    def __init__(self, rank: int, world: int, group: dist.ProcessGroup | None) -> None:
        self.rank, self.world, self.group = rank, world, group
        self.depth: dict[int, int] = {}
        self.peak_bytes = 0


def _chunk(param: nn.Parameter, state: _State) -> None:
    flat = param.detach().reshape(-1)
    size = math.ceil(flat.numel() / state.world)
    chunk = flat.new_zeros(size)
    lo, hi = min(state.rank * size, flat.numel()), min((state.rank + 1) * size, flat.numel())
    chunk.narrow(0, 0, hi - lo).copy_(flat.narrow(0, lo, hi - lo))
    pending_chunks[param] = PendingChunk(chunk, param.shape, weakref.ref(param))
    param.data = flat.new_empty(0)


def _held_bytes() -> int:
    return sum(p.chunk.numel() * p.chunk.element_size() for p in pending_chunks.values())


def _finish_module(module: nn.Module, state: _State) -> None:
    own = [p for p in module._parameters.values() if p is not None and p not in pending_chunks]
    whole = sum(p.numel() * p.element_size() for p in own)
    state.peak_bytes = max(state.peak_bytes, whole + _held_bytes())
    for param in own:
        _chunk(param, state)


def _whole(param: nn.Parameter, state: _State) -> torch.Tensor:
    pending = pending_chunks[param]
    gathered = pending.chunk.new_empty(pending.chunk.numel() * state.world)
    all_gather_into(gathered, pending.chunk, state.group)
    return gathered.narrow(0, 0, pending.numel).view(pending.shape)


@contextlib.contextmanager
def sharded_init(group: dist.ProcessGroup | None = None) -> Iterator[_State]:
    """Build modules inside; each keeps only this rank's chunk of its parameters (see the module doc)."""
    state = _State(dist.get_rank(group), dist.get_world_size(group), group)
    patched: list[tuple[type, Callable]] = []

    def wrap(cls: type) -> None:
        if "__init__" not in cls.__dict__ or getattr(cls.__init__, "_zero_wrapped", False):
            return
        original = cls.__init__

        @functools.wraps(original)
        def __init__(self: nn.Module, *args: object, **kwargs: object) -> None:
            key = id(self)
            state.depth[key] = state.depth.get(key, 0) + 1
            try:
                original(self, *args, **kwargs)
            finally:
                state.depth[key] -= 1
            if state.depth[key] == 0:
                del state.depth[key]
                _finish_module(self, state)

        __init__._zero_wrapped = True  # type: ignore[attr-defined]
        patched.append((cls, original))
        cls.__init__ = __init__  # type: ignore[method-assign]

    def wrap_tree(cls: type) -> None:
        wrap(cls)
        for sub in cls.__subclasses__():
            wrap_tree(sub)

    original_subclass_hook = nn.Module.__dict__.get("__init_subclass__")
    original_apply = nn.Module.apply

    def init_subclass(cls: type, **kwargs: object) -> None:
        super(nn.Module, cls).__init_subclass__(**kwargs)
        wrap(cls)

    def apply(self: nn.Module, fn: Callable[[nn.Module], None]) -> nn.Module:
        for child in self.children():
            child.apply(fn)
        own = [p for p in self._parameters.values() if p is not None and p in pending_chunks]
        for param in own:
            param.data = _whole(param, state)
        fn(self)
        for param in own:
            if param.numel():
                _chunk(param, state)
        return self

    wrap_tree(nn.Module)
    nn.Module.__init_subclass__ = classmethod(init_subclass)  # type: ignore[assignment]
    nn.Module.apply = apply  # type: ignore[method-assign]
    try:
        yield state
    finally:
        nn.Module.apply = original_apply  # type: ignore[method-assign]
        if original_subclass_hook is None:
            del nn.Module.__init_subclass__
        else:
            nn.Module.__init_subclass__ = original_subclass_hook  # type: ignore[assignment]
        for cls, original in reversed(patched):
            cls.__init__ = original  # type: ignore[method-assign]
