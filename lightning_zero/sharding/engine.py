"""ZeroEngine: ZeRO stages 1, 2 and 3 for one module and its optimizers on plain ``torch.distributed``.

It owns the setup (plan the layout, check ranks agree, flatten parameters into bucket buffers, broadcast
rank 0's values) and the order of one optimizer step: finish reductions, step the slices, all-gather.

[Note: several optimizers]
A GAN's generator and critic, or Muon for the matrices and AdamW for the rest, are several optimizers over
disjoint parameters of one module. They share one engine: the layout numbers their param groups one
optimizer after another, so every bucket belongs to one optimizer (each may take its own layout, see
[Note: whole parameters]), and ``step(optimizer=k)`` steps and gathers optimizer k's buckets only. The
window's reductions and its one flag exchange are shared: every backward reduces every bucket, as ``ddp``
reduces every parameter. Stepping optimizer k divides, steps and clears k's shards; the other buckets keep
their summed, undivided gradients into the next window, where later backwards add to them, so a critic
that steps after the generator's backward and its own sees both, as under ``ddp`` (its ``zero_grad()``
clears them: ``zero_grad(k)`` between backwards clears k's buckets and leaves the window open). Reading one
optimizer's gradients (a norm, clipping) and then stepping another in the same window raises: the first
would be divided twice. A parameter in two optimizers is refused, and so is fp16 loss scaling: the scale
changes at one optimizer's overflow under gradients the others have summed but not stepped.

[Note: optimizer offload]
With ``ZeroConfig(offload="optimizer")`` every master slice is a tensor of its own in host memory (also under
``32-true``, where it would otherwise be the owned slice of the flat parameter buffer) and the optimizer's
state follows it there. A step copies each reduced gradient slice into a host buffer in the master dtype,
steps the optimizer on the CPU, and copies the updated master back into the device's storage slice before
the all-gather. Where parameters are on a CUDA device the host buffers are page-locked and both copies are
asynchronous; the host waits for the device only before the optimizer reads the gradients, and before it
writes masters outside a step (loading, write-back). Device-side work (overflow checks, norms, clipping)
still reads the device's gradient slices. Where the master has the storage dtype, the storage slice equals
it bitwise after every step and load, so whole parameters are read from the device as without offload.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from lightning_zero.config import ZeroConfig, resolve_reduce_policy
from lightning_zero.sharding.bucket import FlatBucket
from lightning_zero.sharding.collectives import (
    Comm,
    all_gather_into,
    all_gather_objects,
    all_reduce,
    all_reduce_across,
    broadcast_from,
    exchange_flags,
    hybrid_groups,
    node_size,
    traffic,
    wait_all,
)
from lightning_zero.sharding.gradients import GradientReducer
from lightning_zero.sharding.init import PendingChunk, pending_chunks
from lightning_zero.sharding.layout import ByModule, BySize, DtypeSlots, Layout, full_precision_params, plan_layout
from lightning_zero.sharding.optimizer import ShardedOptimizer, check_host_steppable, needs_whole_params
from lightning_zero.sharding.parameters import ParameterSharder, module_units
from lightning_zero.sharding.state import FORMAT, FullSource, StateSource

__all__ = ["ZeroEngine"]


class ZeroEngine:
    """Shards ``optimizer``'s state (stage 1), ``module``'s gradients (stage 2) and parameters (stage 3).

    Use it as plain data parallel: backward as usual (inside ``no_sync()`` for micro-batches that should
    not reduce), then ``step()`` and ``zero_grad()``. Every rank must build the same model and optimizer.
    After construction the optimizer's param groups hold this rank's slices; step it only through here.
    Several optimizers over disjoint parameters (a GAN's two, Muon with AdamW) share one engine: pass them
    as a list and step each with ``step(optimizer=k)`` (see [Note: several optimizers]).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        config: ZeroConfig | None = None,
        process_group: ProcessGroup | None = None,
        dtypes: DtypeSlots | None = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ZeroEngine needs torch.distributed: call dist.init_process_group() first")
        self.config = config or ZeroConfig()
        self._dtypes = dtypes
        self.module = module
        #: Every data-parallel rank (flags, first values, the gradient average), and its size.
        self.dp_group = process_group
        self.dp_size = dist.get_world_size(process_group)
        shard_size = self._shard_size(self.config.shard_size)
        #: The ranks this rank shards with, and (hybrid sharding) the replicas of this rank's slices.
        self.group, self.replica_group = (process_group, None) if shard_size == self.dp_size else hybrid_groups(
            process_group, shard_size)
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        #: Which replica of the slices this rank holds (0 when not hybrid): replica 0 writes checkpoints.
        self.replica = dist.get_rank(process_group) // shard_size
        self.reduce_policy = resolve_reduce_policy(self.config.stage, self.config.reduce_policy)

        named = list(module.named_parameters())
        fqn_of: dict[torch.Tensor, str] = {param: fqn for fqn, param in named}
        aliases: dict[str, list[str]] = {}
        for fqn, param in module.named_parameters(remove_duplicate=False):
            if fqn_of[param] != fqn:
                aliases.setdefault(fqn_of[param], []).append(fqn)
        optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
        if not optimizers:
            raise ValueError("ZeroEngine needs an optimizer")
        # Param groups are numbered across the optimizers: optimizer k's groups follow optimizer k-1's.
        group_of: dict[torch.Tensor, int] = {}
        optimizer_of: dict[torch.Tensor, int] = {}
        self._groups_of: list[range] = []
        for which, opt in enumerate(optimizers):
            first = sum(len(groups) for groups in self._groups_of)
            self._groups_of.append(range(first, first + len(opt.param_groups)))
            for index, group in enumerate(opt.param_groups):
                for param in group["params"]:
                    if param not in fqn_of:
                        raise ValueError(
                            f"optimizer param group {index} holds a tensor of shape {tuple(param.shape)} that is "
                            "not a parameter of the module; build the optimizer from module.parameters()"
                        )
                    if param in optimizer_of and optimizer_of[param] == which:
                        raise ValueError(
                            f"parameter {fqn_of[param]!r} is in param groups {group_of[param] - first} and {index} "
                            f"of optimizer {which}: torch steps a parameter in one group only"
                        )
                    if param in optimizer_of:
                        raise ValueError(
                            f"parameter {fqn_of[param]!r} is in optimizer {optimizer_of[param]} and optimizer "
                            f"{which}: ZeRO steps each parameter with one optimizer. Give each optimizer its "
                            "own parameters (a GAN's generator and critic, Muon's matrices and AdamW's rest)."
                        )
                    group_of[param] = first + index
                    optimizer_of[param] = which
        sparse = [name for name, m in module.named_modules()
                  if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse]
        if sparse:
            raise ValueError(f"{sparse[:3]} make sparse gradients, and ZeRO reduces dense flat buckets: build them "
                             "with sparse=False")
        devices = {param.device for _, param in named}
        if len(devices) > 1:
            raise ValueError(f"all parameters must be on one device, found {sorted(map(str, devices))}")
        outside = [fqn for fqn, param in named if param.requires_grad and param not in group_of]
        if outside:
            raise ValueError(
                f"parameters {outside[:3]} require gradients but no optimizer param group holds them; ZeRO "
                "would neither reduce nor step them. Add them to the optimizer, or set requires_grad=False."
            )
        if not any(param.requires_grad and param in group_of for _, param in named):
            raise ValueError("the optimizer holds no trainable parameter of the module: nothing to shard")
        self.offload = self.config.offload == "optimizer"
        if self.offload:
            for opt in optimizers:
                check_host_steppable(opt)  # before any parameter moves
        self.device: torch.device = devices.pop()  # the parameters' device, where collectives run
        # Page-locked host buffers only where they buy asynchronous copies: on a CPU-only machine they would
        # just lock pages.
        self._pin = self.offload and torch.cuda.is_available() and self.device.type == "cuda"

        self.units = (module_units(module, self.config.unit_numel, self.config.persist_numel)
                      if self.config.stage == 3 else ())
        grouping = ByModule(self.units) if self.config.stage == 3 else BySize(self.config.bucket_numel)
        chunks = {param: pending_chunks[param] for _, param in named if param in pending_chunks}
        if chunks and self.config.stage < 3:  # built under sharded_init but not sharded here: make whole
            for param in list(chunks):
                param.data = self._assemble([param], [chunks.pop(param)])[0]
        self._chunks = chunks
        shapes = {p: c.shape for p, c in chunks.items()}
        own_dtype: set[torch.nn.Parameter] = set()
        if dtypes is not None and dtypes.storage.itemsize < dtypes.master.itemsize:  # *-mixed
            # Only those already in the master dtype: a 16-bit one keeps its fp32 master slice.
            own_dtype = {p for p in full_precision_params(module, shapes) if p.dtype == dtypes.master}
        #: Per optimizer: whether it steps whole parameters (see [Note: whole parameters]).
        self.whole_params = [needs_whole_params(opt, self.config.allow_unknown_optimizer) for opt in optimizers]
        whole_groups = {g for groups, whole in zip(self._groups_of, self.whole_params) if whole for g in groups}
        self.layout: Layout = plan_layout(named, self.world_size, grouping, group_of, dtypes, aliases,
                                          shapes=shapes, own_dtype=own_dtype, whole=whole_groups)
        self._check_ranks_agree()
        self.params: list[torch.nn.Parameter] = [param for _, param in named]
        self.comm = Comm(self.group, self.device, self.config.comm,
                         separate_reductions=self.config.stage == 3 and self.world_size > 1,
                         quantize_gathers=self.config.quantize_gathers)
        stage3 = self.config.stage == 3
        #: One object per bucket of the layout, in layout order: its buffers and states.
        self.buckets: list[FlatBucket] = [
            FlatBucket(plan, [self.params[i] for i in plan.params], self.layout, self.rank,
                       persistent=stage3 and not plan.unit, is_flat=plan.trainable or stage3)
            for plan in self.layout.buckets
        ]
        self._flatten_from_first_rank()
        self.sharder: ParameterSharder | None = None
        if stage3:
            self.sharder = ParameterSharder(module, self.units, self.buckets, self.comm, self.config.check_gathers)
        self.reducer = GradientReducer(
            self.buckets, self.layout, self.comm, self.config.stage, self.reduce_policy,
            on_launch=self.sharder.release_bucket if self.sharder is not None else None,
            before_launch=self.sharder.settle if self.sharder is not None else None,
        )
        if self.offload:
            for bucket in self.trainable_buckets:
                assert bucket.master is not None
                bucket.host_grad = self._host_empty(bucket.shard_size, bucket.master.dtype)
        #: One sharded optimizer per user optimizer, each over its own buckets.
        self.optimizers: list[ShardedOptimizer] = [
            ShardedOptimizer(opt, self.layout, self.rank, self._buckets_of(which), fqn_of,
                             self.config.allow_unknown_optimizer, device=self.device, first_group=groups.start,
                             total_groups=self._groups_of[-1].stop)
            for which, (opt, groups) in enumerate(zip(optimizers, self._groups_of))
        ]
        self.optimizer = self.optimizers[0]  # the one optimizer, in the common case
        self._divided: set[int] = set()  # buckets whose shards were divided in this window
        #: Hybrid sharding, several optimizers: slices already summed across groups, kept for a later step.
        self._summed_across: dict[int, torch.Tensor] = {}
        self._toggled: dict[int, bool] = {}  # requires_grad before ``toggle``, by parameter index
        self._planned_frozen = [(r.fqn, self.params[r.index]) for r in self.layout.params
                                if not self.layout.buckets[r.bucket].key.requires_grad]
        self._flags: _StepFlags | None = None
        # module.load_state_dict() writes through to the slices ([Note: load_state_dict writes through]).
        self._taken: dict[str, torch.Tensor] = {}
        self._load_hooks = [module.register_load_state_dict_pre_hook(self._take_params),
                            module.register_load_state_dict_post_hook(self._load_taken_params)]
        self._checked_in_place = False  # the first step checks the parameters are still the buckets' views
        #: Set by the precision plugin before backward: whether this window's loss was not finite (a device
        #: flag, read in the step's one flag exchange).
        self.loss_nonfinite: torch.Tensor | bool = False
        #: Logical bytes by collective kind (``collectives.traffic``) that the last optimizer step's window
        #: moved on this rank: its micro-batches' gathers and reductions, the step and the all-gather after.
        self.last_step_traffic: dict[str, int] = {}
        self._traffic_mark: Counter[str] = Counter(traffic)
        # The factor the loss was multiplied by before backward (fp16 loss scaling sets it), divided out
        # once when the gradients are reduced.
        self.loss_scale = 1.0

    @property
    def trainable_buckets(self) -> list[FlatBucket]:
        """The buckets ZeRO reduces and steps, in layout order."""
        return [bucket for bucket in self.buckets if bucket.trainable]

    def _buckets_of(self, optimizer: int | None) -> list[FlatBucket]:
        """The trainable buckets optimizer ``optimizer`` steps (None: every optimizer's)."""
        if optimizer is None:
            return self.trainable_buckets
        groups = self._groups_of[optimizer]
        return [bucket for bucket in self.trainable_buckets if bucket.plan.key.group in groups]

    def index_of(self, optimizer: torch.optim.Optimizer) -> int:
        """Which of this engine's optimizers ``optimizer`` is (Lightning's and Fabric's wrappers unwrapped)."""
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        for which, sharded in enumerate(self.optimizers):
            if sharded.optimizer is optimizer:
                return which
        raise ValueError("this optimizer is not one of the engine's")

    def sharded(self, optimizer: torch.optim.Optimizer) -> ShardedOptimizer:
        """The sharded side of ``optimizer`` (one of the engine's, wrapped or not)."""
        return self.optimizers[self.index_of(optimizer)]

    def _selected(self, optimizer: int | None) -> int | None:
        """``optimizer``, or None (all) when there is only one."""
        if optimizer is not None and not 0 <= optimizer < len(self.optimizers):
            raise ValueError(f"optimizer index {optimizer} out of range: this engine has {len(self.optimizers)}")
        return None if len(self.optimizers) == 1 else optimizer

    @property
    def in_flight_bytes(self) -> int:
        """Bytes of transient bucket buffers whose reduction has not finished."""
        return self.reducer.in_flight_bytes

    # ------------------------------------------------------------------ setup
    def _shard_size(self, asked: int | str | None) -> int:
        """Ranks per sharding group for ``ZeroConfig.shard_size`` (see [Note: hybrid sharding])."""
        if asked is None:
            return self.dp_size
        size = node_size(self.dp_group) if asked == "node" else int(asked)
        if self.dp_size % size:
            divisors = [d for d in range(1, self.dp_size + 1) if self.dp_size % d == 0]
            raise ValueError(
                f"shard_size={asked!r} ({size} ranks per sharding group) does not divide the {self.dp_size} ranks of "
                f"this job: pick one of {divisors}, or None to shard over every rank"
            )
        return size

    def _check_ranks_agree(self) -> None:
        """Raise on every rank if any rank's model differs (instead of hanging in a collective later)."""
        buffers = [(name, tuple(b.shape), str(b.dtype)) for name, b in self.module.named_buffers()]
        mine = (self.layout.fingerprint(), repr(buffers))
        if len(set(all_gather_objects(mine, self.dp_group))) == 1:
            return
        described = all_gather_objects((self.layout.describe(), buffers), self.dp_group)
        for rank, (params, bufs) in enumerate(described[1:], start=1):
            for reference, other in zip(described[0], (params, bufs)):
                for position in range(max(len(reference), len(other))):
                    row0 = reference[position] if position < len(reference) else None
                    row = other[position] if position < len(other) else None
                    if row0 != row:
                        raise ValueError(
                            f"ranks build different models: rank 0 has {row0}, rank {rank} has {row} "
                            "(name, shape, dtype, requires_grad, optimizer group). Build the same model and "
                            "optimizer on every rank."
                        )
        raise ValueError("ranks build different models or optimizer groups; build the same on every rank")

    def _host_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D host buffer for offload; see [Note: optimizer offload]."""
        return torch.empty(numel, dtype=dtype, device="cpu", pin_memory=self._pin)

    def _wait_for_host_copies(self) -> None:
        """Block until asynchronous copies between page-locked host buffers and the device are done."""
        if self._pin:
            torch.accelerator.current_stream(self.device).synchronize()

    def _flatten_from_first_rank(self) -> None:
        """Start every rank from rank 0's values, with each flattened bucket's parameters moved into one
        flat storage buffer (parameters become views of it) and this rank's master slice taken from the
        original-precision values, before any cast to the storage dtype."""
        for bucket in self.buckets:
            if not bucket.is_flat:
                continue
            plan = bucket.plan
            members = bucket.params
            original = torch.zeros(plan.padded_numel, dtype=members[0].dtype, device=members[0].device)
            pending = [p for p in members if p in self._chunks]
            wholes = dict(zip(map(id, pending), self._assemble(pending, [self._chunks.pop(p) for p in pending])))
            for index, param in zip(plan.params, members):
                record = self.layout.params[index]
                value = wholes.get(id(param), param.detach())
                original.narrow(0, record.offset, record.numel).copy_(value.reshape(-1))
            if not pending:  # built whole on every rank: start from rank 0's values
                broadcast_from([original], self.dp_group)
            slots = plan.dtypes
            flat = original if slots.storage == original.dtype else original.to(slots.storage)
            # Stage 3's unit slices outlive the full buffer; see [Note: persistent parameters].
            bucket.adopt(flat, own_shard=self.config.stage == 3 and not bucket.persistent)
            if plan.trainable:
                lo, hi = plan.shard_range(self.rank)
                value = original.narrow(0, lo, hi - lo)
                if self.offload:
                    bucket.master = self._host_empty(hi - lo, slots.master).copy_(value)
                else:
                    bucket.master = value.to(slots.master, copy=True) if slots.separate_master else bucket.shard
        others = [param.data for bucket in self.buckets if not bucket.is_flat for param in bucket.params]
        broadcast_from(others + [buffer for _, buffer in self.module.named_buffers()], self.dp_group)

    def _assemble(self, params: list[torch.nn.Parameter], chunks: list[PendingChunk]) -> list[torch.Tensor]:
        """Whole values of parameters built under ``sharded_init``, from every rank's chunks (one
        all-gather for the lot)."""
        if not params:
            return []
        for param in params:
            pending_chunks.pop(param, None)
        local = torch.cat([c.chunk for c in chunks])
        gathered = local.new_empty(local.numel() * self.dp_size)  # sharded_init shards over every rank
        all_gather_into(gathered, local, self.dp_group)
        per_rank = gathered.view(self.dp_size, local.numel())
        wholes, offset = [], 0
        for chunk in chunks:
            size = chunk.chunk.numel()
            whole = per_rank[:, offset : offset + size].reshape(-1).narrow(0, 0, chunk.numel)
            wholes.append(whole.view(chunk.shape))
            offset += size
        return wholes

    # ------------------------------------------------------------------ training
    @property
    def window_open(self) -> bool:
        """Whether anything happened since the last step or ``zero_grad``: a backward added gradients, or the
        window was reduced (clipping, norms) without stepping."""
        return any(self.reducer.had_grad) or self._flags is not None or self.reducer.finished

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Backwards inside accumulate locally (no collective) under the "boundary" policy."""
        return self.reducer.no_sync()

    def begin_backward(self) -> None:
        """Stage 3: tell the other ranks this rank's forward is over, whatever it ran (a collective: call it
        on every rank before each backward; the Trainer and Fabric strategies do). Without it a forward
        that runs no unit on some rank but units on another is not named (see [Note: unit announcements])."""
        if self.sharder is not None:
            self.sharder.settle(always=True)

    def reduce_gradients(self, optimizer: int | None = None) -> None:
        """Finish this window's reductions and turn the shards of ``optimizer``'s buckets (None: all) into
        true averaged gradients, dividing by ``dp_size * loss_scale`` once (idempotent until the step). A
        backward after this and before the step raises: reduce (or read norms) only after the window's last
        micro-batch.

        Every flag the step needs crosses ranks here in one exchange with one host read: which parameters
        had a gradient on some rank, which buckets hold late gradients ([Note: observed order]), whether
        each rank's loss and gradient shards were finite, and (stage 3) the units each rank's forward ran.
        """
        self._window_flags()
        for bucket in self._buckets_of(self._selected(optimizer)):
            if bucket.index not in self._divided:
                assert bucket.grad_shard is not None
                bucket.grad_shard.div_(self.dp_size * self.loss_scale)
                self._divided.add(bucket.index)

    def _window_flags(self) -> _StepFlags:
        """This window's flags, exchanged once: the first call finishes the window's reductions."""
        if self._flags is None:
            self._finish_window()
        assert self._flags is not None
        return self._flags

    def _finish_window(self) -> None:
        if self.sharder is not None:
            self.sharder.settle()
        self._check_trainability_unchanged()
        self.reducer.finish()
        flags = self._exchange_flags()
        self.reducer.reduce_late(flags.late)
        if self.replica_group is not None:
            self._reduce_across_groups()
        if self.reducer.recording:
            self.reducer.adopt_order(all_gather_objects(self.reducer.arrival, self.dp_group)[0])
        self._flags = flags  # last: a step that raised above is not taken as reduced by a retry

    def _reduce_across_groups(self) -> None:
        """Hybrid sharding: sum each owned gradient slice over the replicas (see [Note: hybrid sharding]). A
        slice another optimizer's step left in place was summed already: only what came since is sent."""
        assert self.replica_group is not None
        sent = []
        for bucket in self.reducer.order:
            if bucket.grad_shard is None or not bucket.grad_shard.numel():
                continue
            summed = self._summed_across.pop(bucket.index, None)
            sent.append((bucket, summed, bucket.grad_shard if summed is None else bucket.grad_shard - summed))
        all_reduce_across([new for _, _, new in sent], self.replica_group)
        for bucket, summed, new in sent:
            if summed is not None:
                torch.add(summed, new, out=bucket.grad_shard)

    def _exchange_flags(self) -> _StepFlags:
        reducer = self.reducer
        shards = [b.grad_shard for b in reducer.order if b.grad_shard is not None]
        shards += [b.late for b in reducer.order if b.late is not None]
        shards = [s for s in shards if s.numel()]  # a rank may own nothing of a bucket ([Note: whole parameters])
        # aminmax propagates NaN and shows an inf: exact in one pass, and no host read here.
        extremes = torch.stack([torch.stack(torch.aminmax(s)).float() for s in shards]) if shards else None
        grad_nonfinite = (~torch.isfinite(extremes)).any() if extremes is not None else torch.tensor(False)
        # One byte per flag: had a gradient (per parameter), late gradients (per bucket), loss and gradient not
        # finite. (Stage 3's units agree unit by unit before this: see [Note: unit announcements].)
        host = torch.tensor([*reducer.had_grad, *reducer.late_buckets(), 0, 0], dtype=torch.uint8)
        local = host.to(self.device)
        local[-2] = torch.as_tensor(self.loss_nonfinite, device=self.device).to(torch.uint8)
        local[-1] = grad_nonfinite.to(device=self.device, dtype=torch.uint8)
        rows = exchange_flags(local, self.dp_group)
        count = len(reducer.had_grad)
        return _StepFlags(
            had_grad=rows[:, :count].amax(0).bool().tolist(),
            late=rows[:, count:-2].amax(0).bool().tolist(),
            loss_nonfinite=[r for r in range(self.dp_size) if rows[r, -2]],
            grad_nonfinite=[r for r in range(self.dp_size) if rows[r, -1]],
        )

    def found_nonfinite_gradient(self) -> bool:
        """Whether any rank's gradient shard holds an inf or NaN (a collective; same answer everywhere)."""
        return bool(self.nonfinite_ranks()[1])

    def nonfinite_ranks(self) -> tuple[list[int], list[int]]:
        """The ranks whose loss (``loss_nonfinite``) and whose reduced gradient shard were not finite in this
        window: read from the step's flag exchange, so every rank takes the same decision."""
        flags = self._window_flags()
        return flags.loss_nonfinite, flags.grad_nonfinite

    def _check_params_in_place(self) -> None:
        """Raise on every rank if the module replaced or cast one of its parameters after setup on any rank
        (``.data = ...``, ``.to()``, ``.half()`` in forward): the engine would step its own buffers and the
        module would not see it. One object all-gather, on the first step only."""
        found = None
        for bucket in self.buckets:
            if not bucket.is_flat or found is not None:
                continue
            storage = bucket.flat.untyped_storage().data_ptr()
            for index, param in zip(bucket.plan.params, bucket.params):
                if param.dtype != bucket.flat.dtype or param.untyped_storage().data_ptr() != storage:
                    found = (self.layout.params[index].fqn, str(param.dtype), str(bucket.flat.dtype))
                    break
        reports = all_gather_objects(found, self.dp_group, what="every rank's check of its parameters")
        for rank, report in enumerate(reports):
            if report is not None:
                fqn, now, ours = report
                raise RuntimeError(
                    f"{fqn} is no longer the tensor ZeRO trains on rank {rank} (it is now a {now} tensor of its own, "
                    f"ZeRO's is {ours}): the module replaced or cast its own parameter after setup (`.data = ...`, "
                    "`.to()`, `.half()`, `.double()` in forward or a hook), and its updates would be lost. Cast the "
                    "inputs instead, or change the module before the Trainer sets it up."
                )

    def nonfinite_params(self) -> list[str]:
        """Names of the parameters whose reduced gradient slice is not finite on any rank (a collective: call
        it on every rank, after ``nonfinite_ranks``)."""
        self._window_flags()
        mine = []
        for bucket in self.trainable_buckets:
            if bucket.grad_shard is None or bool(torch.isfinite(bucket.grad_shard).all()):
                continue
            for piece in self.layout.shard_slices(bucket.plan, self.rank):
                if not bool(torch.isfinite(bucket.grad_shard.narrow(0, piece.shard_offset, piece.numel)).all()):
                    mine.append(self.layout.params[piece.param].fqn)
        return sorted({name for names in all_gather_objects(mine, self.group) for name in names})

    def skip_step(self, optimizer: int | None = None) -> None:
        """Drop this window's gradients (of ``optimizer``'s parameters; None: all) without touching weights or
        optimizer state."""
        self.reduce_gradients(optimizer)
        self.zero_grad(optimizer)

    def _check_trainability_unchanged(self) -> None:
        """A frozen parameter made trainable would be neither reduced nor stepped: refuse. A trainable one
        frozen for a while (``toggle_optimizer``) just has no gradient."""
        unfrozen = self._unfrozen()
        if unfrozen is not None:
            raise RuntimeError(
                f"{unfrozen}.requires_grad changed from False after ZeRO planned its buckets, during this step; its "
                "gradient would be neither reduced nor stepped. Unfreeze between steps (the strategies re-plan "
                "then; with the bare engine call engine.replan()), see [Note: re-planning]."
            )

    def grad_shards(self, optimizer: int | None = None) -> list[torch.Tensor]:
        """This rank's averaged gradient slices, one 1-D tensor per trainable bucket (of ``optimizer``)."""
        self.reduce_gradients(optimizer)
        return [bucket.grad_shard for bucket in self._buckets_of(self._selected(optimizer))
                if bucket.grad_shard is not None]

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, optimizer: int | None = None) -> torch.Tensor:
        """Clip the global gradient norm over all ranks' shards to ``max_norm``; return the norm before.

        ``torch.nn.utils.clip_grad_norm_`` would see only this rank's slice, hence the all-reduce. The scale
        stays on the device (no host read): multiplying by exactly 1.0 leaves a gradient unchanged.
        """
        total = self.grad_norm(norm_type, optimizer)
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for shard in self.grad_shards(optimizer):
            shard.mul_(scale.to(shard.device))
        return total

    def grad_norm(self, norm_type: float = 2.0, optimizer: int | None = None) -> torch.Tensor:
        """The norm of the whole (averaged) gradient of ``optimizer``'s parameters (None: all), identical on
        every rank (a collective)."""
        shards = self.grad_shards(optimizer)
        device = shards[0].device if shards else self.device
        if math.isinf(norm_type):
            local = torch.stack([s.abs().max() for s in shards]).max().float() if shards else torch.zeros(())
            local = local.to(device)
            all_reduce(local, dist.ReduceOp.MAX, self.group)
            return local
        local = torch.zeros((), dtype=torch.float64, device=device)
        for shard in shards:
            local += shard.double().norm(norm_type) ** norm_type
        all_reduce(local, dist.ReduceOp.SUM, self.group)
        return (local ** (1.0 / norm_type)).float()

    def clip_grad_value_(self, clip_value: float, optimizer: int | None = None) -> None:
        """Clamp every gradient element (of ``optimizer``'s parameters) to ``[-clip_value, clip_value]``
        (element-wise, no collective)."""
        for shard in self.grad_shards(optimizer):
            shard.clamp_(-clip_value, clip_value)

    def step(self, closure: Callable[[], Any] | None = None, optimizer: int | None = None) -> Any:
        """One optimizer step: run ``closure`` (forward and backward) if given, reduce, step, all-gather.
        ``optimizer``: which of several optimizers steps (None: every one)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        which = self._selected(optimizer)
        self.reduce_gradients(which)
        assert self._flags is not None
        if not self._checked_in_place:
            self._check_params_in_place()
            self._checked_in_place = True
        buckets = self._buckets_of(which)
        if self.offload:
            for bucket in buckets:
                assert bucket.host_grad is not None and bucket.grad_shard is not None
                bucket.host_grad.copy_(bucket.grad_shard, non_blocking=self._pin)
            self._wait_for_host_copies()
        for sharded in self.optimizers if which is None else [self.optimizers[which]]:
            sharded.step(self._flags.had_grad)
        self._gather_params(buckets)
        self.zero_grad(which)
        return loss

    def _gather_params(self, buckets: list[FlatBucket]) -> None:
        """Stages 1-2: all-gather the updated slices. Stage 3: the slice is the parameter until the next
        forward gathers it."""
        handles = []
        for bucket in buckets:
            if bucket.own_master:
                assert bucket.master is not None
                bucket.shard.copy_(bucket.master, non_blocking=self._pin)
            if self.config.stage < 3:
                handles.append(self.comm.all_gather(bucket.flat, bucket.shard, bucket.plan.bounds))
        for handle in handles:
            handle.wait()
        if self.sharder is not None:
            self.sharder.after_step()

    def begin_evaluation(self) -> None:
        """Stage 3, an evaluation loop starts: with ``eval_gather="unit"`` every unit's forward agrees with the
        other ranks first, so ranks may run different numbers of forward calls; with "whole" the whole model
        is gathered for the loop (a collective). No-op under stages 1-2."""
        if self.sharder is None:
            return
        if self.config.eval_gather == "whole":
            self.sharder.gather_all()
        else:
            self.sharder.begin_evaluation()

    def finish_evaluation(self) -> None:
        """Stage 3, this rank's evaluation loop is done: serve the other ranks' gathers until every rank is
        done, then back to slices. A collective; no-op when no evaluation loop is open."""
        if self.sharder is None:
            return
        self.sharder.finish_evaluation()
        if self.sharder.hold_all:
            self.sharder.release_all()
        self.discard_traffic()  # evaluation gathers are not the next optimizer step's traffic

    def gather_all(self) -> None:
        """Stage 3: keep the whole model gathered (a no-grad loop); no-op otherwise. A collective."""
        if self.sharder is not None:
            self.sharder.gather_all()

    def release_all(self) -> None:
        """Stage 3: back to slices after ``gather_all``."""
        if self.sharder is not None:
            self.sharder.release_all()

    def zero_grad(self, optimizer: int | None = None) -> None:
        """Clear gradients (of ``optimizer``'s parameters; None: all) and start a new window (also done at the
        end of ``step``). The other optimizers' gradients stay, summed but undivided, for their own step
        (see [Note: several optimizers])."""
        buckets = self._buckets_of(self._selected(optimizer))
        if self._flags is None and not self.reducer.finished and optimizer is not None:
            self.reducer.clear(buckets)  # one optimizer's own zero_grad() between backwards: the window goes on
            for bucket in buckets:
                self._summed_across.pop(bucket.index, None)  # nothing of it is summed across groups any more
            return
        cleared = {bucket.index for bucket in buckets}
        read = sorted(self._divided - cleared)
        if read:
            raise RuntimeError(
                f"the gradients of optimizer {self._optimizer_of_bucket(read[0])} were read (clipping, a norm) "
                f"in this window but another optimizer stepped: step each optimizer after reading its own "
                "gradients, e.g. clip_gradients(opt) right before opt.step()"
            )
        self.reducer.clear(buckets)
        self.reducer.new_window()
        if self.replica_group is not None and self._flags is not None:  # slices kept for another optimizer
            self._summed_across = {b.index: b.grad_shard.clone() for b in self.trainable_buckets
                                   if b.index not in cleared and b.grad_shard is not None}
        self._divided.clear()
        self._flags = None
        self.loss_nonfinite = False
        self._close_traffic_window()

    def _close_traffic_window(self) -> None:
        """Record what the window that just ended (its micro-batches, reductions, step and gathers) moved."""
        moved = {kind: total - self._traffic_mark.get(kind, 0) if total >= self._traffic_mark.get(kind, 0) else total
                 for kind, total in traffic.items()}  # a counter cleared mid-window restarts from zero
        self.last_step_traffic = {kind: n for kind, n in moved.items() if n}
        self._traffic_mark = Counter(traffic)

    def discard_traffic(self) -> None:
        """Leave what moved since the last step out of the next step's window (evaluation loops in fit)."""
        self._traffic_mark = Counter(traffic)

    def _state_of(self, master: torch.Tensor) -> dict[str, Any]:
        """The optimizer state of one master slice, whichever optimizer holds it."""
        for sharded in self.optimizers:
            if master in sharded.optimizer.state:
                return sharded.optimizer.state[master]
        return {}

    def toggle(self, optimizer: int) -> None:
        """As Lightning's ``toggle_optimizer``, on the module's parameters: those of the other optimizers stop
        requiring gradients until ``untoggle()`` (the optimizers' own param groups hold this rank's slices)."""
        self.untoggle()
        own = {index for bucket in self._buckets_of(optimizer) for index in bucket.plan.params}
        held = [index for bucket in self.trainable_buckets for index in bucket.plan.params]
        self._toggled = {index: self.params[index].requires_grad for index in held}
        for index in held:
            self.params[index].requires_grad_(index in own and self._toggled[index])

    def untoggle(self) -> None:
        """Give back what ``toggle`` took."""
        for index, state in self._toggled.items():
            self.params[index].requires_grad_(state)
        self._toggled = {}

    def _optimizer_of_bucket(self, index: int) -> int:
        group = self.layout.buckets[index].key.group
        return next(which for which, groups in enumerate(self._groups_of) if group in groups)

    # ------------------------------------------------------------------ state
    def full_state_dict(self) -> dict[str, Any]:
        """Whole parameters (fp32 masters where they exist) and optimizer state keyed by FQN, on CPU, on
        every rank. Loadable on any world size. A collective: call it on every rank."""
        return {"params": self.full_params(), "optimizer": self.full_optimizer_state()}

    def full_optimizer_state(self, rank: int | None = None) -> dict[str, Any]:
        """Every optimizer's state keyed by FQN, their param groups one optimizer after another (a collective;
        ``rank``: only that rank keeps the tensors)."""
        fulls = [sharded.full_state_dict(self.group, self.keeper(rank)) for sharded in self.optimizers]
        if len(fulls) == 1:
            return fulls[0]
        return {"state": {fqn: values for full in fulls for fqn, values in full["state"].items()},
                "param_groups": [group for full in fulls for group in full["param_groups"]]}

    def keeper(self, rank: int | None) -> int | None:
        """The sharding-group rank that keeps a gathered whole for the job's ``rank`` (None: every rank; -1:
        none in this group): under hybrid sharding only replica 0's group keeps it."""
        return rank if rank is None or self.replica == 0 else -1

    def _authoritative_shard(self, bucket: FlatBucket) -> torch.Tensor | None:
        """The slice that holds ``bucket``'s true values when the full parameters do not (a master in a wider
        dtype, or stage 3's parameter slice); None when the module's parameters are whole and exact (an
        offloaded master in the storage dtype equals the storage slice: [Note: optimizer offload])."""
        if bucket.trainable and bucket.plan.dtypes.separate_master:
            return bucket.master
        return bucket.shard if self.config.stage == 3 else None

    @contextlib.contextmanager
    def gathered_parameters(
        self, params: Iterable[torch.nn.Parameter] | None = None, modifier_rank: int | None = None
    ) -> Iterator[list[torch.nn.Parameter]]:
        """Whole values of ``params`` (default: all) on every rank inside the block; a collective.

        With ``modifier_rank`` the block may change them in place on that rank: on exit its values are
        broadcast and written back into every rank's slices and fp32 masters. Without it, changes are
        discarded under stage 3 and left unsynchronised otherwise, so pass it when writing.
        """
        chosen = list(self.params if params is None else params)
        ids = {id(p) for p in chosen}
        indices = sorted({r.bucket for r in self.layout.params if id(self.params[r.index]) in ids})
        buckets = [self.buckets[i] for i in indices]
        if self.sharder is not None:
            self.sharder.gather(indices, exact=True)
        before = {}
        if modifier_rank is not None:  # to move only changed values into fp32 masters (no rounding)
            before = {b.index: b.owned().clone() for b in buckets if b.own_master}
        # Stage 3's persistent buckets are their own slices: without a modifier, restore what the block changes.
        kept = {} if modifier_rank is not None or self.sharder is None else {
            b.index: b.shard.clone() for b in buckets if b.persistent}
        try:
            yield chosen
            if modifier_rank is not None:
                self._write_back(buckets, modifier_rank, before)
        finally:
            if self.sharder is not None:
                for index, value in kept.items():
                    self.buckets[index].shard.copy_(value)
                self.sharder.refresh_persistent(sorted(kept))
                self.sharder.release(indices)

    def _write_back(self, buckets: list[FlatBucket], modifier_rank: int, before: dict[int, torch.Tensor]) -> None:
        src = dist.get_global_rank(self.dp_group, modifier_rank) if self.dp_group is not None else modifier_rank
        self._wait_for_host_copies()  # masters are written below
        with torch.no_grad():
            for bucket in buckets:
                tensors = [bucket.flat] if bucket.is_flat else [p.data for p in bucket.params]
                wait_all([dist.broadcast(t, src=src, group=self.dp_group, async_op=True) for t in tensors])
                if not bucket.is_flat:
                    continue
                owned = bucket.owned()
                if bucket.shard.data_ptr() != owned.data_ptr():
                    bucket.shard.copy_(owned)
                if bucket.index in before:
                    master = bucket.master
                    assert master is not None
                    changed = owned != before[bucket.index]
                    master[changed.to(master.device)] = owned[changed].to(device=master.device, dtype=master.dtype)
        if self.sharder is not None:
            self.sharder.refresh_persistent()

    @property
    def holds_sharded_values(self) -> bool:
        """Whether some true parameter values live only in slices (fp32 masters, stage 3)."""
        return any(self._authoritative_shard(b) is not None for b in self.buckets)

    def full_params(self, rank: int | None = None) -> dict[str, torch.Tensor]:
        """Whole parameters keyed by FQN (and alias), on CPU; masters where they exist. A collective that
        gathers one bucket at a time on the device. ``rank``: only that rank keeps them (the others get
        nothing, and hold no whole copy in host memory); None: every rank."""
        params: dict[str, torch.Tensor] = {}
        keep = rank is None or dist.get_rank(self.dp_group) == rank
        for bucket in self.buckets:
            source: torch.Tensor | None = None
            shard = self._authoritative_shard(bucket)
            if shard is not None:
                source = torch.empty(bucket.plan.padded_numel, dtype=shard.dtype, device=self.device)
                all_gather_into(source, shard.to(self.device), self.group, bucket.plan.bounds)
            for index in bucket.plan.params if keep else ():
                record = self.layout.params[index]
                if source is not None:
                    value = source.narrow(0, record.offset, record.numel).view(record.shape)
                else:
                    value = self.params[index].detach()
                value = value.to("cpu", copy=True)
                for name in (record.fqn, *record.aliases):
                    params[name] = value
        return params

    # [Note: load_state_dict writes through]
    # After setup a parameter's values live in the engine's slices: under stage 3 the module holds empty
    # placeholders, and under *-mixed or offload the fp32 master slice is what the next step updates and
    # gathers. A plain ``module.load_state_dict(sd)`` (litgpt loads pretrained weights that way after
    # ``fabric.setup``; ``fabric.load_raw``; a callback swapping weights) would copy into the placeholders or
    # leave the masters stale, and the first step would silently undo the load. So the module's own
    # load_state_dict takes the parameters out of ``sd`` before torch copies anything (a pre-hook on the root)
    # and writes them into the slices afterwards (a post-hook), as ``load_state`` does; parameters ``sd`` does
    # not hold keep their values (``strict=False``) and are reported missing as torch reports them. Buffers
    # load as usual. It runs on every rank that calls it; under stage 3 or with fp32 masters a partial
    # ``sd`` reads the current values first (a collective).
    def _take_params(self, module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        if module is not self.module:
            return
        for record in self.layout.params:
            for name in (record.fqn, *record.aliases):
                if prefix + name in state_dict:
                    self._taken.setdefault(record.fqn, state_dict.pop(prefix + name))

    def _load_taken_params(self, module: torch.nn.Module, incompatible: Any) -> None:
        taken, self._taken = self._taken, {}
        if not taken:
            return
        names = {name for r in self.layout.params if r.fqn in taken for name in (r.fqn, *r.aliases)}
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in names]
        wrong = [f"{r.fqn}: {tuple(taken[r.fqn].shape)} != {tuple(r.shape)}" for r in self.layout.params
                 if r.fqn in taken and tuple(taken[r.fqn].shape) != tuple(r.shape)]
        if wrong:
            raise RuntimeError(f"size mismatch in load_state_dict: {wrong[:3]}")
        whole = taken if len(taken) == len(self.layout.params) else {**self.full_params(), **taken}
        self.load_state(FullSource({"params": whole}), optimizer=False)

    def load_full_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from a ``full_state_dict()`` saved on any world size; each rank keeps its slices."""
        self.load_state(FullSource(state), optimizer="optimizer" in state)

    def check_source(self, source: StateSource, optimizer: bool = True) -> None:
        """Raise, before anything is written, unless ``source`` holds this model (and optimizer)."""
        names = {record.fqn for record in self.layout.params}
        aliases = {a for r in self.layout.params for a in r.aliases}
        missing = sorted(names - source.shapes.keys())
        unexpected = sorted(source.shapes.keys() - names - aliases)
        if missing or unexpected:
            raise ValueError(f"parameter names differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for record in self.layout.params:
            saved = tuple(source.shapes[record.fqn])
            if saved != tuple(record.shape):
                raise ValueError(f"{record.fqn}: saved shape {saved} != model shape {tuple(record.shape)}")
        if optimizer:
            if source.param_groups is None:
                raise ValueError("the saved state holds no optimizer state (saved weights only)")
            for sharded in self.optimizers:
                sharded.check_param_groups(source.param_groups)

    def load_state(self, source: StateSource, optimizer: bool = True) -> None:
        """Restore parameters (and optimizer state) from ``source``, saved on any world size and stage:
        each rank reads only the ranges it keeps. No collective. Checked whole before anything changes."""
        self.check_source(source, optimizer)
        self._wait_for_host_copies()  # masters are written below
        stage3 = self.config.stage == 3
        with torch.no_grad():
            for bucket in self.buckets:
                if not stage3:
                    for index, param in zip(bucket.plan.params, bucket.params):
                        record = self.layout.params[index]
                        param.copy_(source.param(record.fqn, 0, record.numel).view(record.shape))
                # Stage 3 keeps values in its slices; a master of its own (wider, or offloaded) is written too.
                targets = [bucket.shard] if stage3 else []
                if bucket.own_master:
                    assert bucket.master is not None
                    targets.append(bucket.master)
                for piece in self.layout.shard_slices(bucket.plan, self.rank) if targets else ():
                    value = source.param(self.layout.params[piece.param].fqn, piece.start, piece.numel)
                    for target in targets:
                        target.narrow(0, piece.shard_offset, piece.numel).copy_(value)
        if self.sharder is not None:
            self.sharder.after_step()
        if optimizer:
            for sharded in self.optimizers:
                sharded.load_state(source)

    def local_state_dict(self, optimizer: bool = True) -> dict[str, Any]:
        """This rank's part of the state, on CPU, with no collective: every slice of a flattened parameter it
        owns (at master precision), with that slice's optimizer state unless ``optimizer`` is False, and, on
        the group's first rank, the parameters that are not sharded (``state.consolidate`` joins them). Under
        hybrid sharding only replica 0 holds a part: the other replicas' slices are copies of it."""
        pieces = []
        for bucket in self.buckets if self.replica == 0 else ():
            if not bucket.is_flat:
                continue
            source = bucket.master if bucket.master is not None else bucket.shard
            masters = {entry.piece.param: entry.master for entry in bucket.entries}
            for piece in self.layout.shard_slices(bucket.plan, self.rank):
                master = masters.get(piece.param)
                state = self._state_of(master) if optimizer and master is not None else {}
                pieces.append({
                    "fqn": self.layout.params[piece.param].fqn,
                    "start": piece.start,
                    "numel": piece.numel,
                    "param": source.narrow(0, piece.shard_offset, piece.numel).to("cpu", copy=True),
                    "optimizer": {key: value.to("cpu", copy=True) if torch.is_tensor(value) else value
                                  for key, value in state.items()},
                })
        whole = {}
        if self.rank == 0 and self.replica == 0:
            for bucket in self.buckets:
                if not bucket.is_flat:
                    for index, param in zip(bucket.plan.params, bucket.params):
                        whole[self.layout.params[index].fqn] = param.detach().to("cpu", copy=True)
        return {
            "format": FORMAT,
            "rank": dist.get_rank(self.dp_group),  # the job's: replicas other than 0 hold no piece
            "world_size": self.dp_size,
            "stage": self.config.stage,
            "shapes": {r.fqn: tuple(r.shape) for r in self.layout.params},
            "aliases": {r.fqn: list(r.aliases) for r in self.layout.params if r.aliases},
            "pieces": pieces,
            "whole": whole,
            "param_groups": [g for sharded in self.optimizers for g in sharded.param_groups()] if optimizer else None,
        }

    def materialize_module(self) -> None:
        """Give the module whole parameters, in the master dtype (fp32 after mixed-precision training).

        A collective. Stage 3 stops sharding the module. Call it when training with this engine is over.
        """
        if self.sharder is not None:
            self.sharder.remove_hooks()
            self.sharder.gather_all()
        for bucket in self.trainable_buckets:
            if not bucket.plan.dtypes.separate_master:
                continue
            assert bucket.master is not None
            full = torch.empty(bucket.plan.padded_numel, dtype=bucket.master.dtype, device=self.device)
            all_gather_into(full, bucket.master.to(self.device), self.group, bucket.plan.bounds)
            for index, param in zip(bucket.plan.params, bucket.params):
                record = self.layout.params[index]
                param.data = full.narrow(0, record.offset, record.numel).view(record.shape)

    # [Note: re-planning]
    # The buckets follow the trainable set and the param groups at planning time. Lightning's BaseFinetuning
    # unfreezes modules and adds their parameters as a new param group mid-fit; a user may call
    # ``add_param_group`` or flip ``requires_grad`` on frozen parameters between steps. ``needs_replan`` says so
    # (a host-side check, no collective), and ``replan`` plans again between steps: every optimizer's whole
    # state and every whole parameter are gathered (a collective; they sit in host memory once, on every rank),
    # the module and the optimizers get whole tensors back, and the engine builds itself anew on the same
    # objects, re-slicing that state as it does any optimizer state it finds. Every rank must make the same
    # change, as BaseFinetuning does. The new parameters start from their stored values: under ``*-mixed`` a
    # frozen parameter is stored in 16 bits (it had no fp32 master), where ``ddp`` keeps fp32.
    def needs_replan(self) -> str | None:
        """Why the plan no longer fits the optimizers and the trainable set (None: it fits)."""
        for which, sharded in enumerate(self.optimizers):
            groups = sharded.optimizer.param_groups
            if len(groups) != len(sharded.views):
                return f"optimizer {which} has {len(groups)} param groups, planned with {len(sharded.views)}"
            for index, group in enumerate(groups):
                if sharded.planned_names(group) is None:
                    return f"param group {index} of optimizer {which} holds other tensors than planned"
        unfrozen = self._unfrozen()
        return None if unfrozen is None else f"{unfrozen} requires gradients now and was frozen when planned"

    def _unfrozen(self) -> str | None:
        """The first parameter frozen at planning time that requires gradients now (None: none)."""
        return next((fqn for fqn, param in self._planned_frozen if param.requires_grad), None)

    def module_param_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``groups`` (one optimizer's ``param_groups``) with the module's parameters in place of this rank's
        slices, for code that looks the groups' tensors up among the module's parameters."""
        named = dict(self.module.named_parameters())
        translated = []
        for group in groups:
            found = (sharded.planned_names(group) for sharded in self.optimizers)
            names = next((names for names in found if names is not None), None)
            translated.append(group if names is None else {**group, "params": [named[n] for n in names]})
        return translated

    def replan(self) -> None:
        """Plan the buckets anew for the optimizers' current param groups and the current trainable set,
        keeping every value and every optimizer state (a collective, between steps; see [Note: re-planning])."""
        if self.window_open:
            raise RuntimeError("re-plan between steps: this window has gradients that were not stepped")
        whole = self.full_params()
        named = dict(self.module.named_parameters())
        states = [sharded.full_state_dict(self.group) for sharded in self.optimizers]
        optimizers = [sharded.optimizer for sharded in self.optimizers]
        planned = [[sharded.planned_names(group) for group in sharded.optimizer.param_groups]
                   for sharded in self.optimizers]
        self.close()
        for fqn, param in named.items():
            param.data = whole[fqn].to(self.device)
        own = {id(param) for param in named.values()}
        for optimizer, state, names in zip(optimizers, states, planned):
            for index, (group, planned_names) in enumerate(zip(optimizer.param_groups, names)):
                if planned_names is not None:
                    group["params"] = [named[fqn] for fqn in planned_names]
                elif any(id(p) not in own for p in group["params"]):
                    raise ValueError(f"param group {index} holds tensors that are not parameters of the module; "
                                     "add parameters of the module (module.parameters())")
            optimizer.state.clear()
            for fqn, values in state["state"].items():
                optimizer.state[named[fqn]] = dict(values)
        self.__init__(self.module, optimizers if len(optimizers) > 1 else optimizers[0],  # type: ignore[misc]
                      self.config, self.dp_group, self._dtypes)

    def close(self, release_group: bool = True) -> None:
        """Remove every hook this engine installed; the module keeps its (flat-buffer) parameters.
        ``release_group=False`` leaves stage 3's reduction group alone (after a failure, when a peer that is gone
        could make destroying it wait)."""
        self.reducer.remove_hooks()
        for sharded in self.optimizers:
            sharded.remove_hooks()
        for handle in self._load_hooks:
            handle.remove()
        if self.sharder is not None:
            self.sharder.remove_hooks()
        if release_group:
            self.comm.close()


@dataclass(frozen=True)
class _StepFlags:
    """What the step's one flag exchange told every rank (see ``ZeroEngine.reduce_gradients``)."""

    had_grad: list[bool]  # per parameter: some rank produced a gradient in this window
    late: list[bool]  # per bucket in launch order: some rank holds late gradients for it
    loss_nonfinite: list[int]  # ranks whose loss was not finite
    grad_nonfinite: list[int]  # ranks whose gradient shards held an inf or NaN
