"""The collectives ZeRO needs: ``Comm``, the bucket collectives of one engine on the backend's best path,
and small pure functions (flags, metadata, broadcasts) with the process group explicit.

Every reduction is a SUM; callers divide once, explicitly. gloo ignores ``op`` in ``reduce_scatter_tensor``
up to torch 2.8, fails on ``PREMUL_SUM`` in every version and is unreliable with ``AVG``.

[Note: keep finished work handles]
In torch 2.13, gloo's worker thread drops its reference to a Work just after finishing it. If that is the
last reference, the thread frees the Work's tensors itself, which needs the GIL; shortly before the
interpreter exits, Python ends such a thread inside a ``noexcept`` destructor and the process aborts
("terminate called without an active exception", seen under Lightning's ``ddp`` too). So every collective
here is waited through ``wait_all``, which keeps the handles until the next ``wait_all``: the last reference is
then always dropped by Python, on a thread holding the GIL. That includes small objects (``all_gather_objects``
and ``broadcast_object`` replace torch's ``*_object`` forms, whose handles cannot be kept) and the collectives
Lightning offers users through the strategy (``SharedStrategyMethods``).

Worked example, two ranks, one bucket of four elements::

    Comm.reduce_scatter   rank 0 [1 2 3 4], rank 1 [5 6 7 8]  ->  rank 0 [6 8], rank 1 [10 12]
    Comm.all_gather       rank 0 [a b],     rank 1 [c d]      ->  both [a b c d]
"""

from __future__ import annotations

import itertools
import os
import pickle
import socket
import sys
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup, Work

from lightning_zero.config import CommPath
from lightning_zero.sharding.whereabouts import describe_ranks

__all__ = [
    "ACROSS_GROUPS",
    "CollectiveError",
    "Comm",
    "FlagExchange",
    "GradientParts",
    "QUANT_BLOCK",
    "Handle",
    "all_gather_into",
    "all_gather_objects",
    "all_reduce",
    "all_reduce_across",
    "broadcast_coalesced",
    "broadcast_object",
    "broadcast_from",
    "exchange_flags",
    "host_group",
    "quantize_blocks",
    "hybrid_groups",
    "node_size",
    "traffic",
    "wait_all",
]

_kept: list[Work] = []  # see [Note: keep finished work handles]

#: Where each rank's shard of a bucket starts and ends (``Bucket.bounds``); None: even shards.
Bounds = tuple[int, ...] | None


class CollectiveError(RuntimeError):
    """A collective did not complete on this rank, most often because another rank failed."""


#: Logical bytes each kind of collective moved in this process, as the ZeRO paper counts them: an
#: all-reduce of n elements moves 2n (a reduce-scatter plus an all-gather), a reduce-scatter or an
#: all-gather moves its full buffer once. Reset with ``traffic.clear()``.
traffic: Counter[str] = Counter()


def _count(kind: str, tensor: torch.Tensor, factor: int = 1) -> None:
    traffic[kind] += factor * tensor.numel() * tensor.element_size()


def wait_all(works: Iterable[Work | None], what: str = "") -> None:
    """Wait for ``works`` (``what`` they are, for the error) and keep their handles until the next call
    (see the note above). A failure says where every rank was (see [Note: whereabouts])."""
    global _kept
    waited = [work for work in works if work is not None]
    try:
        for work in waited:
            work.wait()
    except RuntimeError as exc:  # DistBackendError and gloo's connection errors
        raise _failed(exc, what or "a collective") from exc
    _kept = waited


def _failed(exc: BaseException, what: str) -> CollectiveError:
    """The error for a collective that failed on this rank while it waited for ``what``. Said at once on
    stderr too: asking the other ranks takes up to seconds, and Lightning's launcher kills every process
    as soon as it sees a child die."""
    print(f"a collective failed on rank {dist.get_rank()} while waiting for {what}: {exc} (asking the other "
          "ranks where they were)", file=sys.stderr, flush=True)
    ranks = describe_ranks(what)
    return CollectiveError(
        f"a collective failed on rank {dist.get_rank()}: {exc}. "
        + (f"Where the ranks were: {ranks}. " if ranks else "")
        + "A rank that raised prints its own error; this rank stops instead of waiting. "
        "ZeroStrategy(timeout=...) bounds the wait for a rank that hangs."
    )

# torch 2.13 renamed the tensor forms; fall back so older floors keep working.
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_isend, _irecv = dist.isend, dist.irecv  # gloo's reduce-scatter path (see Comm.reduce_scatter)
_broadcast = dist.broadcast  # gloo's all-gather path (see Comm.all_gather)
_reduce_scatter_list, _all_gather_list = dist.reduce_scatter, dist.all_gather  # uneven slices, native path


