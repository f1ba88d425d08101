"""The sharded optimizer: the user's own ``torch.optim`` object, re-pointed at this rank's master slices.

Re-pointing (as DeepSpeed does) rather than building a second optimizer keeps every param group dict the
same object, so LR schedulers, ``LearningRateMonitor`` and per-group lr / weight decay work untouched, and
the optimizer's own ``step`` is what runs. Element-wise optimizers step slices that cut through parameters
(see [Note: flat contiguous shards] in ``layout.py``); the others step whole parameters, viewed in their own
shape (see [Note: whole parameters]).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import optim
from torch.optim import optimizer as torch_optimizer

from lightning_zero.sharding.bucket import FlatBucket, OptimizerEntry
from lightning_zero.sharding.collectives import all_gather_into, all_gather_objects, broadcast_from
from lightning_zero.sharding.layout import Bucket, Layout
from lightning_zero.sharding.state import FullSource, StateSource

__all__ = ["ELEMENTWISE_OPTIMIZERS", "ShardedOptimizer", "check_elementwise", "check_host_steppable",
           "needs_whole_params"]

ELEMENTWISE_OPTIMIZERS: frozenset[type[optim.Optimizer]] = frozenset(
    {
        optim.SGD, optim.Adam, optim.AdamW, optim.Adagrad, optim.RMSprop, optim.Adamax, optim.NAdam,
        optim.RAdam, optim.Adadelta, optim.ASGD, optim.Rprop,
    }
)

# Optimizers whose update of a parameter reads the whole of it: exact in the whole-parameter layout.
_WHOLE_TENSOR_REASONS = {
    "Adafactor": "it factors the second moment over the rows and columns of each whole weight matrix",
    "Muon": "it orthogonalises each whole weight matrix",
    "Shampoo": "its preconditioners span whole weight matrices",
    "LAMB": "its trust ratio divides by the norm of each whole parameter",
    "Lamb": "its trust ratio divides by the norm of each whole parameter",
    "FusedLAMB": "its trust ratio divides by the norm of each whole parameter",
    "LARS": "its trust ratio divides by the norm of each whole parameter",
    "Lars": "its trust ratio divides by the norm of each whole parameter",
}
# Optimizers no layout makes exact.
_REFUSED_REASONS = {
    "LBFGS": "it re-evaluates the loss through a closure several times per step and its two-loop recursion takes "
             "dot products over every parameter at once, so no split of the parameters across ranks is exact; "
             "train it under ddp",
    "SparseAdam": "it needs sparse gradients, while ZeRO reduces dense flat buckets; use Adam or AdamW",
}


def _user_class(optimizer: optim.Optimizer) -> type[optim.Optimizer]:
    cls = type(optimizer)
    if getattr(cls, "_lightning_zero_routed", False):  # Fabric's routed subclass: judge the user's class
        cls = cls.__mro__[1]
    return cls


def needs_whole_params(optimizer: optim.Optimizer, allow_unknown: bool = False) -> bool:
    """Whether ``optimizer`` must step whole parameters (the whole-parameter layout), or may step slices that
    cut through them (the flat layout: element-wise optimizers). Raises for the few no layout makes exact.

    Known element-wise classes take the flat layout; Muon, Adafactor, LAMB- and LARS-style optimizers the
    whole one (see [Note: whole parameters] in ``layout.py``). An unknown class takes the whole layout too,
    which is exact for any optimizer that updates each parameter from that parameter's own gradient and
    state; ``allow_unknown=True`` vouches that it is element-wise and takes the flat layout instead.
    """
    cls = _user_class(optimizer)
    for klass in cls.__mro__:
        reason = _REFUSED_REASONS.get(klass.__name__)
        if reason is not None:
            raise ValueError(f"{cls.__name__} cannot be sharded by ZeRO: {reason}.")
    if any(klass.__name__ in _WHOLE_TENSOR_REASONS for klass in cls.__mro__):
        return True
    return not (cls in ELEMENTWISE_OPTIMIZERS or allow_unknown)


def check_elementwise(optimizer: optim.Optimizer, allow_unknown: bool = False) -> None:
    """Raise unless ``optimizer`` updates each element from that element's own state only (the flat layout
    fits it); ``allow_unknown=True``: the caller vouches for an unknown class."""
    cls = _user_class(optimizer)
    for klass in cls.__mro__:
        reason = _WHOLE_TENSOR_REASONS.get(klass.__name__) or _REFUSED_REASONS.get(klass.__name__)
        if reason is not None:
            raise ValueError(f"{cls.__name__} is not element-wise: {reason}.")
    if cls in ELEMENTWISE_OPTIMIZERS or allow_unknown:
        return
    known = ", ".join(sorted(k.__name__ for k in ELEMENTWISE_OPTIMIZERS))
    raise ValueError(
        f"{cls.__module__}.{cls.__name__} is not a known element-wise optimizer ({known}); ZeRO gives it whole "
        "parameters. If it is element-wise, pass allow_unknown_optimizer=True for the flat layout."
    )


def check_host_steppable(optimizer: optim.Optimizer) -> None:
    """Raise unless ``optimizer`` can step tensors in CPU memory, as ``ZeroConfig(offload="optimizer")`` needs.

    Checked at engine construction, before any parameter moves, so a refusal costs nothing. ``capturable=True``
    (CUDA-graph capture) keeps step counters on the accelerator and asserts against CPU tensors; ``fused=True``
    needs a CPU kernel (torch has them for Adam, AdamW, SGD and Adagrad; this build is asked); ``Fused*``
    classes (apex, DeepSpeed) are CUDA multi-tensor kernels.
    """
    name = type(optimizer).__name__
    fix = "or keep the optimizer state on the device with offload='none'"
    if name.startswith("Fused"):
        raise ValueError(
            f"{name} runs CUDA-only fused kernels, and offload='optimizer' steps on the CPU: use the torch.optim "
            f"equivalent (e.g. torch.optim.AdamW), {fix}"
        )
    for index, group in enumerate(optimizer.param_groups):
        if group.get("capturable"):
            raise ValueError(
                f"{name} was built with capturable=True (param group {index}), which steps only accelerator "
                f"tensors, and offload='optimizer' steps on the CPU: drop capturable=True, {fix}"
            )
        if group.get("fused") and not _cpu_has_fused_kernels():
            raise ValueError(
                f"{name} was built with fused=True (param group {index}), and this torch build has no fused CPU "
                f"kernel for offload='optimizer' to step with: drop fused=True, {fix}"
            )


def _cpu_has_fused_kernels() -> bool:
    """Whether this torch build's fused optimizer kernels run on the CPU (from torch 2.4 on)."""
    supported = getattr(torch_optimizer, "_get_fused_kernels_supported_devices", None)  # private, hence getattr
    return supported is not None and "cpu" in supported()


