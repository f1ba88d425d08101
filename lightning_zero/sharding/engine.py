"""ZeroEngine: ZeRO stages 1, 2 and 3 for one module and its optimizer on plain ``torch.distributed``.

It owns the setup (plan the layout, check ranks agree, flatten parameters into bucket buffers, broadcast
rank 0's values) and the order of one optimizer step: finish reductions, step the slices, all-gather.

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
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from lightning_zero.config import ZeroConfig, resolve_reduce_policy
from lightning_zero.sharding.collectives import (
    all_gather_flat,
    all_gather_objects,
    all_reduce,
    broadcast_from_first,
    settle,
    traffic,
)
from lightning_zero.sharding.gradients import GradientReducer
from lightning_zero.sharding.init import PendingChunk, pending_chunks
from lightning_zero.sharding.layout import Bucket, ByModule, BySize, DtypeSlots, Layout, plan_layout
from lightning_zero.sharding.optimizer import ShardedOptimizer, check_host_steppable
from lightning_zero.sharding.parameters import ParameterSharder, module_units
from lightning_zero.sharding.state import FullSource, StateSource

__all__ = ["ZeroEngine"]


class ZeroEngine:
    """Shards ``optimizer``'s state (stage 1), ``module``'s gradients (stage 2) and parameters (stage 3).

    Use it as plain data parallel: backward as usual (inside ``no_sync()`` for micro-batches that should
    not reduce), then ``step()`` and ``zero_grad()``. Every rank must build the same model and optimizer.
    After construction the optimizer's param groups hold this rank's slices; step it only through here.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: ZeroConfig | None = None,
        process_group: ProcessGroup | None = None,
        dtypes: DtypeSlots | None = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ZeroEngine needs torch.distributed: call dist.init_process_group() first")
        self.config = config or ZeroConfig()
        self.module = module
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.reduce_policy = resolve_reduce_policy(self.config.stage, self.config.reduce_policy)

        named = list(module.named_parameters())
        fqn_of: dict[torch.Tensor, str] = {param: fqn for fqn, param in named}
        aliases: dict[str, list[str]] = {}
        for fqn, param in module.named_parameters(remove_duplicate=False):
            if fqn_of[param] != fqn:
                aliases.setdefault(fqn_of[param], []).append(fqn)
        group_of: dict[torch.Tensor, int] = {}
        for index, group in enumerate(optimizer.param_groups):
            for param in group["params"]:
                if param not in fqn_of:
                    raise ValueError(
                        f"optimizer param group {index} holds a tensor of shape {tuple(param.shape)} that is "
                        "not a parameter of the module; build the optimizer from module.parameters()"
                    )
                group_of[param] = index
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
            check_host_steppable(optimizer)  # before any parameter moves
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
        self.layout: Layout = plan_layout(named, self.world_size, grouping, group_of, dtypes, aliases,
                                          shapes={p: c.shape for p, c in chunks.items()})
        self._check_ranks_agree()
        self.params: list[torch.nn.Parameter] = [param for _, param in named]
        self.flat_params: dict[int, torch.Tensor] = {}  # bucket index -> 1D padded storage buffer
        self.masters: dict[int, torch.Tensor] = {}  # bucket index -> 1D master slice (shard_numel); host if offload
        self.host_grads: dict[int, torch.Tensor] = {}  # offload: bucket index -> 1D host gradient slice, master dtype
        self.param_shards: dict[int, torch.Tensor] = {}  # stage 3: bucket -> this rank's 1D storage slice
        self._flatten_from_first_rank()
        self.sharder: ParameterSharder | None = None
        if self.config.stage == 3:
            self.sharder = ParameterSharder(module, self.units, self.layout, self.params, self.flat_params,
                                            self.param_shards, self.rank, process_group)
        self.reducer = GradientReducer(
            self.layout, self.params, self.rank, process_group, self.config.stage, self.reduce_policy,
            on_launch=self.sharder.release_one if self.sharder is not None else None,
        )
        grad_shards = {state.bucket.index: state.shard for state in self.reducer.buckets}
        if self.offload:
            self.host_grads = {index: self._host_empty(shard.numel(), self.masters[index].dtype)
                               for index, shard in grad_shards.items()}
        self.optimizer = ShardedOptimizer(
            optimizer,
            self.layout,
            self.rank,
            self.masters,
            self.host_grads if self.offload else grad_shards,
            fqn_of,
            self.config.allow_unknown_optimizer,
            device=self.device,
        )
        self._had_grad: list[bool] | None = None
        #: Logical bytes by collective kind (``collectives.traffic``) that the last optimizer step's window
        #: moved on this rank: its micro-batches' gathers and reductions, the step and the all-gather after.
        self.last_step_traffic: dict[str, int] = {}
        self._traffic_mark: Counter[str] = Counter(traffic)
        # The factor the loss was multiplied by before backward (fp16 loss scaling sets it), divided out
        # once when the gradients are reduced.
        self.loss_scale = 1.0

    # ------------------------------------------------------------------ setup
    def _check_ranks_agree(self) -> None:
        """Raise on every rank if any rank's model differs (instead of hanging in a collective later)."""
        buffers = [(name, tuple(b.shape), str(b.dtype)) for name, b in self.module.named_buffers()]
        mine = (self.layout.fingerprint(), repr(buffers))
        if len(set(all_gather_objects(mine, self.group))) == 1:
            return
        described = all_gather_objects((self.layout.describe(), buffers), self.group)
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

    def _is_flat(self, bucket: Bucket) -> bool:
        """Trainable buckets are flattened in every stage; stage 3 shards frozen ones too."""
        return bucket.trainable or self.config.stage == 3

    def _has_own_master(self, bucket: Bucket) -> bool:
        """Whether ``bucket``'s master is a tensor of its own (a wider dtype, or offloaded), copied into the
        storage slice after each step, rather than the storage slice itself."""
        return bucket.trainable and (bucket.dtypes.separate_master or self.offload)

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
        for bucket in self.layout.buckets:
            if not self._is_flat(bucket):
                continue
            members = [self.params[i] for i in bucket.params]
            original = torch.zeros(bucket.padded_numel, dtype=members[0].dtype, device=members[0].device)
            pending = [p for p in members if p in self._chunks]
            wholes = dict(zip(map(id, pending), self._assemble(pending, [self._chunks.pop(p) for p in pending])))

            for index, param in zip(bucket.params, members):
                record = self.layout.params[index]
                value = wholes.get(id(param), param.detach())
                original.narrow(0, record.offset, record.numel).copy_(value.reshape(-1))
            if not pending:  # built whole on every rank: start from rank 0's values
                broadcast_from_first([original], self.group)
            slots = bucket.dtypes
            flat = original if slots.storage == original.dtype else original.to(slots.storage)
            for index, param in zip(bucket.params, members):
                record = self.layout.params[index]
                param.data = flat.narrow(0, record.offset, record.numel).view(record.shape)
            lo, hi = bucket.shard_range(self.rank)
            owned = flat.narrow(0, lo, hi - lo)
            if self.config.stage == 3:  # a copy that outlives the full buffer; see [Note: persistent parameters]
                owned = self.param_shards[bucket.index] = owned.clone() if bucket.unit else owned
            if bucket.trainable:
                value = original.narrow(0, lo, hi - lo)
                if self.offload:
                    self.masters[bucket.index] = self._host_empty(hi - lo, slots.master).copy_(value)
                else:
                    self.masters[bucket.index] = value.to(slots.master, copy=True) if slots.separate_master else owned
            self.flat_params[bucket.index] = flat
        others = [self.params[i].data for b in self.layout.buckets if not self._is_flat(b) for i in b.params]
        broadcast_from_first(others + [buffer for _, buffer in self.module.named_buffers()], self.group)

    def _assemble(self, params: list[torch.nn.Parameter], chunks: list[PendingChunk]) -> list[torch.Tensor]:
        """Whole values of parameters built under ``sharded_init``, from every rank's chunks (one
        all-gather for the lot)."""
        if not params:
            return []
        for param in params:
            pending_chunks.pop(param, None)
        local = torch.cat([c.chunk for c in chunks])
        gathered = local.new_empty(local.numel() * self.world_size)
        settle([all_gather_flat(gathered, local, self.group)])
        per_rank = gathered.view(self.world_size, local.numel())
        wholes, offset = [], 0
        for chunk in chunks:
            size = chunk.chunk.numel()
            whole = per_rank[:, offset : offset + size].reshape(-1).narrow(0, 0, chunk.numel)
            wholes.append(whole.view(chunk.shape))
            offset += size
        return wholes

    # ------------------------------------------------------------------ training
    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Backwards inside accumulate locally (no collective) under the "boundary" policy."""
        return self.reducer.no_sync()

    def reduce_gradients(self) -> None:
        """Finish this window's reductions and turn the shards into true averaged gradients, dividing by
        ``world_size * loss_scale`` once (idempotent until the step). A backward after this and before the
        step raises: reduce (or read norms) only after the window's last micro-batch."""
        if self._had_grad is None:
            self._check_trainability_unchanged()
            self._had_grad = self.reducer.finish(divide_by=self.world_size * self.loss_scale)

    def found_nonfinite_gradient(self) -> bool:
        """Whether any rank's gradient shard holds an inf or NaN (a collective; same answer everywhere)."""
        return bool(self.nonfinite_ranks()[1])

    def nonfinite_ranks(self, loss_nonfinite: torch.Tensor | bool = False) -> tuple[list[int], list[int]]:
        """The ranks whose loss (as the caller saw it) and whose reduced gradient shard were not finite.
        One tiny all-gather: every rank gets the same answer and so takes the same decision."""
        shards = self.grad_shards()
        device = shards[0].device if shards else torch.device("cpu")
        # A NaN or inf anywhere makes the sum non-finite, so summing is the cheap test (a full isfinite scan
        # cost a tenth of a CPU step); a finite sum that overflows falls back to the exact test.
        sums = torch.stack([shard.sum(dtype=torch.float32) for shard in shards]) if shards else torch.zeros(0)
        grad_nonfinite = (~torch.isfinite(sums)).any().float()
        if grad_nonfinite.item():
            grad_nonfinite = torch.tensor(float(any(not torch.isfinite(shard).all() for shard in shards)))
        local = torch.stack([torch.as_tensor(loss_nonfinite, dtype=torch.float32, device=device),
                             grad_nonfinite.to(device)])
        gathered = torch.empty(2 * self.world_size, device=device)
        settle([all_gather_flat(gathered, local, self.group)])
        flags = gathered.view(self.world_size, 2).cpu()
        return ([r for r in range(self.world_size) if flags[r, 0]],
                [r for r in range(self.world_size) if flags[r, 1]])

    def skip_step(self) -> None:
        """Drop this window's gradients without touching weights or optimizer state."""
        self.reduce_gradients()
        self.zero_grad()

    def _check_trainability_unchanged(self) -> None:
        for record in self.layout.params:
            planned = self.layout.buckets[record.bucket].key.requires_grad
            if self.params[record.index].requires_grad != planned:
                raise RuntimeError(
                    f"{record.fqn}.requires_grad changed from {planned} after ZeRO planned its buckets; its "
                    "gradient would be neither reduced nor stepped. Set requires_grad before the engine (or "
                    "the strategy's setup) is created."
                )

    def grad_shards(self) -> list[torch.Tensor]:
        """This rank's averaged gradient slices, one 1-D tensor per trainable bucket."""
        self.reduce_gradients()
        return [state.shard for state in self.reducer.buckets]

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the global gradient norm over all ranks' shards to ``max_norm``; return the norm before.

        ``torch.nn.utils.clip_grad_norm_`` would see only this rank's slice, hence the all-reduce.
        """
        total = self.grad_norm(norm_type)
        scale = max_norm / (total.item() + 1e-6)
        if scale < 1.0:
            for shard in self.grad_shards():
                shard.mul_(scale)
        return total

    def grad_norm(self, norm_type: float = 2.0) -> torch.Tensor:
        """The norm of the whole (averaged) gradient, identical on every rank (a collective)."""
        shards = self.grad_shards()
        device = shards[0].device if shards else torch.device("cpu")
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

    def clip_grad_value_(self, clip_value: float) -> None:
        """Clamp every gradient element to ``[-clip_value, clip_value]`` (element-wise, no collective)."""
        for shard in self.grad_shards():
            shard.clamp_(-clip_value, clip_value)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step: run ``closure`` (forward and backward) if given, reduce, step, all-gather."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.reduce_gradients()
        assert self._had_grad is not None
        if self.offload:
            for state in self.reducer.buckets:
                self.host_grads[state.bucket.index].copy_(state.shard, non_blocking=self._pin)
            self._wait_for_host_copies()
        self.optimizer.step(self._had_grad)
        self._gather_params()
        self.zero_grad()
        return loss

    def _gather_params(self) -> None:
        """Stages 1-2: all-gather the updated slices. Stage 3: the slice is the parameter until the next
        forward gathers it."""
        works = []
        for bucket in self.layout.buckets:
            if not bucket.trainable:
                continue
            flat = self.flat_params[bucket.index]
            lo, hi = bucket.shard_range(self.rank)
            owned = self.param_shards.get(bucket.index)
            if owned is None:
                owned = flat.narrow(0, lo, hi - lo)
            if self._has_own_master(bucket):
                owned.copy_(self.masters[bucket.index], non_blocking=self._pin)
            if self.config.stage < 3:
                works.append(all_gather_flat(flat, owned, self.group))
        settle(works)
        if self.sharder is not None:
            self.sharder.after_step()

    def gather_all(self) -> None:
        """Stage 3: keep the whole model gathered (a no-grad loop); no-op otherwise. A collective."""
        if self.sharder is not None:
            self.sharder.gather_all()

    def release_all(self) -> None:
        """Stage 3: back to slices after ``gather_all``."""
        if self.sharder is not None:
            self.sharder.release_all()

    def zero_grad(self) -> None:
        """Clear gradients and start a new accumulation window (also done at the end of ``step``)."""
        self.reducer.zero_grad()
        self._had_grad = None
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

    # ------------------------------------------------------------------ state
    def full_state_dict(self) -> dict[str, Any]:
        """Whole parameters (fp32 masters where they exist) and optimizer state keyed by FQN, on CPU, on
        every rank. Loadable on any world size. A collective: call it on every rank."""
        return {"params": self.full_params(), "optimizer": self.optimizer.full_state_dict(self.group)}

    def _authoritative_shard(self, bucket: Bucket) -> torch.Tensor | None:
        """The slice that holds ``bucket``'s true values when the full parameters do not (a master in a wider
        dtype, or stage 3's parameter slice); None when the module's parameters are whole and exact (an
        offloaded master in the storage dtype equals the storage slice: [Note: optimizer offload])."""
        if bucket.trainable and bucket.dtypes.separate_master:
            return self.masters[bucket.index]
        return self.param_shards.get(bucket.index)

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
        buckets = sorted({r.bucket for r in self.layout.params if id(self.params[r.index]) in ids})
        if self.sharder is not None:
            self.sharder.gather(buckets)
        before = {}
        if modifier_rank is not None:  # to move only changed values into fp32 masters (no rounding)
            for index in buckets:
                bucket = self.layout.buckets[index]
                if self._has_own_master(bucket):
                    lo, hi = bucket.shard_range(self.rank)
                    before[index] = self.flat_params[index].narrow(0, lo, hi - lo).clone()
        # Stage 3's persistent buckets are their own slices: without a modifier, restore what the block changes.
        kept = {} if modifier_rank is not None or self.sharder is None else {
            index: self.param_shards[index].clone() for index in buckets if index in self.sharder.persistent}
        try:
            yield chosen
            if modifier_rank is not None:
                self._write_back(buckets, modifier_rank, before)
        finally:
            if self.sharder is not None:
                for index, value in kept.items():
                    self.param_shards[index].copy_(value)
                self.sharder.refresh_persistent(sorted(kept))
                self.sharder.release(buckets)

    def _write_back(self, buckets: list[int], modifier_rank: int, before: dict[int, torch.Tensor]) -> None:
        src = dist.get_global_rank(self.group, modifier_rank) if self.group is not None else modifier_rank
        self._wait_for_host_copies()  # masters are written below
        with torch.no_grad():
            for index in buckets:
                bucket = self.layout.buckets[index]
                tensors = [self.flat_params[index]] if self._is_flat(bucket) else [
                    self.params[i].data for i in bucket.params]
                settle([dist.broadcast(t, src=src, group=self.group, async_op=True) for t in tensors])
                if not self._is_flat(bucket):
                    continue
                lo, hi = bucket.shard_range(self.rank)
                owned = self.flat_params[index].narrow(0, lo, hi - lo)
                shard = self.param_shards.get(index)
                if shard is not None:
                    shard.copy_(owned)
                if index in before:
                    master = self.masters[index]
                    changed = owned != before[index]
                    master[changed.to(master.device)] = owned[changed].to(device=master.device, dtype=master.dtype)
        if self.sharder is not None:
            self.sharder.refresh_persistent()

    @property
    def holds_sharded_values(self) -> bool:
        """Whether some true parameter values live only in slices (fp32 masters, stage 3)."""
        return any(self._authoritative_shard(b) is not None for b in self.layout.buckets)

    def full_params(self) -> dict[str, torch.Tensor]:
        """Whole parameters keyed by FQN (and alias), on CPU; masters where they exist. A collective."""
        params: dict[str, torch.Tensor] = {}
        for bucket in self.layout.buckets:
            source: torch.Tensor | None = None
            shard = self._authoritative_shard(bucket)
            if shard is not None:
                source = torch.empty(bucket.padded_numel, dtype=shard.dtype, device=self.device)
                settle([all_gather_flat(source, shard.to(self.device), self.group)])
            for index in bucket.params:
                record = self.layout.params[index]
                if source is not None:
                    value = source.narrow(0, record.offset, record.numel).view(record.shape)
                else:
                    value = self.params[index].detach()
                value = value.to("cpu", copy=True)
                for name in (record.fqn, *record.aliases):
                    params[name] = value
        return params

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
            self.optimizer.check_param_groups(source.param_groups)

    def load_state(self, source: StateSource, optimizer: bool = True) -> None:
        """Restore parameters (and optimizer state) from ``source``, saved on any world size and stage:
        each rank reads only the ranges it keeps. No collective. Checked whole before anything changes."""
        self.check_source(source, optimizer)
        sharded = self._sharded_params
        self._wait_for_host_copies()  # masters are written below
        with torch.no_grad():
            for record in self.layout.params:
                if record.index not in sharded:
                    self.params[record.index].copy_(source.param(record.fqn, 0, record.numel).view(record.shape))
            for bucket in self.layout.buckets:
                targets = [t for t in (self.param_shards.get(bucket.index), self.masters.get(bucket.index))
                           if t is not None]
                for piece in self.layout.shard_slices(bucket, self.rank) if targets else ():
                    value = source.param(self.layout.params[piece.param].fqn, piece.start, piece.numel)
                    for target in targets:
                        target.narrow(0, piece.shard_offset, piece.numel).copy_(value)
        if self.sharder is not None:
            self.sharder.after_step()
        if optimizer:
            self.optimizer.load_state(source)

    @property
    def _sharded_params(self) -> set[int]:
        """Parameters whose module tensor is not whole between uses (stage 3)."""
        return {i for b in self.layout.buckets if b.index in self.param_shards for i in b.params}

    def materialize_module(self) -> None:
        """Give the module whole parameters, in the master dtype (fp32 after mixed-precision training).

        A collective. Stage 3 stops sharding the module. Call it when training with this engine is over.
        """
        if self.sharder is not None:
            self.sharder.remove_hooks()
            self.sharder.gather_all()
        for bucket in self.layout.buckets:
            if not (bucket.trainable and bucket.dtypes.separate_master):
                continue
            master = self.masters[bucket.index]
            full = torch.empty(bucket.padded_numel, dtype=master.dtype, device=self.device)
            settle([all_gather_flat(full, master.to(self.device), self.group)])
            for index in bucket.params:
                record = self.layout.params[index]
                self.params[index].data = full.narrow(0, record.offset, record.numel).view(record.shape)

    def close(self) -> None:
        """Remove every hook this engine installed; the module keeps its (flat-buffer) parameters."""
        self.reducer.remove_hooks()
        self.optimizer.remove_hooks()
        if self.sharder is not None:
            self.sharder.remove_hooks()
