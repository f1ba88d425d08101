"""Settings of the sharding engine, frozen dataclasses validated once at construction: how to shard
(``ZeroConfig``) and in which dtypes (``PrecisionPolicy``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "CommPath", "DtypeSlots", "EvalGatherName",
    "OffloadName", "PrecisionName", "PrecisionPolicy", "ReducePolicyName", "ShardSize", "ZeroConfig",
    "resolve_reduce_policy",
]

ReducePolicyName = Literal["auto", "boundary", "every_micro_batch"]
_POLICIES = ("auto", "boundary", "every_micro_batch")
OffloadName = Literal["none", "optimizer"]
CommPath = Literal["auto", "native"]
_COMM_PATHS = ("auto", "native")
_OFFLOADS = ("none", "optimizer")
EvalGatherName = Literal["unit", "whole"]
_EVAL_GATHERS = ("unit", "whole")
_STAGES = (1, 2, 3)
#: Ranks per sharding group (see [Note: hybrid sharding]): an int, "node", or None for the whole world.
ShardSize = int | Literal["node"] | None


@dataclass(frozen=True)
class ZeroConfig:
    """How ZeRO shards one model.

    ``stage``: 1 shards optimizer state (and fp32 masters), 2 also gradients, 3 also parameters.
    ``bucket_numel``: elements per gradient bucket (default 2**23, 32 MiB in fp32); smaller buckets start
    reductions earlier in backward, larger ones make fewer collectives.
    ``reduce_policy``: when gradients are reduced under accumulation; see ``resolve_reduce_policy``.
    ``allow_unknown_optimizer``: vouch that an optimizer class we do not know is element-wise, so it steps
    slices (the flat layout) instead of whole parameters (see [Note: whole parameters]).
    ``unit_numel``: stage 3 gathers a module without weights of its own (a transformer block) as one unit
    when it holds at most this many elements (default 2**24) and no stack of blocks; others are opened up.
    ``persist_numel``: stage 3 keeps the smallest units, up to this many elements in all, gathered on every
    rank instead of gathering them at each use (embeddings, final norms); ``None`` (default): the smaller of
    2**17 and 1/64 of the model; 0: every unit is gathered at use.
    ``comm``: ``"auto"`` runs each backend's fastest collectives (gloo: substitutes with the same results);
    ``"native"`` always calls ``reduce_scatter_tensor``/``all_gather_into_tensor``, what NCCL runs (tests use
    it to run the NCCL call sequence on gloo).
    ``offload``: ``"optimizer"`` keeps this rank's master slices and optimizer state in host (CPU) memory
    and steps the optimizer there (ZeRO-Offload): the device keeps parameters and gradients only, and each
    step copies the gradient slice to the host and the updated slice back. ``"none"`` keeps all on the device.
    ``eval_gather``: stage 3 in evaluation loops (``begin_evaluation``): ``"unit"`` gathers each unit around
    its forward as training does, and ranks may run different numbers of forward calls; ``"whole"`` gathers
    the whole model once per loop (see [Note: agreed gathers]).
    ``check_gathers``: stage 3, debugging: every unit's training forward, and every backward gather, waits
    for the other ranks' announcement before it runs, naming the first divergence. Without it the forwards
    are still announced and checked, off the critical path (see [Note: unit announcements]).
    ``shard_size``: ranks per sharding group. ``None`` (default) shards over every rank; an int S dividing
    the world size makes groups of S consecutive ranks that each shard as above and hold replicas of each
    other (hybrid sharding: gathers stay inside a group, and only the owned gradient slice is all-reduced
    across groups); ``"node"``: the processes of one node (see [Note: hybrid sharding]).
    ``quantize_gathers``: stage 3 gathers parameters for compute as int8 blocks with fp32 scales (ZeRO++'s
    qwZ): about a quarter of fp32's gather bytes, at a small, bounded rounding of the weights each forward and
    backward computes with; masters, optimizer state and checkpoints stay exact (see [Note: quantized gathers]).
    """

    stage: int = 2
    bucket_numel: int = 2**23
    reduce_policy: ReducePolicyName = "auto"
    allow_unknown_optimizer: bool = False
    unit_numel: int = 2**24
    persist_numel: int | None = None
    offload: OffloadName = "none"
    comm: CommPath = "auto"
    eval_gather: EvalGatherName = "unit"
    check_gathers: bool = False
    shard_size: ShardSize = None
    quantize_gathers: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stage, bool) or not isinstance(self.stage, int) or self.stage not in _STAGES:
            raise ValueError(
                f"ZeRO stage must be one of {_STAGES} (1: optimizer state, 2: + gradients, 3: + parameters), "
                f"got {self.stage!r}"
            )
        if isinstance(self.bucket_numel, bool) or not isinstance(self.bucket_numel, int) or self.bucket_numel <= 0:
            raise ValueError(f"bucket_numel must be a positive integer, got {self.bucket_numel!r}")
        if isinstance(self.unit_numel, bool) or not isinstance(self.unit_numel, int) or self.unit_numel < 0:
            raise ValueError(f"unit_numel must be a non-negative integer, got {self.unit_numel!r}")
        if self.persist_numel is not None and (isinstance(self.persist_numel, bool)
                                               or not isinstance(self.persist_numel, int) or self.persist_numel < 0):
            raise ValueError(f"persist_numel must be a non-negative integer or None (automatic), got "
                             f"{self.persist_numel!r}")
        if self.reduce_policy not in _POLICIES:
            raise ValueError(f"reduce_policy must be one of {_POLICIES}, got {self.reduce_policy!r}")
        if self.comm not in _COMM_PATHS:
            raise ValueError(f"comm must be one of {_COMM_PATHS}, got {self.comm!r}")
        if self.eval_gather not in _EVAL_GATHERS:
            raise ValueError(f"eval_gather must be 'unit' (each unit around its forward) or 'whole' (the whole model "
                             f"once per evaluation loop), got {self.eval_gather!r}")
        if self.shard_size is not None and self.shard_size != "node" and (
                isinstance(self.shard_size, bool) or not isinstance(self.shard_size, int) or self.shard_size < 1):
            raise ValueError(f"shard_size must be a positive integer dividing the world size, 'node' (the processes "
                             f"of one node) or None (the whole world), got {self.shard_size!r}")
        if not isinstance(self.quantize_gathers, bool):
            raise TypeError(f"quantize_gathers must be True or False, got {self.quantize_gathers!r}")
        if self.quantize_gathers and self.stage != 3:
            raise ValueError(f"quantize_gathers quantizes stage 3's parameter gathers; stage {self.stage} gathers no "
                             "parameters for compute: drop it, or use stage=3")
        if not isinstance(self.check_gathers, bool):
            raise TypeError(f"check_gathers must be True or False, got {self.check_gathers!r}")
        if self.offload not in _OFFLOADS:
            raise ValueError(
                f"offload must be 'none' (everything on the device) or 'optimizer' (master slices and optimizer "
                f"state in CPU memory), got {self.offload!r}"
            )


def resolve_reduce_policy(stage: int, policy: ReducePolicyName) -> Literal["boundary", "every_micro_batch"]:
    """The policy to run: ``"auto"`` is "boundary" for stage 1 and "every_micro_batch" for stage 2.

    Measured (``benchmarks/reduce_policy.py``, accumulate 4): stage 2 on every micro-batch holds 3x fewer
    gradient bytes mid-window and was 8% faster on gloo; stage 1 at the boundary holds a third fewer
    (no separate shard accumulator) and sends k times fewer gradient bytes, for 6% more step time over
    loopback, where communication is nearly free.
    """
    if policy == "auto":
        return "boundary" if stage == 1 else "every_micro_batch"  # stage 3 as stage 2
    if policy not in _POLICIES:
        raise ValueError(f"reduce_policy must be one of {_POLICIES}, got {policy!r}")
    return policy


@dataclass(frozen=True)
class DtypeSlots:
    """The dtypes one bucket uses at each point of its life.

    ``storage``: the parameters the module computes with and their full gradients.
    ``reduce``: the buffer gradients are reduce-scattered in.
    ``accumulate``: the sharded gradient summed across micro-batches.
    ``master``: the slice the optimizer steps; when equal to ``storage`` the owned slice of the flat
    parameter buffer is the master itself (no copy).
    """

    storage: torch.dtype
    reduce: torch.dtype
    accumulate: torch.dtype
    master: torch.dtype

    @classmethod
    def uniform(cls, dtype: torch.dtype) -> DtypeSlots:
        """Every slot in ``dtype``: the ``32-true`` case."""
        return cls(dtype, dtype, dtype, dtype)

    @property
    def separate_master(self) -> bool:
        """Whether the master slice needs its own buffer."""
        return self.master != self.storage


PrecisionName = Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"]
_LOW = {"bf16": torch.bfloat16, "16": torch.float16}


@dataclass(frozen=True)
class PrecisionPolicy:
    """The dtypes ZeRO trains in. ``compute`` is the autocast dtype (None: no autocast).

    ``*-mixed``: parameters and full gradients stored in the 16-bit dtype, autocast for compute, fp32
    master slices. ``*-true``: everything in the 16-bit dtype, no fp32 master. ``reduce`` and
    ``accumulate`` default to fp32: in ``benchmarks/precision_dtypes.py`` bf16 reduction or bf16
    accumulation left a 1e-3 relative error in the averaged gradient, fp32 below 1e-8.
    """

    storage: torch.dtype
    compute: torch.dtype | None
    reduce: torch.dtype
    accumulate: torch.dtype
    master: torch.dtype

    def __post_init__(self) -> None:
        for name in ("storage", "reduce", "accumulate", "master"):
            if not getattr(self, name).is_floating_point:
                raise ValueError(f"{name} dtype must be floating point, got {getattr(self, name)}")
        if self.master.itemsize < self.storage.itemsize or (
            self.master.itemsize == 2 and self.master != self.storage
        ):
            raise ValueError(
                f"master weights in {self.master} cannot hold updates to {self.storage} parameters; use "
                "master=torch.float32 (the *-mixed policies do)"
            )

    @classmethod
    def from_precision(
        cls,
        precision: str,
        reduce: torch.dtype = torch.float32,
        accumulate: torch.dtype = torch.float32,
    ) -> PrecisionPolicy:
        """The policy for a Lightning precision string, e.g. ``"bf16-mixed"``."""
        if precision == "32-true":
            return cls(torch.float32, None, torch.float32, torch.float32, torch.float32)
        low, _, kind = precision.partition("-")
        if low not in _LOW or kind not in ("mixed", "true"):
            raise ValueError(
                f"precision {precision!r} is not supported by ZeRO; use one of "
                "'32-true', 'bf16-mixed', '16-mixed', 'bf16-true', '16-true'"
            )
        dtype = _LOW[low]
        if kind == "mixed":
            return cls(dtype, dtype, reduce, accumulate, torch.float32)
        return cls(dtype, None, reduce, accumulate, dtype)

    @property
    def whole_module_dtype(self) -> torch.dtype | None:
        """``*-true`` in 16 bits: the dtype the whole module is built and kept in (no fp32 master); else None."""
        return self.storage if self.master == self.storage and self.storage != torch.float32 else None

    @property
    def needs_loss_scaling(self) -> bool:
        """fp16 gradients overflow without a dynamic loss scale."""
        return self.storage == torch.float16

    def slots(self) -> DtypeSlots:
        """The engine's per-bucket dtype slots for trainable floating-point parameters."""
        return DtypeSlots(self.storage, self.reduce, self.accumulate, self.master)