class ShardedOptimizer:
    """Steps the user's optimizer on this rank's slices and moves its state to and from full form."""

    def __init__(
        self,
        optimizer: optim.Optimizer,
        layout: Layout,
        rank: int,
        buckets: Sequence[FlatBucket],
        fqn_of: Mapping[torch.Tensor, str],
        allow_unknown: bool = False,
        device: torch.device | None = None,
        first_group: int = 0,
        total_groups: int | None = None,
    ) -> None:
        """``buckets`` are the trainable buckets: the optimizer steps each one's ``master`` slice and reads its
        gradient slice (``host_grad`` under offload, else ``grad_shard``); their ``entries`` are set here.
        ``device`` is where collectives run (the parameters' device; default: the masters'). In the whole-parameter
        layout each entry is a whole parameter, its master and gradient viewed in the parameter's shape.
        ``first_group``: the layout's number for this optimizer's first param group (several optimizers
        number their groups one after another, ``total_groups`` in all)."""
        needs_whole_params(optimizer, allow_unknown)  # refuses what no layout makes exact
        # State the optimizer already holds (Adagrad makes it at construction; a resumed optimizer has it)
        # is kept: each rank slices out its part below.
        existing = {fqn_of[p]: dict(values) for p, values in optimizer.state.items()}
        self.optimizer = optimizer
        self.first_group = first_group
        self.total_groups = len(optimizer.param_groups) if total_groups is None else total_groups
        self.layout = layout
        self.rank = rank
        self.buckets = list(buckets)
        self._by_index = {bucket.index: bucket for bucket in self.buckets}
        if device is None:
            masters = [b.master for b in self.buckets if b.master is not None]
            device = masters[0].device if masters else torch.device("cpu")
        self.device = device  # NCCL gathers device tensors only, wherever the state itself lives
        self.param_fqns: list[list[str]] = [[fqn_of[p] for p in g["params"]] for g in optimizer.param_groups]
        #: The tensors each param group holds after re-pointing (this rank's master views).
        self.views: list[list[torch.Tensor]] = []
        for group_index, group in enumerate(optimizer.param_groups):
            views = []
            for bucket in self.buckets:
                if bucket.plan.key.group != first_group + group_index:
                    continue
                master, grads = bucket.master, bucket.host_grad if bucket.host_grad is not None else bucket.grad_shard
                assert master is not None and grads is not None
                shaped = bucket.plan.bounds is not None  # whole parameters: in their own shape
                bucket.entries = [
                    OptimizerEntry(piece, *(
                        view.view(layout.params[piece.param].shape) if shaped else view
                        for view in (master.narrow(0, piece.shard_offset, piece.numel),
                                     grads.narrow(0, piece.shard_offset, piece.numel))))
                    for piece in layout.shard_slices(bucket.plan, rank)
                ]
                views.extend(entry.master for entry in bucket.entries)
            group["params"] = views
            self.views.append(views)
        self._view_counts = [len(views) for views in self.views]
        optimizer.state.clear()
        #: Every parameter's shape by FQN, for sources that hold optimizer state only.
        self.shapes = {record.fqn: record.shape for record in layout.params}
        self._restore_slices(FullSource({"optimizer": {"state": existing}}, shapes=self.shapes))
        self._stepping = False
        self._guard = optimizer.register_step_pre_hook(self._refuse_direct_step)

    def _entries(self) -> list[OptimizerEntry]:
        return [entry for bucket in self.buckets for entry in bucket.entries]

    def _refuse_direct_step(self, *_: Any) -> None:
        if not self._stepping:
            raise RuntimeError(
                "this optimizer is sharded by lightning-zero; step it through the engine (ZeroEngine.step) "
                "so gradients are reduced before and parameters gathered after"
            )

    def step(self, had_grad: Sequence[bool]) -> None:
        """Step the slices of parameters that had a gradient on some rank in this window."""
        if len(self.optimizer.param_groups) != len(self.param_fqns):
            raise RuntimeError(
                "optimizer.add_param_group() was called during this step, after its backward; add param groups "
                "between steps (the strategies re-plan then; with the bare engine call engine.replan()), see "
                "[Note: re-planning]"
            )
        for piece, master, grad in self._entries():
            if had_grad[piece.param]:
                master.grad = grad if grad.dtype == master.dtype else grad.to(master.dtype)
            else:
                master.grad = None
        self._stepping = True
        try:
            self.optimizer.step()
        finally:
            self._stepping = False
            for _, master, _ in self._entries():
                master.grad = None  # frees fp32 copies made when the gradient shard is 16-bit

    # ------------------------------------------------------------------ full state
    def full_state_dict(self, group: torch.distributed.ProcessGroup | None, rank: int | None = None) -> dict[str, Any]:
        """Every parameter's optimizer state, whole and keyed by FQN, on CPU (a collective that gathers one
        bucket and key at a time on the device). ``rank``: only that rank keeps the tensors; None: every rank."""
        keep = rank is None or torch.distributed.get_rank(group) == rank
        fqns = [record.fqn for record in self.layout.params]
        schema: dict[int, dict[str, tuple[str, Any]]] = {}
        for piece, master, _ in self._entries():
            whole = self.layout.owner(self.layout.params[piece.param]) is not None
            for key, value in self.optimizer.state.get(master, {}).items():
                if torch.is_tensor(value) and value.dim() > 0:
                    if whole:  # any shape (Adafactor's row and column factors): sent whole by its owner
                        schema.setdefault(piece.param, {})[key] = ("whole", (value.dtype, tuple(value.shape)))
                        continue
                    if value.shape != master.shape:
                        raise ValueError(
                            f"optimizer state {key!r} of {fqns[piece.param]!r} is not element-wise "
                            f"(shape {tuple(value.shape)} for a slice of {master.numel()} elements)"
                        )
                    schema.setdefault(piece.param, {})[key] = ("tensor", value.dtype)
                else:
                    scalar = value.detach().cpu().clone() if torch.is_tensor(value) else value
                    schema.setdefault(piece.param, {})[key] = ("scalar", scalar)
        merged: dict[int, dict[str, tuple[str, Any]]] = {}
        for rank_schema in all_gather_objects(schema, group):
            for index, keys in rank_schema.items():
                merged.setdefault(index, {}).update(keys)
        state: dict[str, dict[str, Any]] = {fqns[i]: {} for i in sorted(merged)}
        for index, keys in merged.items():
            for key, (kind, value) in keys.items():
                if kind == "scalar":
                    state[fqns[index]][key] = value
        for bucket in self.layout.buckets:
            if not bucket.trainable or bucket.index not in self._by_index:  # another optimizer's
                continue
            if bucket.bounds is not None:
                self._gather_whole_state(bucket, merged, state, group, keep)
                continue
            tensor_keys = sorted(
                {(key, value) for i in bucket.params for key, (kind, value) in merged.get(i, {}).items()
                 if kind == "tensor"},
                key=lambda kv: (kv[0], str(kv[1])),
            )
            owner = self._by_index.get(bucket.index)
            entries = owner.entries if owner is not None else []
            device = self.device
            for key, dtype in tensor_keys:
                local = torch.zeros(bucket.shard_numel, dtype=dtype, device=device)
                for piece, master, _ in entries:
                    value = self.optimizer.state.get(master, {}).get(key)
                    if value is not None:
                        local.narrow(0, piece.shard_offset, piece.numel).copy_(value)
                full = torch.empty(bucket.padded_numel, dtype=dtype, device=device)
                all_gather_into(full, local, group)
                for index in bucket.params if keep else ():
                    if merged.get(index, {}).get(key, ("",))[0] == "tensor":
                        record = self.layout.params[index]
                        state[record.fqn][key] = full.narrow(0, record.offset, record.numel).view(
                            record.shape).to("cpu", copy=True)
        return {"state": state, "param_groups": self.param_groups()}

    def _gather_whole_state(self, bucket: Bucket, merged: Mapping[int, Mapping[str, tuple[str, Any]]],
                            state: dict[str, dict[str, Any]], group: torch.distributed.ProcessGroup | None,
                            keep: bool) -> None:
        """A whole-parameter bucket's tensor state into ``state``: each value broadcast by its owner."""
        masters = {entry.piece.param: entry.master for entry in self._entries()}
        for index in bucket.params:
            record = self.layout.params[index]
            owner = self.layout.owner(record)
            assert owner is not None
            for key, (kind, spec) in sorted(merged.get(index, {}).items()):
                if kind != "whole":
                    continue
                dtype, shape = spec
                if owner == self.rank:
                    value = self.optimizer.state[masters[index]][key].to(self.device, copy=True)
                else:
                    value = torch.empty(shape, dtype=dtype, device=self.device)
                broadcast_from([value], group, source=owner)
                if keep:
                    state[record.fqn][key] = value.to("cpu", copy=True)

    def param_groups(self) -> list[dict[str, Any]]:
        """The param groups' settings, each with the FQNs of its parameters in place of tensors."""
        return [{**{k: v for k, v in g.items() if k != "params"}, "params": list(names)}
                for g, names in zip(self.optimizer.param_groups, self.param_fqns)]

    def planned_names(self, group: Mapping[str, Any]) -> list[str] | None:
        """The FQNs of the parameters in ``group``, if it is one of this optimizer's groups still holding the
        slices it was re-pointed at (None: a group added, replaced or edited since; see [Note: re-planning])."""
        for views, count, names in zip(self.views, self._view_counts, self.param_fqns):
            if group["params"] is views and len(views) == count:
                return names
        return None

    def own_groups(self, groups: Sequence[Mapping[str, Any]]) -> Sequence[Mapping[str, Any]]:
        """This optimizer's saved groups: ``groups`` themselves, or this optimizer's run of them where several
        optimizers' groups were saved one after another (an engine's local state)."""
        count = len(self.optimizer.param_groups)
        if len(groups) == self.total_groups != count:
            return groups[self.first_group : self.first_group + count]
        return groups

    def check_param_groups(self, groups: Sequence[Mapping[str, Any]]) -> None:
        """Raise unless saved ``groups`` hold the same parameters, group by group, as this optimizer."""
        groups = self.own_groups(groups)
        if len(groups) != len(self.optimizer.param_groups):
            raise ValueError(
                f"the saved optimizer has {len(groups)} param groups, this one {len(self.optimizer.param_groups)}"
            )
        for index, (saved, names) in enumerate(zip(groups, self.param_fqns)):
            if list(saved["params"]) != names:
                raise ValueError(
                    f"param group {index} holds different parameters than the saved one; "
                    f"first differences: {sorted(set(saved['params']) ^ set(names))[:3]}"
                )

    def load_full_state_dict(self, full: Mapping[str, Any]) -> None:
        """Take this rank's slices out of a ``full_state_dict()`` saved on any world size (no collective)."""
        self.load_state(FullSource({"optimizer": full}, shapes=self.shapes))

    def load_state(self, source: StateSource) -> None:
        """Restore settings and this rank's slices of the state from ``source`` (no collective)."""
        groups = source.param_groups
        if groups is None:
            raise ValueError("the saved state holds no optimizer state (saved weights only)")
        self.check_param_groups(groups)
        for group, saved in zip(self.optimizer.param_groups, self.own_groups(groups)):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.optimizer.state.clear()
        self._restore_slices(source)

    def _restore_slices(self, source: StateSource) -> None:
        """Give each of this rank's slices its part of the saved state (element-wise values in the shape of
        the slice's master; a whole parameter's other values, such as Adafactor's factors, as saved)."""
        for piece, master, _ in self._entries():
            values = source.optimizer_state(self.layout.params[piece.param].fqn, piece.start, piece.numel)
            if values:
                self.optimizer.state[master] = {
                    key: _shaped(value, master).to(device=master.device, copy=True) if torch.is_tensor(value)
                    else value for key, value in values.items()
                }

    def remove_hooks(self) -> None:
        """Stop refusing direct steps (the engine is being torn down)."""
        self._guard.remove()


def _shaped(value: torch.Tensor, master: torch.Tensor) -> torch.Tensor:
    """An element-wise state value in ``master``'s shape (saved 1-D or in the parameter's shape)."""
    if value.dim() > 0 and value.numel() == master.numel():
        return value.reshape(master.shape)
    return value
