"""Gradient reduction: the scheduler that hands trainable buckets to reduce-scatters, from
post-accumulate-grad hooks, in the order backward really fills them.

[Note: gradient window]
A window runs from one optimizer step to the next. Inside it, backward passes either reduce (the policy
says so, or sync is on) or accumulate locally. Shards hold the SUM over ranks and reducing backwards;
the step divides once, which keeps several reducing backwards in one window exact. Stage 1 keeps a full
flat gradient buffer per bucket (``param.grad`` are views into it); stages 2 and 3 free full gradients as
soon as their bucket is handed to the reduce-scatter.

[Note: observed order]
Collectives must start in the same order on every rank, so buckets launch in one fixed order. Before the
first step that order is a guess (reverse registration order; stage 3: reverse forward order). The first
window records the order in which each parameter's gradient first arrives; at its step every rank adopts
rank 0's record (``adopt_order``) and buckets launch in the order their last gradient arrives. A model that
calls its blocks in another order than it registers them then overlaps as well as one that does not.
From then on (stages 2 and 3) the bucket at the head of the order never holds the others back: when a
later bucket is complete and the head is not (a parameter without a gradient this time), the head launches
with zeros for what is missing, and a gradient that still comes later in the same backward is kept in the
bucket's ``late`` buffer and reduced by one more reduce-scatter at the step, on every rank, only when some
rank has one (the step's flag exchange says so). Stage 1 keeps full gradients anyway and waits instead.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch

from lightning_zero.sharding.bucket import FlatBucket, GradState
from lightning_zero.sharding.collectives import Comm
from lightning_zero.sharding.layout import Layout

ReducePolicy = Literal["boundary", "every_micro_batch"]

__all__ = ["GradientReducer", "ReducePolicy"]

# Reductions in flight at once: bounds stage 2's transient full-gradient buffers to two buckets.
_MAX_IN_FLIGHT = 2


class GradientReducer:
    """Owns the gradient hooks and decides when each trainable bucket reduces."""

    def __init__(
        self,
        buckets: Sequence[FlatBucket],
        layout: Layout,
        comm: Comm,
        stage: int,
        policy: ReducePolicy,
        on_launch: Callable[[FlatBucket], None] | None = None,
        before_launch: Callable[[], None] | None = None,
    ) -> None:
        self.layout = layout
        self.comm = comm
        self.stage = stage
        self.policy = policy
        trainable = [b for b in buckets if b.trainable]
        # The guess before the first step: stage 3's buckets follow forward order, so backward fills them
        # last to first, and its persistent bucket goes last (its embedding's gradient tends to come last);
        # size buckets are planned in reverse registration order already.
        self.order: list[FlatBucket] = trainable if stage < 3 else sorted(
            reversed(trainable), key=lambda bucket: bucket.persistent)
        self.had_grad = [False] * len(layout.params)
        self.arrival: list[int] = []  # parameter indices, in the order their gradient first came (first window)
        self.recording = True
        self.force_late_heads = False  # see [Note: observed order]; on once the order is adopted (stages 2-3)
        self._require_sync = True
        self._finished = False  # the step reduced: the window's shards are final until zero_grad()
        self._callback_queued = False
        self._reduced_in_window = False
        self._next_launch = 0
        self._complete_waiting = 0  # complete buckets behind an incomplete head
        self._pending: deque[FlatBucket] = deque()
        self._on_launch = on_launch
        self._before_launch = before_launch
        self._handles = []
        for bucket in trainable:
            bucket.init_grads(stage, self._reduces_in_place(bucket))
            for position, param in enumerate(bucket.params):
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook(bucket, position)))

    # ------------------------------------------------------------------ policy
    def _reduces_in_place(self, bucket: FlatBucket) -> bool:
        """Stage 1 at the boundary with one dtype throughout reduce-scatters inside its full buffer."""
        slots = bucket.plan.dtypes
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

    # ------------------------------------------------------------------ order
    def adopt_order(self, arrival: Sequence[int]) -> None:
        """Launch buckets in the order their last gradient arrives in ``arrival`` (rank 0's first window);
        buckets with a parameter that never arrived keep their relative place after the others."""
        position = {index: at for at, index in enumerate(arrival)}
        never = len(arrival)

        def completes_at(bucket: FlatBucket) -> int:
            return max(position.get(index, never) for index in bucket.plan.params)

        self.order.sort(key=completes_at)  # stable: ties keep the guess
        self.recording = False
        self.force_late_heads = self.stage >= 2

    # ------------------------------------------------------------------ backward
    def _hook(self, bucket: FlatBucket, position: int):  # noqa: ANN202 - a closure for autograd
        record_index = bucket.plan.params[position]

        def on_grad(param: torch.Tensor) -> None:
            if self._finished:
                raise RuntimeError(
                    f"a gradient for {self.layout.params[record_index].fqn!r} arrived after this step's gradients "
                    "were reduced (grad_norm(), clipping or grad_shards() ran before the last micro-batch); "
                    "call them after the window's last backward, e.g. in on_before_optimizer_step"
                )
            if self.recording and not self.had_grad[record_index]:
                self.arrival.append(record_index)
            self.had_grad[record_index] = True
            if self.stage == 1:
                bucket.adopt_grad(position)
            if not self.reduces_now:
                return
            if not self._callback_queued:
                self._callback_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            if bucket.grad_state in (GradState.REDUCING, GradState.REDUCED):
                if self.stage == 1:
                    raise RuntimeError(
                        f"gradient of {self.layout.params[record_index].fqn!r} arrived after its bucket was "
                        "reduced in this backward; use torch.utils.checkpoint with use_reentrant=False"
                    )
                bucket.stash_late(position)
                return
            if bucket.grad_arrived(position):
                self._complete_waiting += 1
            self._launch_ready()

        return on_grad

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.order):
            head = self.order[self._next_launch]
            if head.missing == 0:
                self._complete_waiting -= 1
            elif not (self.force_late_heads and self._complete_waiting > 0):
                return
            self._launch(head)

    def _launch(self, bucket: FlatBucket) -> None:
        """Hand ``bucket`` to a reduce-scatter; launches happen in ``order`` on every rank."""
        complete = bucket.missing == 0
        if self._before_launch is not None:
            self._before_launch()  # stage 3: the ranks agree that their forwards ended (ParameterSharder.settle)
        bucket.reduce(self.comm)
        self._next_launch += 1
        if complete and self._on_launch is not None:
            self._on_launch(bucket)  # stage 3: its parameters are not needed in this backward any more
        self._pending.append(bucket)
        while len(self._pending) > _MAX_IN_FLIGHT:
            self._pending.popleft().wait_reduce()

    def _end_of_backward(self) -> None:
        """Launch what is left (parameters without gradients count as zeros), then wait for everything."""
        self._callback_queued = False
        for bucket in self.order[self._next_launch:]:
            self._launch(bucket)
        self.wait()
        for bucket in self.order:
            bucket.end_backward()
        self._next_launch = 0
        self._complete_waiting = 0
        self._reduced_in_window = True

    def wait(self) -> None:
        """Wait for every reduction in flight."""
        while self._pending:
            self._pending.popleft().wait_reduce()

    # ------------------------------------------------------------------ step
    @property
    def in_flight_bytes(self) -> int:
        """Bytes of transient bucket buffers whose reduction has not finished."""
        return sum(bucket.in_flight_bytes for bucket in self._pending)

    def finish(self) -> None:
        """End the window's reductions (every rank takes part, gradients or not); shards stay undivided."""
        self._finished = True
        if not self._reduced_in_window:
            # No reducing backward ran here (say, no parameter got a gradient on this rank): every rank
            # must still take part in the same reduce-scatters.
            self._end_of_backward()

    @property
    def finished(self) -> bool:
        """Whether this window's reductions were finished (the step, or clipping, reduced)."""
        return self._finished

    def late_buckets(self) -> list[bool]:
        """For each bucket in ``order``, whether this rank holds gradients that came after it launched."""
        return [bucket.late is not None for bucket in self.order]

    def reduce_late(self, any_rank_late: Sequence[bool]) -> None:
        """One more reduce-scatter for each bucket (in ``order``) where some rank kept late gradients."""
        for bucket, late in zip(self.order, any_rank_late):
            if late:
                bucket.reduce_late(self.comm)

    def clear(self, buckets: Sequence[FlatBucket] | None = None) -> None:
        """Zero the shards and full buffers of ``buckets`` (None: all) and forget which of their parameters
        had gradients; other buckets keep theirs."""
        for bucket in self.order if buckets is None else buckets:
            bucket.zero_grads()
            for index in bucket.plan.params:
                self.had_grad[index] = False

    def new_window(self) -> None:
        """The step is done: the next backward starts a new window."""
        self._reduced_in_window = False
        self._finished = False

    def zero_grad(self) -> None:
        """Start a new window with every gradient cleared."""
        self.clear()
        self.new_window()

    def remove_hooks(self) -> None:
        """Detach from the module: no hook of ours fires after this."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
