"""FlatBucket: one bucket's buffers and the states of its parameters and gradients, owned by one object.

The layout's ``Bucket`` says what a bucket holds; a ``FlatBucket`` holds it: the flat parameter buffer and
this rank's slice of it, the master slice, the gradient buffers, the optimizer's entries, and where the
bucket is in its two lives. The schedulers (``GradientReducer``, ``ParameterSharder``) decide *when* a
bucket gathers or reduces; the bucket does it. Readers (memory accounting, reports, state dicts) read the
attributes below and nothing else.

Parameters (stage 3; stages 1-2 stay GATHERED)::

    SHARDED --unshard()--> GATHERING --wait_unshard()--> GATHERED --reshard()--> SHARDED

Gradients, per backward that reduces::

    EMPTY --grad arrives--> FILLING --reduce()--> REDUCING --wait_reduce()--> REDUCED --next backward--> EMPTY
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch

from lightning_zero.sharding.collectives import Comm, GradientParts, Handle
from lightning_zero.sharding.layout import Bucket, Layout, ShardSlice

__all__ = ["FlatBucket", "GradState", "OptimizerEntry", "ParamState"]


class ParamState(enum.Enum):
    SHARDED = "sharded"  # only this rank's slice exists; parameters are empty tensors
    GATHERING = "gathering"  # an all-gather into the full buffer is in flight
    GATHERED = "gathered"  # parameters are views of the full buffer


class GradState(enum.Enum):
    EMPTY = "empty"  # no gradient of this backward yet
    FILLING = "filling"  # some of its parameters' gradients have arrived
    REDUCING = "reducing"  # handed to a reduce-scatter
    REDUCED = "reduced"  # this backward's sum is in ``grad_shard``


class OptimizerEntry(NamedTuple):
    """One parameter piece the optimizer steps: its slice record, master view and gradient view."""

    piece: ShardSlice
    master: torch.Tensor
    grad: torch.Tensor


class _Reduction(NamedTuple):
    handle: Handle
    output: torch.Tensor  # reduce-scatter output; ``grad_shard`` itself when written (or added) in place
    source: torch.Tensor | GradientParts  # what is being reduced (kept alive until the wait)


class FlatBucket:
    """One bucket's buffers and states. Built empty by the engine, then filled by ``adopt``/``init_grads``."""

    plan: Bucket
    params: list[torch.nn.Parameter]  # in buffer order
    flat: torch.Tensor  # 1D padded_numel, storage dtype; stage 3: 0 bytes of storage while SHARDED
    shard: torch.Tensor  # 1D shard_size, storage dtype: this rank's slice (stage 3 units: a copy of its own)
    master: torch.Tensor | None  # 1D shard_size, master dtype: ``shard`` itself, its own tensor, or on the host
    host_grad: torch.Tensor | None  # offload: 1D shard_size gradient slice in host memory, master dtype
    grad_shard: torch.Tensor | None  # 1D shard_size, accumulate dtype: summed, undivided gradient slice
    grad_full: torch.Tensor | None  # stage 1: 1D padded_numel, storage dtype; the parameters' .grad view it
    late: torch.Tensor | None  # 1D padded_numel, reduce dtype: gradients that came after this bucket launched

    def __init__(self, plan: Bucket, params: list[torch.nn.Parameter], layout: Layout, rank: int,
                 persistent: bool = False, is_flat: bool = True) -> None:
        self.plan = plan
        #: Whether the parameters live in ``flat`` (trainable buckets; every bucket under stage 3). Frozen
        #: buckets of stages 1-2 keep their own tensors and ``flat``/``shard`` stay empty.
        self.is_flat = is_flat
        self.index = plan.index
        self.params = params
        self.rank = rank
        self.persistent = persistent  # stage 3: never released (the root's parameters, the smallest units)
        self._records = [layout.params[i] for i in plan.params]
        self.flat = self.shard = torch.empty(0)
        self.master = self.host_grad = self.grad_shard = self.grad_full = self.late = None
        self.grad_views: list[torch.Tensor] = []
        self.entries: list[OptimizerEntry] = []
        self.param_state = ParamState.GATHERED
        self.grad_state = GradState.EMPTY
        self.missing = len(params)  # parameters whose gradient has not arrived in this backward
        self.arrived = [False] * len(params)
        self.reduced_in_window = False
        self.reduces_in_place = False  # stage 1: the shard is the owned slice of ``grad_full``
        self._gather: Handle | None = None
        self.rounded = False  # gathered through int8 (see [Note: quantized gathers]): fine for compute only
        self._reduction: _Reduction | None = None
        self._empty = torch.empty(0)

    # ------------------------------------------------------------------ buffers
    @property
    def trainable(self) -> bool:
        return self.plan.trainable

    @property
    def own_master(self) -> bool:
        """Whether the master is a tensor of its own (a wider dtype, or offloaded), copied into the shard after
        each step, rather than the shard itself."""
        return self.master is not None and self.master is not self.shard

    @property
    def owned_range(self) -> tuple[int, int]:
        return self.plan.shard_range(self.rank)

    @property
    def shard_size(self) -> int:
        """Elements this rank owns (uneven across ranks in the whole-parameter layout)."""
        return self.plan.shard_size(self.rank)

    def owned(self) -> torch.Tensor:
        """This rank's slice of the full buffer (valid while GATHERED)."""
        lo, hi = self.owned_range
        return self.flat.narrow(0, lo, hi - lo)

    def adopt(self, flat: torch.Tensor, own_shard: bool) -> None:
        """Take ``flat`` as the full buffer and point the parameters at it; ``own_shard`` keeps this rank's
        slice as a tensor of its own, which outlives the full buffer (stage 3's gathered units)."""
        self.flat = flat
        self._empty = flat.new_empty(0)
        self.shard = self.owned().clone() if own_shard else self.owned()
        self._point_params_at_flat()

    def _point_params_at_flat(self) -> None:
        for record, param in zip(self._records, self.params):
            param.data = self.flat.narrow(0, record.offset, record.numel).view(record.shape)

    # ------------------------------------------------------------------ parameters (stage 3)
    def unshard(self, comm: Comm, exact: bool = False) -> bool:
        """Start gathering the full buffer; False if it is already gathered or on its way. ``exact``: never
        through int8, and again exactly if it was (values read or kept, not computed with)."""
        if self.param_state is not ParamState.SHARDED:
            if not (exact and self.rounded):
                return False
            self.wait_unshard()
        else:
            self.flat.untyped_storage().resize_(self.flat.numel() * self.flat.element_size())
        self.rounded = not exact and comm.quantizes(self.plan.bounds)
        gather = comm.all_gather_quantized if self.rounded else comm.all_gather
        self._gather = gather(self.flat, self.shard, self.plan.bounds)
        self.param_state = ParamState.GATHERING
        return True

    def wait_unshard(self) -> None:
        """Finish a gather in flight: the parameters become views of the full buffer."""
        if self.param_state is not ParamState.GATHERING:
            return
        assert self._gather is not None
        self._gather.wait()
        self._gather = None
        self._point_params_at_flat()
        self.param_state = ParamState.GATHERED

    def reshard(self) -> None:
        """Drop the full buffer (a gather in flight lands first); only this rank's slice stays."""
        if self.persistent or self.param_state is ParamState.SHARDED:
            return
        self.wait_unshard()
        for param in self.params:
            param.data = self._empty
        self.flat.untyped_storage().resize_(0)
        self.param_state = ParamState.SHARDED

    def refresh(self, comm: Comm) -> Handle:
        """Persistent buckets: gather the full buffer again from the slices (after a step or a load)."""
        return comm.all_gather(self.flat, self.shard, self.plan.bounds)

    # ------------------------------------------------------------------ gradients
    def init_grads(self, stage: int, in_place: bool) -> None:
        """Allocate the gradient buffers: stage 1 a full buffer the parameters' ``.grad`` view (and, with
        ``in_place``, the shard as its owned slice); every stage a shard in the accumulate dtype."""
        slots, device = self.plan.dtypes, self.flat.device
        if stage == 1:
            self.grad_full = torch.zeros(self.plan.padded_numel, dtype=slots.storage, device=device)
            self.grad_views = [self.grad_full.narrow(0, r.offset, r.numel).view(r.shape) for r in self._records]
            for param, view in zip(self.params, self.grad_views):
                param.grad = view
        self.reduces_in_place = in_place
        if in_place:
            assert self.grad_full is not None
            lo, hi = self.owned_range
            self.grad_shard = self.grad_full.narrow(0, lo, hi - lo)
        else:
            self.grad_shard = torch.zeros(self.shard_size, dtype=slots.accumulate, device=device)

    def grad_arrived(self, position: int) -> bool:
        """Count parameter ``position``'s gradient for this backward; True once every one has arrived."""
        if not self.arrived[position]:
            self.arrived[position] = True
            self.missing -= 1
            self.grad_state = GradState.FILLING
        return self.missing == 0

    def adopt_grad(self, position: int) -> None:
        """Stage 1: keep ``.grad`` the bucket's view, moving a gradient autograd allocated elsewhere into it."""
        param, view = self.params[position], self.grad_views[position]
        grad = param.grad
        if grad is None or grad.data_ptr() == view.data_ptr():
            return
        view.copy_(grad)
        param.grad = view

    def _gradient_buffer(self) -> torch.Tensor:
        """Stage 1: the full bucket of this backward's gradients, in the reduce dtype (missing ones as zeros)."""
        assert self.grad_full is not None
        slots = self.plan.dtypes
        for position, param in enumerate(self.params):
            if param.grad is None:
                self.grad_views[position].zero_()
            else:
                self.adopt_grad(position)
        return self.grad_full if slots.reduce == slots.storage else self.grad_full.to(slots.reduce)

    def _gradient_parts(self) -> GradientParts:
        """Stages 2-3: this backward's gradients where autograd left them, taken from the parameters (the
        reduction keeps them until it is waited for); missing ones and the padding are zeros."""
        assert self.grad_shard is not None
        parts = []
        for record, param in zip(self._records, self.params):
            parts.append((record.offset, record.numel, param.grad))
            param.grad = None
        return GradientParts(self.plan.padded_numel, self.plan.dtypes.reduce, self.grad_shard.device, parts)

    def reduce(self, comm: Comm) -> None:
        """Hand this backward's gradients to a reduce-scatter (SUM) into this rank's slice."""
        assert self.grad_shard is not None
        slots = self.plan.dtypes
        if self.grad_full is None:
            parts = self._gradient_parts()
            handle = comm.reduce_scatter_parts(self.grad_shard, parts, self.plan.bounds, add=self.reduced_in_window)
            if handle is not None:  # gloo: sent where they lie, summed straight into the shard
                self._reduction = _Reduction(handle, self.grad_shard, parts)
                self.grad_state = GradState.REDUCING
                return
            source = parts.flat()
        else:
            source = self._gradient_buffer()
        if self.reduces_in_place or (not self.reduced_in_window and slots.reduce == slots.accumulate):
            output = self.grad_shard
        else:
            output = torch.empty(self.shard_size, dtype=slots.reduce, device=source.device)
        self._reduction = _Reduction(comm.reduce_scatter(output, source, self.plan.bounds), output, source)
        self.grad_state = GradState.REDUCING

    def wait_reduce(self) -> None:
        """Finish the reduce-scatter in flight: add its result to the shard, clear the full buffer."""
        if self._reduction is None:
            return
        handle, output, _ = self._reduction
        handle.wait()
        self._reduction = None
        assert self.grad_shard is not None
        if output is not self.grad_shard:
            self.grad_shard.add_(output.to(self.grad_shard.dtype))
        if self.grad_full is not None:
            if self.reduces_in_place:
                # Only the owned slice was reduced in place; clear the rest so the next backward adds onto zeros.
                lo, hi = self.owned_range
                self.grad_full.narrow(0, 0, lo).zero_()
                self.grad_full.narrow(0, hi, self.grad_full.numel() - hi).zero_()
            else:
                self.grad_full.zero_()
        self.reduced_in_window = True
        self.grad_state = GradState.REDUCED

    @property
    def in_flight_bytes(self) -> int:
        """Bytes of transient buffers held for a reduction not yet waited for."""
        if self._reduction is None:
            return 0
        total = 0
        source = self._reduction.source
        if isinstance(source, GradientParts):
            total += source.nbytes
        elif source is not self.grad_full:
            total += source.numel() * source.element_size()
        if self._reduction.output is not self.grad_shard:
            total += self._reduction.output.numel() * self._reduction.output.element_size()
        return total

    def stash_late(self, position: int) -> None:
        """Keep a gradient that arrived after this bucket launched, for one more reduction at the step."""
        param, record = self.params[position], self._records[position]
        if param.grad is None:
            return
        if self.late is None:
            slots = self.plan.dtypes
            self.late = torch.zeros(self.plan.padded_numel, dtype=slots.reduce, device=param.grad.device)
        self.late.narrow(0, record.offset, record.numel).add_(param.grad.reshape(-1))
        param.grad = None

    def reduce_late(self, comm: Comm) -> None:
        """Reduce-scatter the late gradients (zeros where this rank has none) and add them to the shard."""
        assert self.grad_shard is not None
        late = self.late if self.late is not None else torch.zeros(
            self.plan.padded_numel, dtype=self.plan.dtypes.reduce, device=self.grad_shard.device)
        output = torch.empty(self.shard_size, dtype=late.dtype, device=late.device)
        comm.reduce_scatter(output, late, self.plan.bounds).wait()
        self.grad_shard.add_(output.to(self.grad_shard.dtype))
        self.late = None

    def end_backward(self) -> None:
        """Forget this backward's arrivals (the window's sums stay in the shard)."""
        self.arrived = [False] * len(self.params)
        self.missing = len(self.params)
        self.grad_state = GradState.EMPTY

    def zero_grads(self) -> None:
        """Start a new window: zero the shard and the full buffer (stage 1 re-points ``.grad`` at it)."""
        assert self.grad_shard is not None
        self.grad_shard.zero_()
        self.reduced_in_window = False
        self.late = None
        if self.grad_full is not None:
            self.grad_full.zero_()
            for param, view in zip(self.params, self.grad_views):
                param.grad = view
        else:
            for param in self.params:
                param.grad = None