class GradientParts:
    """A bucket's gradients where they lie: each parameter's own ``.grad`` at its offset in the bucket (None, and
    the padding: zeros), so gloo's reduce-scatter can send them with no flat copy of the bucket
    (see ``_reduce_scatter_by_sends``). ``flat()`` builds that copy where a collective needs one."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device,
                 parts: list[tuple[int, int, torch.Tensor | None]]) -> None:
        self.numel, self.dtype, self.device = numel, dtype, device
        self.parts = sorted(parts, key=lambda part: part[0])  # (offset, numel, tensor or None)
        self.scratch: list[torch.Tensor] = []  # buffers a reduction in flight allocated for it (counted as held)

    @classmethod
    def of(cls, flat: torch.Tensor) -> GradientParts:
        """One flat buffer as the only part."""
        return cls(flat.numel(), flat.dtype, flat.device, [(0, flat.numel(), flat)])

    @property
    def nbytes(self) -> int:
        """Bytes held for the reduction: the parts' storages and the scratch buffers."""
        held = [t for _, _, t in self.parts if t is not None] + self.scratch
        return sum(t.numel() * t.element_size() for t in held)

    def cuts(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """``[lo, hi)`` split where a part starts or ends: the same on every rank, whatever its gradients."""
        points = {lo, hi}
        for offset, count, _ in self.parts:
            points.update(p for p in (offset, offset + count) if lo < p < hi)
        ordered = sorted(points)
        return list(zip(ordered, ordered[1:]))

    def read(self, lo: int, hi: int) -> torch.Tensor:
        """The values of ``[lo, hi)`` as one contiguous tensor of ``dtype``: a view where they lie in one part
        of that dtype, else a copy (zeros where no part or a None part lies)."""
        for offset, count, tensor in self.parts:
            if offset <= lo and hi <= offset + count and tensor is not None:
                values = tensor.reshape(-1).narrow(0, lo - offset, hi - lo)
                return values if values.dtype == self.dtype and values.is_contiguous() else (
                    values.to(self.dtype).contiguous())
        out = torch.zeros(hi - lo, dtype=self.dtype, device=self.device)
        for offset, count, tensor in self.parts:
            a, b = max(lo, offset), min(hi, offset + count)
            if a < b and tensor is not None:
                out.narrow(0, a - lo, b - a).copy_(tensor.reshape(-1).narrow(0, a - offset, b - a))
        return out

    def flat(self) -> torch.Tensor:
        """The whole bucket as one buffer (the only part itself where it is one flat buffer of ``dtype``)."""
        if len(self.parts) == 1 and self.parts[0][:2] == (0, self.numel) and self.parts[0][2] is not None:
            return self.read(0, self.numel)
        out = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        end = 0
        for offset, count, tensor in self.parts:
            out.narrow(0, end, offset - end).zero_()
            region = out.narrow(0, offset, count)
            region.zero_() if tensor is None else region.copy_(tensor.reshape(-1))
            end = offset + count
        out.narrow(0, end, self.numel - end).zero_()
        return out


class _SummedPieces:
    """The handle of gloo's reduce-scatter by sends: waiting sums this rank's own piece and the copies of it the
    other ranks sent (rank order) and writes, or adds, the sum into ``output``."""

    def __init__(self, works: list[Work], own: list[tuple[int, torch.Tensor]], received: list[torch.Tensor],
                 output: torch.Tensor, add: bool, source: GradientParts) -> None:
        self.works, self.own, self.received, self.output, self.add = works, own, received, output, add
        self.source: GradientParts | None = source

    def wait(self) -> bool:
        for work in self.works:
            work.wait()
        if self.source is not None:
            total = self.received[0] if self.received else torch.zeros(
                self.output.numel(), dtype=self.source.dtype, device=self.output.device)
            for at, values in self.own:  # x + y == y + x: the same sum as the other ranks' order would give
                total.narrow(0, at, values.numel()).add_(values)
            for piece in self.received[1:]:
                total.add_(piece)
            if self.add:
                self.output.add_(total.to(self.output.dtype))
            elif total.data_ptr() != self.output.data_ptr():
                self.output.copy_(total)
        # the handle outlives the wait (wait_all keeps it); the buffers need not
        self.own, self.received, self.source = [], [], None
        return True


#: Point-to-point tags of gloo's reduce-scatter are taken from here up, far above the small tags users and torch
#: use, modulo this many.
_EXCHANGE_TAG = 1 << 30
#: Above this many parameter pieces in one rank's slice, the slice is copied and sent as one message.
_MAX_MESSAGES = 64


def _reduce_scatter_by_sends(output: torch.Tensor, source: GradientParts, group: ProcessGroup | None,
                             bounds: Bounds, tag: int, add: bool = False) -> _SummedPieces:
    """gloo's reduce-scatter path, asynchronous: each rank sends every other rank that rank's slice of
    ``source`` and receives its own slice from each of them, ``(N-1)/N`` of the bucket each way per rank, with
    no flat copy of the bucket: a slice travels as one message per parameter piece in it (one message when
    there are more than ``_MAX_MESSAGES``), straight from the ``.grad`` tensors. Messages are told apart by
    tags counted from ``tag``, the same on every rank since the pieces follow the layout."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    ranges = [(lo, lo + count) for lo, count in _ranges_of(source.numel, world, bounds)]
    messages = []  # per rank: the message ranges of its slice, and the tag of the first
    counted = 0
    for lo, hi in ranges:
        cuts = source.cuts(lo, hi) if hi > lo else []
        cuts = cuts if len(cuts) <= _MAX_MESSAGES else [(lo, hi)]
        messages.append((cuts, counted))
        counted += len(cuts)

    def tag_of(index: int) -> int:
        return _EXCHANGE_TAG + (tag + index) % _EXCHANGE_TAG

    works, received = [], []
    for peer in range(world):
        if peer == me:
            continue
        cuts, first = messages[peer]
        for index, (a, b) in enumerate(cuts):
            works.append(_isend(source.read(a, b), group=group, group_dst=peer, tag=tag_of(first + index)))
    start, end = ranges[me]
    own_cuts, first = messages[me]
    # Writing (not adding) into an output of its own: the first copy received lands in it, with no scratch.
    into_output = not add and output.dtype == source.dtype and output.is_contiguous() and all(
        tensor is None or tensor.untyped_storage().data_ptr() != output.untyped_storage().data_ptr()
        for _, _, tensor in source.parts)
    for peer in range(world):
        if peer == me or end == start:
            continue
        if into_output and not received:
            buffer = output
        else:
            buffer = torch.empty(end - start, dtype=source.dtype, device=source.device)
            source.scratch.append(buffer)
        received.append(buffer)
        for index, (a, b) in enumerate(own_cuts):
            works.append(_irecv(buffer.narrow(0, a - start, b - a), group=group, group_src=peer,
                                tag=tag_of(first + index)))
    own = [(a - start, source.read(a, b)) for a, b in source.cuts(start, end)] if end > start else []
    return _SummedPieces(works, own, received, output, add, source)


class _AllOf:
    """One handle for several works: waiting waits for them all."""

    def __init__(self, works: list[Work]) -> None:
        self.works = works

    def wait(self) -> bool:
        for work in self.works:
            work.wait()
        return True


#: Up to this many ranks, gloo all-gathers by broadcasts (see ``Comm.all_gather``).
BROADCAST_GATHER_MAX_WORLD = 8


def _ranges(flat: torch.Tensor, world: int, bounds: Bounds) -> list[tuple[int, int]]:
    """Each rank's ``(start, size)`` in ``flat``: from ``bounds``, else even."""
    return _ranges_of(flat.numel(), world, bounds)


def _ranges_of(numel: int, world: int, bounds: Bounds) -> list[tuple[int, int]]:
    """Each rank's ``(start, size)`` in a buffer of ``numel`` elements: from ``bounds``, else even."""
    if bounds is None:
        size = numel // world
        return [(rank * size, size) for rank in range(world)]
    return [(lo, hi - lo) for lo, hi in zip(bounds, bounds[1:])]


def _all_gather_by_broadcasts(flat: torch.Tensor, shard: torch.Tensor, group: ProcessGroup | None = None,
                              bounds: Bounds = None) -> _AllOf:
    """gloo's all-gather path, asynchronous: each rank broadcasts its slice of ``flat`` in place."""
    ranges = _ranges(flat, dist.get_world_size(group), bounds)
    start, size = ranges[dist.get_rank(group)]
    own = flat.narrow(0, start, size)
    if size and own.data_ptr() != shard.data_ptr():
        own.copy_(shard)
    return _AllOf([_broadcast(flat.narrow(0, start, size), group=group, async_op=True, group_src=source)
                   for source, (start, size) in enumerate(ranges) if size])


class Handle:
    """One launched collective. ``wait()`` orders the caller's stream after it (CUDA: the compute stream waits
    an event, the host does not block; CPU: the host waits) and drops the buffers it kept alive."""

    def __init__(self, work: Work | _AllOf | _SummedPieces | _Dequantized | None, event: Any = None,
                 module: Any = None, keep: tuple[torch.Tensor, ...] = (), device: torch.device | None = None,
                 then: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.work, self.event, self.module, self.keep, self.device = work, event, module, keep, device
        self.then = then  # (into, source): copied after the wait (an uneven reduce-scatter's output)

    def wait(self) -> None:
        if self.event is not None:
            self.module.current_stream(self.device).wait_event(self.event)
            self.event = None
        elif self.work is not None:
            wait_all([self.work])
        if self.then is not None:
            self.then[0].copy_(self.then[1])
        self.work, self.keep, self.then = None, (), None


# [Note: quantized gathers]
# ``quantize_gathers`` (stage 3, ZeRO++'s qwZ): a unit's gather sends each rank's slice as int8 blocks of
# ``QUANT_BLOCK`` elements with one fp32 scale per block (max |x| / 127, symmetric, round to nearest), two
# all-gathers instead of one, and every rank dequantizes every slice, its own included, into the full
# buffer: all ranks compute with the same rounded weights, as they must for the ranks' gradients to be of
# one model. The rounding is at most scale / 2 per element. Only compute sees it: the slice itself (stage 3's
# parameter slice, the fp32 master) is never rounded, so the optimizer, checkpoints and the persistent
# buckets' refresh stay exact. Bytes: 1 per element plus 4 per block, 0.254x fp32 or 0.508x bf16.
#: Elements per int8 block of a quantized gather, each with its own fp32 scale (see [Note: quantized gathers]).
QUANT_BLOCK = 256


def quantize_blocks(values: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` (1-D) as int8 in ``blocks`` blocks of ``QUANT_BLOCK`` (zero-padded), with one fp32 scale per
    block: value ~ int8 * scale, error at most scale / 2 = max|block| / 254."""
    padded = torch.zeros(blocks * QUANT_BLOCK, dtype=torch.float32, device=values.device)
    padded[: values.numel()] = values
    rows = padded.view(blocks, QUANT_BLOCK)
    scales = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    quantized = torch.round(rows / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return quantized.view(-1), scales


class _Dequantized:
    """The handle of a quantized gather: waiting waits for the int8 blocks and their scales, then writes every
    rank's dequantized slice into the full buffer."""

    def __init__(self, works: list[Work], flat: torch.Tensor, quantized: torch.Tensor, scales: torch.Tensor,
                 world: int, blocks: int) -> None:
        self.works, self.flat, self.quantized, self.scales = works, flat, quantized, scales
        self.world, self.blocks = world, blocks

    def wait(self) -> bool:
        for work in self.works:
            work.wait()
        if self.flat is not None:
            shard = self.flat.numel() // self.world
            values = self.quantized.view(self.world, self.blocks, QUANT_BLOCK).float() * self.scales.view(
                self.world, self.blocks, 1)
            self.flat.view(self.world, shard).copy_(values.view(self.world, -1)[:, :shard])
        self.flat = self.quantized = self.scales = None  # the handle outlives the wait (wait_all keeps it)
        return True


class Comm:
    """The bucket collectives of one engine on one process group, launched on the backend's best path.

    ``native`` ("auto" picks it for every backend but gloo) calls ``reduce_scatter_tensor`` and
    ``all_gather_into_tensor``, the calls NCCL runs. On an accelerator they run on two dedicated streams
    (one per direction, so gathers for the next unit never queue behind gradient reductions), each waiting
    an event recorded on the compute stream after its input was written; ``Handle.wait`` makes the compute
    stream wait the collective's event. The input buffers stay referenced by the handle until then, which
    is what keeps the caching allocator from reusing them early: no ``record_stream`` (see
    [Note: stream ordering]). On gloo, "auto" takes two faster substitutes with the same results (below).
    ``native`` on gloo runs the NCCL call sequence on CPU, which is how the tests execute it.

    [Note: stream ordering]
    compute stream: fill bucket -> record E1 ............................ wait E2 -> read shard
    side stream:                   wait E1 -> reduce_scatter -> record E2
    A buffer written on the compute stream and read on the side stream is freed only after the compute
    stream waited E2, so any later use of its memory is ordered after the collective.
    """

    def __init__(self, group: ProcessGroup | None, device: torch.device, path: CommPath = "auto",
                 separate_reductions: bool = False, quantize_gathers: bool = False) -> None:
        if path not in ("auto", "native"):
            raise ValueError(f"comm path must be 'auto' or 'native', got {path!r}")
        self.group = group
        self.quantize_gathers = quantize_gathers
        # [Note: reductions on their own group] Stage 3 interleaves gathers (at unit boundaries, the same
        # on every rank) with reductions (when a bucket's gradients are complete on this rank: a parameter
        # without a gradient on one rank moves its bucket's launch past a gather there). Collectives pair up
        # by order within a group, so reductions get a group of their own, over the same ranks: each kind
        # then only needs its own order, which is the same on every rank.
        self.reduce_group = _same_ranks(group) if separate_reductions else group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = device
        self.gloo = dist.get_backend(group) == "gloo"
        self.native = path == "native" or not self.gloo
        self._exchanges = 0  # the next reduce-scatter's first message tag (the same count on every rank)
        self._streams: dict[str, Any] = {}
        if device.type not in ("cpu", "meta"):
            module = torch.get_device_module(device)
            self._streams = {kind: module.Stream(device=device) for kind in ("reduce_scatter", "all_gather")}

    def close(self) -> None:
        """Destroy the reductions' own group, if one was made."""
        if self.reduce_group is not self.group:
            dist.destroy_process_group(self.reduce_group)
            self.reduce_group = self.group

    def _on_stream(self, kind: str, launch: Any, keep: tuple[torch.Tensor, ...],
                   then: tuple[torch.Tensor, torch.Tensor] | None = None) -> Handle:
        """Run ``launch(async_op)`` on ``kind``'s stream after the compute stream's work so far."""
        stream = self._streams.get(kind)
        if stream is None:
            return Handle(launch(True), keep=keep, then=then)
        module = torch.get_device_module(self.device)
        stream.wait_stream(module.current_stream(self.device))
        with module.stream(stream):
            launch(False)  # enqueued on ``stream``; the host does not wait
            event = stream.record_event()
        return Handle(None, event, module, keep, self.device, then)

    def reduce_scatter(self, output: torch.Tensor, flat: torch.Tensor, bounds: Bounds = None) -> Handle:
        """Start summing ``flat`` across ranks into this rank's ``output`` slice (``bounds``: uneven slices,
        see [Note: whole parameters]).

        ``output`` may be this rank's own slice of ``flat`` (in place); the rest of ``flat`` is scratch after
        the call. gloo's own reduce-scatter is an all-reduce of a copy followed by a chunk copy: every rank
        sends and receives the whole buffer, and twice the time of the all-reduce alone (measured on torch
        2.13). On gloo ("auto") each rank instead sends the other ranks their pieces and adds the pieces it
        receives: ``(N-1)/N`` of the buffer each way, as NCCL's ring moves (see ``_reduce_scatter_by_sends``).
        """
        if not self.native:
            handle = self.reduce_scatter_parts(output, GradientParts.of(flat), bounds)
            assert handle is not None
            return handle
        _count("reduce_scatter", flat)
        if bounds is not None:  # the list form: NCCL runs uneven pieces as one coalesced reduce per rank
            pieces = [flat.narrow(0, lo, size) for lo, size in _ranges(flat, self.world_size, bounds)]
            result = torch.empty_like(output)

            def launch_uneven(async_op: bool) -> Work | None:
                return _reduce_scatter_list(result, pieces, op=dist.ReduceOp.SUM, group=self.reduce_group,
                                            async_op=async_op)

            return self._on_stream("reduce_scatter", launch_uneven, (result, flat), then=(output, result))

        # NCCL reduces in place when ``output`` is this rank's slice of ``flat`` (its documented in-place case).
        def launch(async_op: bool) -> Work | None:
            return _reduce_scatter(output, flat, op=dist.ReduceOp.SUM, group=self.reduce_group, async_op=async_op)

        return self._on_stream("reduce_scatter", launch, (output, flat))

    def reduce_scatter_parts(self, output: torch.Tensor, parts: GradientParts, bounds: Bounds = None,
                             add: bool = False) -> Handle | None:
        """As ``reduce_scatter`` of ``parts.flat()``, where the backend's path needs no flat buffer (gloo,
        "auto"): the parameters' gradients are sent where they lie. ``add``: add the sum into ``output``
        instead of writing it. None on the native path: the caller reduces ``parts.flat()`` instead."""
        if self.native:
            return None
        traffic["reduce_scatter"] += parts.numel * parts.dtype.itemsize
        tag = self._exchanges
        self._exchanges = (self._exchanges + parts.numel) % _EXCHANGE_TAG  # at most one message per element
        return Handle(_reduce_scatter_by_sends(output, parts, self.reduce_group, bounds, tag, add))

    def all_gather(self, flat: torch.Tensor, shard: torch.Tensor, bounds: Bounds = None) -> Handle:
        """Start gathering every rank's ``shard`` into ``flat``; ``shard`` may be this rank's slice of it
        (``bounds``: uneven slices, see [Note: whole parameters]).

        On gloo ("auto") with at most ``BROADCAST_GATHER_MAX_WORLD`` ranks, each rank broadcasts its slice in
        place instead: the same bytes per rank, in 0.5x (1.8M elements) to 0.7x (5.4M) the time of gloo's
        all-gather at 2 ranks and 0.8x at 4, measured on torch 2.13 (gloo's worker threads run them side by
        side). Uneven slices always take that path on gloo, whose list-form all-gather takes even pieces only.
        """
        _count("all_gather", flat)
        if not self.native or (bounds is not None and self.gloo):  # gloo's all_gather takes even pieces only
            return Handle(self._gloo_gather(flat, shard, bounds))
        if bounds is not None:  # the list form: NCCL runs uneven pieces as one coalesced broadcast per rank
            pieces = [flat.narrow(0, lo, size) for lo, size in _ranges(flat, self.world_size, bounds)]

            def launch_uneven(async_op: bool) -> Work | None:
                return _all_gather_list(pieces, shard, group=self.group, async_op=async_op)

            return self._on_stream("all_gather", launch_uneven, (flat, shard))

        def launch(async_op: bool) -> Work | None:
            return _all_gather(flat, shard, group=self.group, async_op=async_op)

        return self._on_stream("all_gather", launch, (flat, shard))


    def quantizes(self, bounds: Bounds) -> bool:
        """Whether stage 3's gathers for compute of a bucket with ``bounds`` travel as int8 (even slices only)."""
        return self.quantize_gathers and bounds is None and self.world_size > 1

    def all_gather_quantized(self, flat: torch.Tensor, shard: torch.Tensor, bounds: Bounds = None) -> Handle:
        """As ``all_gather`` (even slices), but every rank's slice travels as int8 blocks with fp32 scales and
        ``flat`` receives the dequantized values, this rank's own slice included, so every rank computes with
        the same weights (see [Note: quantized gathers]). ``shard`` keeps the exact values."""
        assert bounds is None, "quantized gathers take even slices"
        blocks = -(-shard.numel() // QUANT_BLOCK)
        mine, my_scales = quantize_blocks(shard.detach().reshape(-1).float(), blocks)
        quantized = mine.new_empty(self.world_size * mine.numel())
        scales = my_scales.new_empty(self.world_size * blocks)
        _count("all_gather", quantized)
        _count("all_gather", scales)

        def start(out: torch.Tensor, own: torch.Tensor) -> Work | _AllOf:
            if self.native:
                return _all_gather(out, own, group=self.group, async_op=True)
            return self._gloo_gather(out, own)

        works = [start(quantized, mine), start(scales, my_scales)]
        return Handle(_Dequantized(works, flat, quantized, scales, self.world_size, blocks))

    def _gloo_gather(self, flat: torch.Tensor, shard: torch.Tensor, bounds: Bounds = None) -> Work | _AllOf:
        """gloo's all-gather path ("auto"): broadcasts in place up to ``BROADCAST_GATHER_MAX_WORLD`` ranks and
        for uneven slices (see ``all_gather``), else gloo's own all-gather."""
        if 1 < self.world_size <= BROADCAST_GATHER_MAX_WORLD or bounds is not None:
            return _all_gather_by_broadcasts(flat, shard, group=self.group, bounds=bounds)
        return _all_gather(flat, shard, group=self.group, async_op=True)


def broadcast_from(tensors: list[torch.Tensor], group: ProcessGroup | None, source: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with the values of the group's rank ``source`` (its first by default)."""
    src = dist.get_global_rank(group, source) if group is not None else source
    for tensor in tensors:
        _count("broadcast", tensor)
    wait_all([dist.broadcast(t, src=src, group=group, async_op=True) for t in tensors])


def _same_ranks(group: ProcessGroup | None, backend: str | None = None) -> ProcessGroup:
    """A new group over ``group``'s ranks, on ``backend`` (default: ``group``'s) and with its timeout. A
    collective of every rank of the job: where ``group`` is one of several (hybrid sharding's groups), each
    of them gets its copy, as torch's ``new_group`` needs every rank to create every group."""
    every = all_gather_objects(_ranks_of(group), None, what="every rank's group")
    made = None
    for ranks in dict.fromkeys(tuple(r) for r in every):  # each group once, in the order the ranks gave them
        copy = _new_group(list(ranks), group, backend)
        if dist.get_rank() in ranks:
            made = copy
    assert made is not None
    return made


def _new_group(ranks: list[int], like: ProcessGroup | None, backend: str | None = None) -> ProcessGroup:
    """A new group over ``ranks`` on ``backend`` (default: ``like``'s) with ``like``'s timeout; every rank of
    the job must call it, member or not."""
    own = dist.get_backend(like)
    try:  # the timeout ZeroStrategy(timeout=...) gave the default group; private, hence the fallback
        device = torch.device("cuda") if own == "nccl" else torch.device("cpu")
        timeout = (like or dist.group.WORLD)._get_backend(device).options._timeout  # type: ignore[union-attr]
    except (AttributeError, RuntimeError):
        timeout = None
    return dist.new_group(ranks=ranks, backend=backend or own, timeout=timeout)


def _ranks_of(group: ProcessGroup | None) -> list[int]:
    return dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))


def node_size(group: ProcessGroup | None) -> int:
    """How many of ``group``'s ranks run on each node: ``LOCAL_WORLD_SIZE`` where every rank's launcher set it
    (torchrun, Lightning's launchers), else the ranks sharing this host's name. Raises unless nodes hold
    equal runs of consecutive ranks. A collective."""
    own = os.environ.get("LOCAL_WORLD_SIZE", "")
    told = all_gather_objects((own, socket.gethostname()), group, what="every rank's node")
    sizes = {size for size, _ in told}
    if len(sizes) == 1 and own.isdigit() and int(own) > 0:
        return int(own)
    hosts = [host for _, host in told]
    runs = [len(list(run)) for _, run in itertools.groupby(hosts)]
    if len(set(runs)) != 1 or len(runs) != len(set(hosts)):
        raise ValueError(f"shard_size='node' needs every node to run the same number of consecutive ranks; the "
                         f"ranks' hosts are {hosts}. Pass shard_size as an integer instead.")
    return runs[0]


# [Note: hybrid sharding]
# ``shard_size`` S splits the data-parallel ranks into groups of S consecutive ranks (a node, when S is the
# processes per node). Each group is a complete ZeRO run of S ranks: its layout, slices, gathers and
# reduce-scatters are those of a flat run on S ranks. The groups hold the same slices (replicas): rank r of
# every group owns the same ranges. At the step, after the in-group reduce-scatters (and late reductions),
# each rank all-reduces its owned gradient slice with the ranks at the same place in the other groups (its
# replica group), so every replica holds the sum over all ranks, divided once by the whole world size. What
# must agree across the whole job still uses every rank: the first values (broadcast from rank 0), the
# step's flags, the adopted launch order, the model check. Only replica 0 writes checkpoint slices.
# Example, 4 ranks with S = 2: sharding groups {0, 1} and {2, 3}; replica groups {0, 2} and {1, 3}.
def hybrid_groups(group: ProcessGroup | None, shard_size: int) -> tuple[ProcessGroup, ProcessGroup]:
    """This rank's sharding group (``shard_size`` consecutive ranks of ``group``) and replica group (the
    ranks at the same place in every sharding group); see [Note: hybrid sharding]. A collective."""
    ranks = _ranks_of(group)
    me = ranks.index(dist.get_rank())
    shard = replica = None
    for first in range(0, len(ranks), shard_size):  # every rank creates every group, member or not
        made = _new_group(ranks[first : first + shard_size], group)
        if first <= me < first + shard_size:
            shard = made
    for place in range(shard_size):
        made = _new_group(ranks[place::shard_size], group)
        if me % shard_size == place:
            replica = made
    assert shard is not None and replica is not None
    return shard, replica


def broadcast_coalesced(tensors: list[torch.Tensor], group: ProcessGroup | None) -> None:
    """Overwrite ``tensors`` with the group's first rank's values: one broadcast per (dtype, device), for many
    small tensors (buffers) at once."""
    src = dist.get_global_rank(group, 0) if group is not None else 0
    kinds: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        kinds.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    flats = [torch.cat([t.reshape(-1) for t in same]) for same in kinds.values()]
    for flat in flats:
        _count("broadcast", flat)
    wait_all([dist.broadcast(flat, src=src, group=group, async_op=True) for flat in flats])
    for same, flat in zip(kinds.values(), flats):
        offset = 0
        for tensor in same:
            tensor.copy_(flat.narrow(0, offset, tensor.numel()).view_as(tensor))
            offset += tensor.numel()


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: ProcessGroup | None) -> None:
    """Reduce ``tensor`` in place across ranks with ``op`` and wait."""
    _count("all_reduce", tensor, factor=2)
    wait_all([dist.all_reduce(tensor, op=op, group=group, async_op=True)])


#: The traffic kind of hybrid sharding's all-reduce across sharding groups: the only bytes that cross them.
ACROSS_GROUPS = "all_reduce_across"


def all_reduce_across(tensors: list[torch.Tensor], group: ProcessGroup) -> None:
    """Sum ``tensors`` in place over ``group``, the replicas of hybrid sharding (one all-reduce each, waited).
    Counted as ``all_reduce_across``: the only bytes that cross sharding groups."""
    for tensor in tensors:
        _count(ACROSS_GROUPS, tensor, factor=2)
    wait_all([dist.all_reduce(t, group=group, async_op=True) for t in tensors],
             "the gradient all-reduce across sharding groups")


def _object_device(group: ProcessGroup | None) -> torch.device:
    """Where a pickled object travels: NCCL moves only CUDA tensors, gloo host ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _pickled(obj: Any, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)


def _unpickled(data: torch.Tensor) -> Any:
    return pickle.loads(data.cpu().numpy().tobytes())  # noqa: S301 (the job's own ranks, as all_gather_object)


def all_gather_objects(obj: Any, group: ProcessGroup | None, what: str = "") -> list[Any]:
    """Every rank's ``obj`` (small, picklable metadata only), in rank order; ``what`` it is, for the error.
    As ``dist.all_gather_object``, but its handles are kept (see [Note: keep finished work handles])."""
    what = what or "the other ranks' metadata"
    world, device = dist.get_world_size(group), _object_device(group)
    payload = _pickled(obj, device)
    sizes = torch.empty(world, dtype=torch.long, device=device)
    own = torch.tensor([payload.numel()], dtype=torch.long, device=device)
    wait_all([_gather_small(sizes, own, group=group, async_op=True)], what=what)
    counts = sizes.tolist()
    longest = max(counts)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    gathered = padded.new_empty(world * longest)
    wait_all([_gather_small(gathered, padded, group=group, async_op=True)], what=what)
    rows = gathered.view(world, longest)
    return [_unpickled(rows[rank, :count]) for rank, count in enumerate(counts)]


def broadcast_object(obj: Any, src: int, group: ProcessGroup | None, what: str = "") -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank; ``src`` is a global rank, as in ``dist.broadcast``.
    As ``dist.broadcast_object_list``, but its handles are kept (see [Note: keep finished work handles])."""
    what = what or f"rank {src}'s broadcast object"
    device = _object_device(group)
    payload = _pickled(obj, device) if dist.get_rank() == src else None
    size = torch.tensor([0 if payload is None else payload.numel()], dtype=torch.long, device=device)
    wait_all([_broadcast_small(size, src=src, group=group, async_op=True)], what=what)
    data = payload if payload is not None else torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    wait_all([_broadcast_small(data, src=src, group=group, async_op=True)], what=what)
    return obj if payload is not None else _unpickled(data)


def all_gather_into(flat: torch.Tensor, shard: torch.Tensor, group: ProcessGroup | None,
                    bounds: Bounds = None) -> None:
    """Gather every rank's ``shard`` into ``flat`` and wait: the cold paths (state dicts, initialisation).
    ``bounds``: uneven slices (see [Note: whole parameters]), gathered by one broadcast per rank."""
    _count("all_gather", flat)
    if bounds is not None:
        wait_all([_all_gather_by_broadcasts(flat, shard, group=group, bounds=bounds)])
        return
    wait_all([_all_gather(flat, shard, group=group, async_op=True)])


# kept apart, so counting wrappers around the bucket path do not see them
_gather_flags = _gather_small = _all_gather
_broadcast_small = dist.broadcast


class FlagExchange:
    """Every rank's 1-D ``local`` (small integer flags) on its way to every rank; ``rows()`` waits for it."""

    def __init__(self, local: torch.Tensor, group: ProcessGroup | None) -> None:
        self.world = dist.get_world_size(group)
        self.gathered = local.new_empty(self.world * local.numel())
        _count("flags", self.gathered)  # control, not model bytes: counted apart
        self.work = _gather_flags(self.gathered, local, group=group, async_op=True)

    def rows(self, what: str = "") -> torch.Tensor:
        """The (world, n) flags on the host (one wait and one host read)."""
        wait_all([self.work], what)
        return self.gathered.view(self.world, -1).cpu()


def exchange_flags(local: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Every rank's 1-D ``local`` (small integer flags), as a (world, n) tensor on the host: one all-gather
    and one host read, the step's only ones (see ``ZeroEngine.reduce_gradients``)."""
    return FlagExchange(local, group).rows()


def host_group(group: ProcessGroup | None) -> ProcessGroup | None:
    """``group`` where it is gloo, else a gloo group over its ranks (a collective: every rank): small host
    flags exchanged there need no device synchronisation."""
    return group if dist.get_backend(group) == "gloo" else _same_ranks(group, backend="gloo")
