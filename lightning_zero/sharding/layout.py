"""The layout: which parameter lives in which bucket, at which offset, and which rank owns which slice.

Pure bookkeeping shared by every stage and by checkpoints: no communication and no tensors allocated here.

[Note: flat contiguous shards]
Each bucket is one flat, 1-D buffer holding its parameters back to back, padded at the end to a multiple
of the world size. Rank ``r`` owns elements ``[r * S, (r + 1) * S)`` of every bucket, ``S = padded / N``.
We chose this over per-parameter dim-0 shards (FSDP2) because:

* every collective runs on one evenly sized 1-D buffer per bucket (one reduce-scatter, one all-gather),
  the moment backward fills it, with no per-parameter padding or copy-in/copy-out;
* the balance is exact (each rank holds ``ceil(numel / N)`` elements of every bucket) where per-parameter
  sharding pads every parameter and whole-parameter partitions (ZeroRedundancyOptimizer) are uneven;
* padding costs at most ``N - 1`` elements per bucket instead of per parameter.

[Note: fp32 norms, vectors and embeddings under mixed precision]
Under ``*-mixed`` the module computes with 16-bit stored parameters inside autocast. Autocast casts only
the inputs of the ops on its lists (matmuls, convolutions, attention); every other op meets the parameter
as stored. ``ddp`` stores fp32, so such ops see fp32 weights. With 16-bit weights, an fp32 activation (from
an fp32 buffer such as a positional encoding) reaching a norm fails on the CPU ("mixed dtype (CPU): expect
parameter to have scalar type of Float" in LayerNorm, GroupNorm, BatchNorm and InstanceNorm), and elsewhere
the op silently computes with rounded weights where ``ddp`` uses fp32 ones (an embedding lookup: 6-18% of
the weight update differed after 3 AdamW steps on GPT-2, Llama and Lightning's demo Transformer). So the
parameters autocast never casts keep fp32 storage: those of norm modules and embeddings, and every
parameter with at most one dimension (biases, custom norm gains such as Llama's and litgpt's RMSNorm,
layer scales). With this, the transformers, litgpt, peft and Lightning models of ``tests/test_zoo.py``
train bit for bit as under ``ddp`` with ``bf16-mixed``. Matrices used by linear layers and convolutions
stay 16-bit: autocast rounds them to 16 bits under ``ddp`` too.

The cost per kept element: fp32 storage is its own master, so a shard holds 4 (storage) + 4 (gradient)
bytes instead of 2 + 4 + 4 (master): stage 3 holds less at rest and gathers 4 bytes instead of 2 for
these parameters; stages 1-2 hold the whole parameter in 4 bytes instead of 2. Norms and vectors are a
tiny share of a model (0.1% of GPT-2), embeddings a larger one (2% of Llama-2 7B, 31% of GPT-2 small).
Parameters in dtypes the policy does not name (float64) keep theirs.

The price is that a parameter may straddle ranks, so the optimizer sees slices of parameters. That is
exact only for element-wise optimizers, which is why others are refused (see ``optimizer.py``). The
per-parameter record (FQN, shape, offset) lets every rank compute every other rank's range, so state
dicts are keyed by FQN and can be re-sliced for any world size.

Worked example, world size 2, one bucket holding ``a`` (3 elements) and ``b`` (4 elements)::

    flat   [a0 a1 a2 b0 | b1 b2 b3 pad]      padded_numel 8, shard_numel 4
    rank 0 owns a[0:3] at shard offset 0 and b[0:1] at shard offset 3
    rank 1 owns b[1:4] at shard offset 0 (and one padding element)

[Note: whole parameters]
An optimizer whose update of a parameter reads the whole of it (Muon orthogonalises each matrix, Adafactor
factors its second moment over rows and columns, LAMB and LARS divide by its norm) is exact only if one
rank holds the whole parameter. For these (and for optimizers we do not know: the layout is exact for any
optimizer whose update of a parameter depends on that parameter alone) every trainable bucket is laid out
by owner instead: each parameter goes whole to the rank that owns the fewest elements so far, largest
first, over the whole model (sorted greedy, as ZeroRedundancyOptimizer partitions), and the bucket holds
rank 0's parameters, then rank 1's, and so on, with no padding. Rank ``r`` owns ``[bounds[r], bounds[r+1])``:
the shards are uneven, so each bucket still reduces and gathers with one collective, over uneven pieces
(``Comm``). The bytes moved per step are those of the flat layout (the bucket once each way); the balance is
that of a greedy partition: the most-loaded rank owns at most the average plus the largest parameter. A
rank may own nothing in a bucket, and a parameter larger than the average share makes its owner the
heaviest: state per rank is ``K * owned`` instead of ``K * numel / N``.

Worked example, world size 2, one bucket holding ``a`` (3 elements), ``b`` (4) and ``c`` (2)::

    b -> rank 0 (loads 4, 0); a -> rank 1 (4, 3); c -> rank 1 (4, 5)
    flat   [b0 b1 b2 b3 | a0 a1 a2 c0 c1]   bounds (0, 4, 9)
    rank 0 owns b whole, rank 1 owns a and c whole
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from lightning_zero.config import DtypeSlots

__all__ = [
    "BucketKey",
    "Bucket",
    "ByModule",
    "BySize",
    "DtypeSlots",
    "Grouping",
    "full_precision_params",
    "Layout",
    "ParamRecord",
    "ShardSlice",
    "plan_layout",
]


@dataclass(frozen=True)
class BucketKey:
    """Parameters share a bucket only if the optimizer, dtype and trainability treat them alike."""

    group: int | None  # optimizer param group index; None for parameters the optimizer does not hold
    dtype: torch.dtype
    requires_grad: bool
    own_dtype: bool = False  # kept in its own dtype where a precision policy applies (fp32 norms, embeddings)


@dataclass(frozen=True)
class ParamRecord:
    """Where one parameter lives. ``aliases`` are further names of the same tensor (tied weights)."""

    index: int
    fqn: str
    shape: torch.Size
    numel: int
    bucket: int
    offset: int  # first element of this parameter inside its bucket's flat buffer
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShardSlice:
    """Elements ``[start, start + numel)`` of parameter ``param`` (flattened), held at ``shard_offset``."""

    param: int
    start: int
    numel: int
    shard_offset: int


@dataclass(frozen=True)
class Bucket:
    """One flat buffer: a run of parameters with the same key, padded to a multiple of the world size."""

    index: int
    key: BucketKey
    params: tuple[int, ...]  # ParamRecord indices, in buffer order
    numel: int
    padded_numel: int
    shard_numel: int
    dtypes: DtypeSlots
    unit: str = ""  # the grouping unit (module FQN for stage 3); "" for size-based buckets
    #: Whole-parameter layout: rank ``r`` owns ``[bounds[r], bounds[r + 1])``, whole parameters back to back
    #: (see [Note: whole parameters]); None: even shards of ``shard_numel``, cutting through parameters.
    bounds: tuple[int, ...] | None = None

    def shard_range(self, rank: int) -> tuple[int, int]:
        """The ``[start, end)`` range of the flat buffer that ``rank`` owns."""
        if self.bounds is not None:
            return self.bounds[rank], self.bounds[rank + 1]
        return rank * self.shard_numel, (rank + 1) * self.shard_numel

    def shard_size(self, rank: int) -> int:
        """How many elements ``rank`` owns (every rank the same in the flat layout)."""
        lo, hi = self.shard_range(rank)
        return hi - lo

    @property
    def trainable(self) -> bool:
        """Held by the optimizer and receiving gradients: the buckets ZeRO reduces and steps."""
        return self.key.group is not None and self.key.requires_grad


@dataclass(frozen=True)
class _Candidate:
    """A parameter on its way into a bucket."""

    position: int  # registration order in the module
    fqn: str
    key: BucketKey
    numel: int


class Grouping(Protocol):
    """Splits parameters into buckets. Each returned list holds parameters of one key only."""

    def split(self, candidates: Sequence[_Candidate]) -> list[tuple[str, list[_Candidate]]]: ...


def full_precision_params(module: torch.nn.Module,
                          shapes: Mapping[torch.nn.Parameter, torch.Size] | None = None) -> set[torch.nn.Parameter]:
    """The parameters a ``*-mixed`` policy keeps in fp32 (autocast never casts them): those of norm modules
    and embeddings, and every parameter with at most one dimension (``shapes``: the true shapes of empty
    placeholders built under ``sharded_init``); see [Note: fp32 norms, vectors and embeddings under mixed
    precision]."""
    shapes = shapes or {}
    kept = {param for param in module.parameters() if len(shapes.get(param, param.shape)) <= 1}
    for child in module.modules():
        if isinstance(child, _KEPT_MODULES):
            kept.update(child.parameters(recurse=False))
    return kept


# Modules whose parameters autocast never casts. BatchNorm and InstanceNorm share the private ``_NormBase``.
_KEPT_MODULES = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm,
          torch.nn.Embedding, torch.nn.EmbeddingBag)


@dataclass(frozen=True)
class BySize:
    """Buckets of at most ``max_numel`` elements (one larger parameter gets a bucket of its own).

    Parameters are taken in reverse registration order, which is roughly the order backward produces
    their gradients, so the first buckets fill first and their reduce-scatter overlaps the rest of backward.
    """

    max_numel: int

    def __post_init__(self) -> None:
        if self.max_numel <= 0:
            raise ValueError(f"bucket size must be a positive number of elements, got {self.max_numel}")

    def split(self, candidates: Sequence[_Candidate]) -> list[tuple[str, list[_Candidate]]]:
        closed: list[list[_Candidate]] = []
        open_by_key: dict[BucketKey, list[_Candidate]] = {}
        for cand in reversed(candidates):
            current = open_by_key.get(cand.key)
            if current and sum(c.numel for c in current) + cand.numel > self.max_numel:
                closed.append(current)
                current = None
            if current is None:
                current = open_by_key[cand.key] = []
            current.append(cand)
        closed.extend(open_by_key.values())
        # Order buckets by when backward is expected to complete them: their first (latest-registered) member.
        closed.sort(key=lambda bucket: -bucket[0].position)
        return [("", bucket) for bucket in closed]


@dataclass(frozen=True)
class ByModule:
    """One bucket per (unit module, key): the unit is the longest prefix in ``units`` owning the FQN.

    Parameters matching no unit form the root unit ``""``. Buckets follow forward (registration) order,
    which is what stage 3 gathers in.
    """

    units: tuple[str, ...]

    def unit_of(self, fqn: str) -> str:
        """The unit whose bucket holds the parameter named ``fqn``: the longest owning prefix, else ``""``."""
        return max((u for u in self.units if fqn == u or fqn.startswith(u + ".")), key=len, default="")

    def split(self, candidates: Sequence[_Candidate]) -> list[tuple[str, list[_Candidate]]]:
        grouped: dict[tuple[str, BucketKey], list[_Candidate]] = {}
        for cand in candidates:
            grouped.setdefault((self.unit_of(cand.fqn), cand.key), []).append(cand)
        return [(unit, members) for (unit, _), members in grouped.items()]


@dataclass(frozen=True)
class Layout:
    """The whole plan: every parameter's record and every bucket, for one world size."""

    world_size: int
    params: tuple[ParamRecord, ...]
    buckets: tuple[Bucket, ...]
    _by_fqn: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    def param(self, fqn: str) -> ParamRecord:
        """The record for ``fqn`` (any alias works)."""
        return self.params[self._by_fqn[fqn]]

    def shard_slices(self, bucket: Bucket, rank: int) -> tuple[ShardSlice, ...]:
        """The parameter pieces that ``rank`` owns in ``bucket``, in buffer order."""
        lo, hi = bucket.shard_range(rank)
        slices = []
        for index in bucket.params:
            record = self.params[index]
            start, end = max(lo, record.offset), min(hi, record.offset + record.numel)
            if start < end:
                slices.append(ShardSlice(index, start - record.offset, end - start, start - lo))
        return tuple(slices)

    def owner(self, record: ParamRecord) -> int | None:
        """The rank holding ``record`` whole in the whole-parameter layout; None where shards cut through it."""
        bounds = self.buckets[record.bucket].bounds
        if bounds is None:
            return None
        return next((rank for rank in range(self.world_size) if record.offset < bounds[rank + 1]),
                    self.world_size - 1)

    def describe(self) -> list[tuple[str, tuple[int, ...], str, bool, int | None]]:
        """Rank-independent metadata (FQN, shape, dtype, requires_grad, group) of every parameter."""
        rows = []
        for record in self.params:
            key = self.buckets[record.bucket].key
            rows.append((record.fqn, tuple(record.shape), str(key.dtype), key.requires_grad, key.group))
        return rows

    def fingerprint(self) -> int:
        """A 63-bit digest of ``describe()`` and the bucket plan, equal on ranks that agree."""
        text = repr((self.describe(), [(b.key.group, b.params, b.padded_numel, b.bounds) for b in self.buckets]))
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def plan_layout(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    world_size: int,
    grouping: Grouping,
    group_of: Mapping[torch.nn.Parameter, int] | None = None,
    dtypes: DtypeSlots | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
    shapes: Mapping[torch.nn.Parameter, torch.Size] | None = None,
    own_dtype: Collection[torch.nn.Parameter] = (),
    whole: bool | Collection[int] = False,
) -> Layout:
    """Plan buckets for ``named_params`` (registration order, each tensor once) on ``world_size`` ranks.

    ``group_of`` maps a parameter to its optimizer param group; ``dtypes`` sets the dtype slots of trainable
    buckets in fp32 or in ``dtypes.storage`` (default, and for every other parameter: every slot in the
    parameter's own dtype, so a float64 layer stays float64); ``own_dtype`` lists parameters that keep their
    own dtype regardless; ``aliases`` lists extra names of tied parameters; ``shapes`` gives the true shape
    of parameters that are empty placeholders (built under sharded initialisation); ``whole`` gives every
    trainable parameter whole to one rank (see [Note: whole parameters]); a collection: those of the
    param groups it lists.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    group_of = group_of or {}
    aliases = aliases or {}
    shapes = shapes or {}
    named = list(named_params)

    def shape_of(param: torch.nn.Parameter) -> torch.Size:
        return shapes.get(param, param.shape)

    candidates = [
        _Candidate(
            position,
            fqn,
            BucketKey(group_of.get(param), param.dtype, param.requires_grad, param in own_dtype),
            shape_of(param).numel(),
        )
        for position, (fqn, param) in enumerate(named)
    ]
    fqn_position = {fqn: position for position, (fqn, _) in enumerate(named)}
    records: list[ParamRecord | None] = [None] * len(named)
    buckets: list[Bucket] = []
    loads = [0] * world_size  # elements owned so far by each rank, over every whole-parameter bucket
    for unit, members in grouping.split(candidates):
        key = members[0].key
        if any(m.key != key for m in members):
            raise ValueError("a grouping returned a bucket mixing param groups, dtypes or requires_grad")
        bounds: tuple[int, ...] | None = None
        whole_group = whole if isinstance(whole, bool) else key.group in whole
        if whole_group and key.group is not None and key.requires_grad:
            members, bounds = _by_owner(members, loads)
        offset = 0
        indices = []
        for member in members:
            position = fqn_position[member.fqn]
            param = named[position][1]
            records[position] = ParamRecord(
                position, member.fqn, shape_of(param), member.numel, len(buckets), offset,
                tuple(aliases.get(member.fqn, ())),
            )
            indices.append(position)
            offset += member.numel
        padded = max(world_size, math.ceil(offset / world_size) * world_size) if bounds is None else offset
        shard_numel = padded // world_size
        if bounds is not None:
            shard_numel = max(hi - lo for lo, hi in zip(bounds, bounds[1:]))
        slots = DtypeSlots.uniform(key.dtype)
        if (dtypes is not None and key.requires_grad and not key.own_dtype
                and key.dtype in (torch.float32, dtypes.storage)):
            slots = dtypes
        buckets.append(
            Bucket(len(buckets), key, tuple(indices), offset, padded, shard_numel, slots, unit, bounds)
        )
    if any(r is None for r in records):
        raise ValueError("a grouping dropped parameters")
    final = tuple(r for r in records if r is not None)
    by_fqn = {r.fqn: r.index for r in final}
    by_fqn.update({alias: r.index for r in final for alias in r.aliases})
    return Layout(world_size, final, tuple(buckets), by_fqn)


def _by_owner(members: list[_Candidate], loads: list[int]) -> tuple[list[_Candidate], tuple[int, ...]]:
    """``members`` reordered rank by rank, each given whole to the rank that owns the fewest elements so far
    (largest first; ``loads`` is updated), and the bounds of each rank's run."""
    owner: dict[int, int] = {}
    for member in sorted(members, key=lambda m: (-m.numel, m.position)):
        rank = min(range(len(loads)), key=lambda r: (loads[r], r))
        owner[member.position] = rank
        loads[rank] += member.numel
    ordered: list[_Candidate] = []
    bounds = [0]
    for rank in range(len(loads)):
        mine = [m for m in members if owner[m.position] == rank]
        ordered.extend(mine)
        bounds.append(bounds[-1] + sum(m.numel for m in mine))
    return ordered, tuple(bounds)
