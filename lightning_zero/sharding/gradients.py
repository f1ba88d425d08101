"""Gradient reduction for stages 1 and 2: bucketed, asynchronous reduce-scatter started from
post-accumulate-grad hooks as buckets fill, summed into each rank's gradient shard.

[Note: gradient window]
A window runs from one optimizer step to the next. Inside it, backward passes either reduce (the policy
says so, or sync is on) or accumulate locally. Shards hold the SUM over ranks and reducing backwards;
``finish`` divides once, at the step, which keeps several reducing backwards in one window exact.
Stage 1 keeps a full flat gradient buffer per bucket (``param.grad`` are views into it); stages 2 and 3
free full gradients as soon as their bucket is handed to the reduce-scatter.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, Work
from torch.utils.hooks import RemovableHandle

from lightning_zero.sharding.collectives import all_reduce, reduce_scatter_sum, settle
from lightning_zero.sharding.layout import Bucket, Layout

ReducePolicy = Literal["boundary", "every_micro_batch"]

__all__ = ["GradientReducer", "ReducePolicy"]

# Reductions in flight at once: bounds stage 2's transient full-gradient buffers to two buckets.
_MAX_IN_FLIGHT = 2


@dataclass(eq=False)
class _BucketGrads:
    bucket: Bucket
    params: list[torch.nn.Parameter]  # in buffer order
    shard: torch.Tensor  # 1D, shard_numel, accumulate dtype: summed (undivided) gradient of the owned slice
    full: torch.Tensor | None = None  # 1D, padded_numel, storage dtype; stage 1 only (params' .grad view it)
    views: list[torch.Tensor] = field(default_factory=list)  # stage 1: each param's grad view into ``full``
    arrived: list[bool] = field(default_factory=list)
    missing: int = 0  # parameters of this bucket whose gradient has not arrived in this backward
    launched: bool = False
    reduced_in_window: bool = False


class _Pending(NamedTuple):
    work: Work
    grads: _BucketGrads
    output: torch.Tensor  # reduce-scatter output; the shard itself when written in place
    source: torch.Tensor  # kept alive until the work completes


class GradientReducer:
    """Owns the gradient hooks, bucket buffers and reduce-scatters of the trainable buckets."""

    def __init__(
        self,
        layout: Layout,
        params: Sequence[torch.nn.Parameter],
        rank: int,
        group: ProcessGroup | None,
        stage: int,
        policy: ReducePolicy,
        on_launch: Callable[[int], None] | None = None,
    ) -> None:
        self.layout = layout
        self.rank = rank
        self.group = group
        self.world_size = layout.world_size
        self.stage = stage
        self.policy = policy
        self.buckets: list[_BucketGrads] = []
        self.had_grad = [False] * len(layout.params)
        self._require_sync = True
        self._finished = False  # finish() ran: the window's shards are final until zero_grad()
        self._callback_queued = False
        self._reduced_in_window = False
        self._next_launch = 0
        self._pending: deque[_Pending] = deque()
        self._handles: list[RemovableHandle] = []
        self._on_launch = on_launch
        # Launch order must be the same on every rank: stage 3's buckets follow forward order, so
        # backward fills them last to first. Its persistent buckets (unit "") go last: they are small, and
        # holding one whose gradients come late (an embedding) would hold back every launch after it.
        order = list(layout.buckets) if stage < 3 else sorted(
            reversed(layout.buckets), key=lambda bucket: bucket.unit == "")
        for bucket in order:
            if not bucket.trainable:
                continue
            members = [params[i] for i in bucket.params]
            device = members[0].device
            slots = bucket.dtypes
            state = _BucketGrads(bucket, members, shard=torch.empty(0), arrived=[False] * len(members),
                                 missing=len(members))
            if stage == 1:
                state.full = torch.zeros(bucket.padded_numel, dtype=slots.storage, device=device)
                for index, param in zip(bucket.params, members):
                    record = layout.params[index]
                    view = state.full.narrow(0, record.offset, record.numel).view(record.shape)
                    state.views.append(view)
                    param.grad = view
            if self._reduces_in_place(bucket):
                lo, hi = bucket.shard_range(rank)
                state.shard = state.full.narrow(0, lo, hi - lo)  # type: ignore[union-attr]
            else:
                state.shard = torch.zeros(bucket.shard_numel, dtype=slots.accumulate, device=device)
            self.buckets.append(state)
            for position, param in enumerate(members):
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook(state, position)))

    # ------------------------------------------------------------------ policy
    def _reduces_in_place(self, bucket: Bucket) -> bool:
        """Stage 1 at the boundary with one dtype throughout reduce-scatters inside its full buffer."""
        slots = bucket.dtypes
        same_dtype = slots.storage == slots.reduce == slots.accumulate
        return self.stage == 1 and self.policy == "boundary" and same_dtype

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backwards inside accumulate locally under the "boundary" policy (no collective at all)."""
        previous, self._require_sync = self._require_sync, False
        try:
            yield
        finally:
            self._require_sync = previous

    @property
    def reduces_now(self) -> bool:
        """Whether the current backward reduce-scatters."""
        return self._require_sync or self.policy == "every_micro_batch"

    # ------------------------------------------------------------------ backward
    def _hook(self, state: _BucketGrads, position: int):  # noqa: ANN202 - a closure for autograd
        record_index = state.bucket.params[position]

        def on_grad(param: torch.Tensor) -> None:
            if self._finished:
                raise RuntimeError(
                    f"a gradient for {self.layout.params[record_index].fqn!r} arrived after this step's gradients "
                    "were reduced (grad_norm(), clipping or grad_shards() ran before the last micro-batch); "
                    "call them after the window's last backward, e.g. in on_before_optimizer_step"
                )
            self.had_grad[record_index] = True
            if self.stage == 1:
                _adopt_view(param, state.views[position])
            if not self.reduces_now:
                return
            if state.launched:
                raise RuntimeError(
                    f"gradient of {self.layout.params[record_index].fqn!r} arrived after its bucket was "
                    "reduced in this backward; use torch.utils.checkpoint with use_reentrant=False"
                )
            if not self._callback_queued:
                self._callback_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            if not state.arrived[position]:
                state.arrived[position] = True
                state.missing -= 1
            while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].missing == 0:
                self._launch(self.buckets[self._next_launch])

        return on_grad

    def _launch(self, state: _BucketGrads) -> None:
        """Hand ``state``'s bucket to a reduce-scatter; launches happen in bucket order on every rank."""
        bucket, slots = state.bucket, state.bucket.dtypes
        if self.stage == 1:
            assert state.full is not None
            for param, view in zip(state.params, state.views):
                if param.grad is None:
                    view.zero_()
                else:
                    _adopt_view(param, view)
            source = state.full
            if slots.reduce != slots.storage:
                source = source.to(slots.reduce)
        else:
            source = torch.empty(bucket.padded_numel, dtype=slots.reduce, device=state.shard.device)
            for index, param in zip(bucket.params, state.params):
                record = self.layout.params[index]
                region = source.narrow(0, record.offset, record.numel)
                if param.grad is None:
                    region.zero_()
                else:
                    region.copy_(param.grad.reshape(-1))
                    param.grad = None
            source.narrow(0, bucket.numel, bucket.padded_numel - bucket.numel).zero_()
        if self._reduces_in_place(bucket):
            output = state.shard
        elif not state.reduced_in_window and slots.reduce == slots.accumulate:
            output = state.shard
        else:
            output = torch.empty(bucket.shard_numel, dtype=slots.reduce, device=source.device)
        state.launched = True
        self._next_launch += 1
        if self._on_launch is not None:
            self._on_launch(bucket.index)
        self._pending.append(_Pending(reduce_scatter_sum(output, source, self.group), state, output, source))
        while len(self._pending) > _MAX_IN_FLIGHT:
            self._complete(self._pending.popleft())

    def _complete(self, pending: _Pending) -> None:
        settle([pending.work])
        state = pending.grads
        if pending.output is not state.shard:
            state.shard.add_(pending.output.to(state.shard.dtype))
        if state.full is not None:
            if self._reduces_in_place(state.bucket):
                # Only the owned slice was reduced; clear the rest so a second backward adds onto zeros.
                lo, hi = state.bucket.shard_range(self.rank)
                state.full.narrow(0, 0, lo).zero_()
                state.full.narrow(0, hi, state.full.numel() - hi).zero_()
            else:
                state.full.zero_()
        state.reduced_in_window = True

    def _end_of_backward(self) -> None:
        """Launch what is left (parameters without gradients count as zeros), then wait for everything."""
        self._callback_queued = False
        for state in self.buckets[self._next_launch :]:
            self._launch(state)
        while self._pending:
            self._complete(self._pending.popleft())
        for state in self.buckets:
            state.launched = False
            state.arrived = [False] * len(state.params)
            state.missing = len(state.params)
        self._next_launch = 0
        self._reduced_in_window = True

    # ------------------------------------------------------------------ step
    @property
    def in_flight_bytes(self) -> int:
        """Bytes of transient bucket buffers whose reduction has not finished."""
        total = 0
        for pending in self._pending:
            if pending.source is not pending.grads.full:
                total += pending.source.numel() * pending.source.element_size()
            if pending.output is not pending.grads.shard:
                total += pending.output.numel() * pending.output.element_size()
        return total

    def finish(self, divide_by: float) -> list[bool]:
        """Wait for the window's reductions, divide the shards by ``divide_by`` and return, for every
        parameter, whether any rank produced a gradient for it in this window."""
        self._finished = True
        if not self._reduced_in_window:
            # No reducing backward ran here (say, no parameter got a gradient on this rank): every rank
            # must still take part in the same reduce-scatters.
            self._end_of_backward()
        for state in self.buckets:
            state.shard.div_(divide_by)
        flags = torch.tensor(self.had_grad, dtype=torch.uint8, device=self._device)
        if flags.numel():
            all_reduce(flags, dist.ReduceOp.MAX, self.group)
        return [bool(v) for v in flags.tolist()]

    @property
    def _device(self) -> torch.device:
        return self.buckets[0].shard.device if self.buckets else torch.device("cpu")

    def zero_grad(self) -> None:
        """Start a new window: zero the shards and full buffers, forget which parameters had gradients."""
        for state in self.buckets:
            state.shard.zero_()
            state.reduced_in_window = False
            if state.full is not None:
                state.full.zero_()
                for param, view in zip(state.params, state.views):
                    param.grad = view
            else:
                for param in state.params:
                    param.grad = None
        self.had_grad = [False] * len(self.layout.params)
        self._reduced_in_window = False
        self._finished = False

    def remove_hooks(self) -> None:
        """Detach from the module: no hook of ours fires after this."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _adopt_view(param: torch.Tensor, view: torch.Tensor) -> None:
    """Make ``param.grad`` the bucket view, moving a gradient autograd allocated elsewhere into it."""
    grad = param.grad
    if grad is None or grad.data_ptr() == view.data_ptr():
        return
    view.copy_(grad)
    param.grad = view
