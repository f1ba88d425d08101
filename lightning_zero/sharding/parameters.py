"""Stage 3: parameters live as this rank's slice between uses and are all-gathered just in time.

[Note: stable full buffers]
Every bucket keeps one full flat buffer for its whole life. Releasing a bucket shrinks the buffer's
storage to zero bytes (``untyped_storage().resize_(0)``) and gathering grows it back and all-gathers into
it, so views of it that autograd saved for backward see valid values again once the bucket is gathered
before that backward. The parameters themselves point at the buffer only while gathered; released, each
is an empty tensor (``numel() == 0``), so touching one outside a forward, a backward or
``gathered_parameters`` gives an empty tensor or a shape error, never stale memory.

Each gather unit (see ``module_units``) gathers the buckets of every parameter in its subtree (tied ones
included) in a forward pre-hook and releases them after its forward; a hook on its outputs gathers them
again before its backward. A bucket is released in backward once its gradients are handed to the
reduce-scatter, and everything still gathered is released when backward ends. Parameters that the root
owns itself (no unit holds them) stay gathered.

[Note: persistent parameters]
Each unit costs an all-gather in forward and another in backward, and on gloo a small collective costs
about as much as a large one (0.2 ms median, with a tail of 4 ms wake-ups on this repository's 2-core
benchmark machine). So the smallest units, up to ``persist_numel`` elements in all, are not units: their
parameters join the root's, in one bucket that stays gathered and is refreshed by one all-gather after each
step, as DeepSpeed's ``stage3_param_persistence_threshold`` keeps small parameters. Their gradients are
still reduce-scattered and their optimizer state still sharded; the memory cost is the full copy of at most
``persist_numel`` elements per rank instead of a 1/N slice.

[Note: agreed gathers]
A unit's all-gather is a collective, so every rank must gather the same units in the same order. Training
steps are equal in number on every rank, and each unit's forward is announced (see [Note: unit announcements]).
Evaluation loops are not: the last batch, or generation of different lengths, gives ranks different
numbers of forward calls. So in an evaluation loop every unit's forward first agrees with the other ranks:
one all-gather of two integers per rank (the unit, and how many units this rank has open around it) and
one host read. A rank whose loop is done keeps taking part ("serving", as ``torch.distributed.algorithms.Join``
does for DDP) by announcing that it is done and mirroring the unit the others announced, with the same
gather, prefetch and release calls, until every rank is done. Ranks that announce different units raise
together, naming them, instead of pairing one module's gather with another's. Prefetch follows the unit
that came after the announced one the last time (registration order at first): a function of the agreed
history, so every rank prefetches alike.

[Note: unit announcements]
Training forwards are equal in number on every rank, but which units a forward runs may still depend on
the rank or the data (a head per task, an early exit, routing). A gather of one module paired with another
module's aborts inside gloo ("Received data size doesn't match"), hangs on NCCL, or, for equal sizes,
silently mixes weights. So in training every unit's forward announces (code, call number) to the other
ranks, where code is the unit's position + 1 (0: "my forward is over"; negative: a backward gather, with
``check_gathers``): a 2-integer all-gather on a gloo group over host memory, started and not waited for.
The rule that keeps every collective paired is: a rank starts a collective the others might not start only
after it has waited for every announcement so far and found them equal. So:
- a unit whose buckets were prefetched (the common case) waits for nothing before computing; its
  announcement is checked in its post-forward hook, where it has long arrived, and only then is the unit
  after next prefetched (a function of the checked history, so every rank starts the same gathers);
- a unit that must gather (a prefetch miss, a first step) waits for its announcement first;
- the first backward hook, gradient launch or optimizer step announces "forward over" and waits, so a rank
  that ends its forward early pairs that with the other ranks' next unit instead of a gradient reduction;
  the Trainer and Fabric strategies also announce it at the start of every backward
  (``ZeroEngine.begin_backward``), which every rank reaches, so a forward that ran no unit at all is caught.
Ranks that announced differently raise together, naming each rank's module (or that its forward ended) and
the fix, before any gather pairs different modules and before any weight changes. The cost is one small
collective per unit forward, off the critical path when the prefetch hits, and one wait per backward.
``check_gathers`` also announces every backward gather and waits for each announcement at once: a debugging
aid for a backward that differs between ranks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

from lightning_zero.sharding.bucket import FlatBucket, ParamState
from lightning_zero.sharding.collectives import Comm, FlagExchange, exchange_flags, host_group
from lightning_zero.sharding.init import pending_chunks
from lightning_zero.sharding.layout import ByModule

__all__ = ["ParameterSharder", "UnitDivergenceError", "module_units"]


class UnitDivergenceError(RuntimeError):
    """Ranks ran different modules at the same point under stage 3 (see [Note: agreed gathers])."""


def module_units(module: torch.nn.Module, unit_numel: int = 0, persist_numel: int | None = 0) -> tuple[str, ...]:
    """Stage 3's gather units: one all-gather each in forward and in backward.

    A module with weights of its own is a unit with its whole subtree, which covers modules that use a
    child's weights without calling it (``MultiheadAttention`` reads ``out_proj.weight`` directly). Modules
    without weights of their own are opened up (a LightningModule's ``self.model``, ``ModuleList``), except
    that one holding at most ``unit_numel`` elements and no stack of blocks (a ``ModuleList``, ``ModuleDict``
    or ``Sequential`` of two or more modules with weights but none of their own) is kept whole: a
    transformer block, not the stack of them. Fewer, larger all-gathers.

    Then the smallest units, up to ``persist_numel`` elements in all (``None``: the smaller of 2**17 and
    1/64 of the module's elements), are left out: their parameters join the ones the root owns, which stay
    gathered on every rank. An embedding or a final norm then costs no collective per use (see
    [Note: persistent parameters]).
    """
    units = _units(module, unit_numel, "")
    if persist_numel is None:
        persist_numel = min(2**17, _numel(module.parameters()) // 64)
    grouping = ByModule(tuple(units))
    owner = {param: grouping.unit_of(fqn) for fqn, param in module.named_parameters()}  # by its first name
    own = {unit: _numel(p for p, u in owner.items() if u == unit) for unit in units}
    # A unit can stay gathered only with every unit whose weights it uses (a tied output layer with its
    # embedding), else nothing would gather those weights for its forward.
    uses = {unit: {owner[p] for p in module.get_submodule(unit).parameters()} - {unit, ""} for unit in units}
    persistent: set[str] = set()
    total, grew = 0, True
    while grew:
        grew = False
        for unit in sorted(units, key=own.__getitem__):  # stable: equal sizes keep forward order
            if unit in persistent or not uses[unit] <= persistent:
                continue
            if total + own[unit] > persist_numel:
                break
            total += own[unit]
            persistent.add(unit)
            grew = True
    return tuple(unit for unit in units if unit not in persistent)


def _numel(params: Iterable[torch.nn.Parameter]) -> int:
    """Elements of ``params`` as built (a parameter built sharded counts whole), each tied one once."""
    return sum(pending_chunks[p].numel if p in pending_chunks else p.numel() for p in set(params))


def _owns(module: torch.nn.Module) -> bool:
    return any(p is not None for p in module._parameters.values())


def _is_stack(module: torch.nn.Module) -> bool:
    """A ``ModuleList``, ``ModuleDict`` or ``Sequential`` of two or more blocks: children with weights, none
    of them their own (a ``Sequential`` of ``Linear`` layers, an MLP, is not a stack)."""
    containers = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)
    blocks = [c for c in module.children() if not _owns(c) and any(True for _ in c.parameters())]
    return isinstance(module, containers) and len(blocks) >= 2


def _units(module: torch.nn.Module, unit_numel: int, prefix: str) -> list[str]:
    units: list[str] = []
    for name, child in module.named_children():
        fqn = f"{prefix}{name}"
        params = list(child.parameters())
        container = isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict))
        stack = any(_is_stack(m) for m in child.modules())
        if not _owns(child) and any(True for _ in child.children()) and (
            container or stack or _numel(params) > unit_numel
        ):
            units.extend(_units(child, unit_numel, prefix=f"{fqn}."))
        elif params:
            units.append(fqn)
    return units


def _tensors_in(output: object, depth: int = 3) -> list[torch.Tensor]:
    """The tensors of a unit's output: pytree containers (tuples, lists, dicts, HF ``ModelOutput``), and
    the fields of dataclasses and plain objects up to ``depth`` levels down."""
    found = []
    for leaf in tree_leaves(output):
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        elif depth > 0 and leaf is not None and not isinstance(leaf, (str, bytes, int, float, bool, torch.nn.Module)):
            fields = vars(leaf) if hasattr(leaf, "__dict__") else {}
            if dataclasses.is_dataclass(leaf):
                fields = {f.name: getattr(leaf, f.name, None) for f in dataclasses.fields(leaf)}
            if fields:
                found.extend(_tensors_in(list(fields.values()), depth - 1))
    return found


class ParameterSharder:
    """Decides when stage 3's buckets gather and release, around each unit's forward and backward."""

    def __init__(self, module: torch.nn.Module, units: Sequence[str], buckets: Sequence[FlatBucket],
                 comm: Comm, check_gathers: bool = False) -> None:
        self.buckets = buckets  # indexed by bucket index; every bucket is flat under stage 3
        self.comm = comm
        self.check_gathers = check_gathers
        # See [Note: unit announcements]: the announcements on their way, whether this forward is settled,
        # and the group they travel on (host memory: no device synchronisation).
        self._announced: list[FlagExchange] = []
        self._settled = True
        self.announcements = 0
        self._host_group = host_group(comm.group)
        # See [Note: agreed gathers]: inside an evaluation loop, the units open on this rank (innermost last),
        # the unit that followed each one last time, and how many agreements were made.
        self.evaluating = False
        self._open: list[int] = []
        self._next_unit: dict[int, int] = {p: p + 1 for p in range(len(units) - 1)}
        self._last_agreed = -1
        self.agreements = 0
        self.gather_count = 0
        self.prefetch_count = 0  # gathers started ahead of their unit
        # [Note: prefetch] A unit's forward starts the all-gather of the unit that came next in the
        # previous forward, and a unit's backward that of the unit before it, so communication overlaps
        # compute. The order is recorded per rank, and equal across ranks because every unit's forward is
        # announced (see [Note: unit announcements]), so every rank starts the same gathers in the same order.
        self._previous_order: list[tuple[int, ...]] = []
        self._order: list[tuple[int, ...]] = []
        self._last_position: dict[tuple[int, ...], int] = {}
        self.units = tuple(units)
        self.hold_all = False  # inside a no-grad loop: everything stays gathered
        self._callback_queued = False
        self._handles: list[RemovableHandle] = []
        bucket_of = {id(bucket.params[i]): bucket.index for bucket in buckets for i in range(len(bucket.params))}
        self._needed: list[list[int]] = []
        self._unit_numel: list[int] = []
        for position, unit in enumerate(units):
            sub = module.get_submodule(unit)
            needed = sorted({bucket_of[id(p)] for _, p in sub.named_parameters(remove_duplicate=False)})
            self._needed.append(needed)
            self._unit_numel.append(_numel(sub.parameters()))
            self._hook(sub, position, needed)
        for bucket in buckets:
            bucket.reshard()
        self.refresh_persistent()

    @property
    def persistent(self) -> set[int]:
        """Buckets that stay gathered: the parameters no unit owns (see [Note: persistent parameters])."""
        return {bucket.index for bucket in self.buckets if bucket.persistent}

    @property
    def gathered(self) -> set[int]:
        """Buckets whose full buffer exists (gathered or on its way), persistent ones included."""
        return {b.index for b in self.buckets if b.param_state is not ParamState.SHARDED}

    def _hook(self, module: torch.nn.Module, position: int, needed: list[int]) -> None:
        self._handles.append(module.register_forward_pre_hook(self._pre_forward(position, needed)))
        self._handles.append(module.register_forward_hook(self._post_forward(position, needed)))

    # ------------------------------------------------------------------ gather / release
    def _start(self, buckets: Iterable[int], exact: bool = False) -> None:
        for index in buckets:
            if self.buckets[index].unshard(self.comm, exact):
                self.gather_count += 1

    def gather(self, buckets: Iterable[int], exact: bool = False) -> None:
        """Make ``buckets`` whole on this rank (a collective over the missing ones). ``exact``: for values
        read or kept rather than computed with, never rounded by ``quantize_gathers``."""
        buckets = list(buckets)
        self._start(buckets, exact)
        for index in buckets:
            self.buckets[index].wait_unshard()

    def prefetch(self, buckets: Iterable[int]) -> None:
        """Start gathering ``buckets`` without waiting (see [Note: prefetch])."""
        before = self.gather_count
        self._start(buckets)
        self.prefetch_count += self.gather_count - before

    def release(self, buckets: Iterable[int]) -> None:
        """Drop the full copies of ``buckets``; only this rank's slices stay."""
        if self.hold_all:
            return
        for index in buckets:
            self.buckets[index].reshard()

    def release_bucket(self, bucket: FlatBucket) -> None:
        """Release one bucket (its gradients have just been handed to the reduce-scatter)."""
        if not self.hold_all:
            bucket.reshard()

    def after_step(self) -> None:
        """The slices changed: full copies still held (a forward whose backward never ran, a no-grad loop's)
        are stale. Drop them, or gather them again inside a no-grad loop, and refresh the persistent ones."""
        stale = sorted(self.gathered - self.persistent)
        for index in stale:
            self.buckets[index].reshard()
        self.refresh_persistent()
        if self.hold_all:
            self.gather(stale)

    def refresh_persistent(self, buckets: Iterable[int] | None = None) -> None:
        """Re-gather the always-gathered ``buckets`` (default: all) after their slices changed (a step, a
        load)."""
        chosen = sorted(self.persistent if buckets is None else buckets)
        for handle in [self.buckets[i].refresh(self.comm) for i in chosen]:
            handle.wait()

    def gather_all(self) -> None:
        """Whole model on every rank until ``release_all`` (no-grad loops: one gather for the loop, so
        ranks that run different numbers of forward calls never wait on each other)."""
        self.gather(range(len(self.buckets)), exact=True)
        self.hold_all = True

    def release_all(self) -> None:
        """Back to slices only."""
        self.hold_all = False
        self.release(range(len(self.buckets)))

    # ------------------------------------------------------------------ hooks
    def _pre_forward(self, position: int, needed: list[int]):  # noqa: ANN202 - closures for nn.Module hooks
        key = tuple(needed)

        def hook(module: torch.nn.Module, args: object) -> None:
            if self.evaluating:
                if torch.is_grad_enabled():
                    raise RuntimeError(
                        f"a forward of {self.units[position]!r} with gradients enabled inside a ZeRO stage 3 "
                        "evaluation loop: its backward would find the unit released. Evaluate under "
                        "torch.no_grad() (the Trainer does), or use eval_gather='whole' for loops that backpropagate")
                self._open_agreed(self._agree(position, len(self._open)))
                return
            if self.hold_all:
                self.gather(needed)  # already whole: no collective
                return
            self._announce(position + 1)
            missing = any(self.buckets[i].param_state is ParamState.SHARDED for i in needed)
            if missing or self.check_gathers:
                self._verify()  # before this rank starts a gather the others may not
            self.gather(needed)
            self._last_position[key] = len(self._order)
            self._order.append(key)
            if missing:
                self._prefetch_ahead(0)

        return hook

    def _post_forward(self, position: int, needed: list[int]):  # noqa: ANN202
        frozen = [index for index in needed if not self.buckets[index].trainable and not self.buckets[index].persistent]

        def hook(module: torch.nn.Module, args: object, output: object) -> None:
            if self.evaluating:
                self._close_innermost()
                return
            if not self.hold_all:
                self._verify()  # this unit's announcement, long since arrived: no wait in practice
            backward_follows = False
            if torch.is_grad_enabled():
                for tensor in _tensors_in(output):
                    if tensor.grad_fn is not None:  # made by this forward (not a parameter passed through)
                        tensor.register_hook(self._pre_backward(position, needed))
                        backward_follows = True
                if backward_follows and frozen:
                    self._release_after_backward(args, frozen)
                if not backward_follows and any(p.requires_grad for p in module.parameters()):
                    # An output this hook cannot look into (an object of its own class) may still lead
                    # backward into this unit: it stays gathered until the end of backward or the step.
                    return
            # [Note: keep the last unit] The unit that ended the previous forward is the first that backward
            # needs: it stays gathered, one all-gather fewer per step (FSDP2 does not reshard its root either).
            if not (backward_follows and len(self._order) == len(self._previous_order) and not self.hold_all):
                self.release(needed)
            if not self.hold_all:
                self._prefetch_ahead(1)

        return hook

    def _pre_backward(self, position: int, needed: list[int]):  # noqa: ANN202
        key = tuple(needed)

        def hook(grad: torch.Tensor) -> None:
            if not self._callback_queued:
                self._callback_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self.settle()
            if self.check_gathers:
                self._announce(-position - 1)
                self._verify()
            self.gather(needed)
            called = self._last_position.get(key, 0)
            if called > 0:
                self.prefetch(self._order[called - 1])

        return hook

    # ------------------------------------------------------------------ announcements
    def _announce(self, code: int) -> None:
        """Start telling the other ranks what this rank does next (see [Note: unit announcements])."""
        mine = torch.tensor([code, len(self._order)], dtype=torch.int64)
        self._announced.append(FlagExchange(mine, self._host_group))
        self.announcements += 1
        if code > 0:
            self._settled = False

    def _verify(self) -> None:
        """Wait for the announcements on their way; raise on every rank if the ranks announced different
        things."""
        announced, self._announced = self._announced, []
        for exchange in announced:
            rows = [tuple(row) for row in exchange.rows("the other ranks' next stage 3 unit").tolist()]
            if len(set(rows)) > 1:
                raise self._divergence(rows)

    def settle(self, always: bool = False) -> None:
        """This rank's forward is over (a backward or an optimizer step begins): agree on that with the
        other ranks before any collective of the backward or step. Once per forward, or ``always`` (at a
        point every rank reaches, such as the start of each backward: a forward that ran no unit then still
        pairs with the other ranks' next announcement). A collective."""
        if (always or not self._settled) and not self.hold_all and not self.evaluating:
            self._announce(0)
            self._verify()
            self._settled = True

    def _prefetch_ahead(self, distance: int) -> None:
        """Start gathering the unit ``distance`` after the next one in the previous forward's order."""
        ahead = len(self._order) + distance
        if ahead < len(self._previous_order):
            self.prefetch(self._previous_order[ahead])

    def _release_after_backward(self, inputs: object, frozen: list[int]) -> None:
        """[Note: frozen units] Frozen buckets get no gradient, so the reducer never releases them: release
        them once the gradients of the unit's inputs are computed, which is when its backward is done (as
        DeepSpeed's post-backward module hook does). A unit whose inputs need no gradient (the first one
        behind a frozen embedding) keeps them until the end of backward."""
        leaves = [t for t in _tensors_in(inputs) if t.requires_grad]
        if leaves:
            torch.autograd.graph.register_multi_grad_hook(leaves, lambda _: self.release(frozen))

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        self.release(range(len(self.buckets)))
        self._previous_order, self._order = self._order, []
        self._last_position.clear()

    # ------------------------------------------------------------------ evaluation loops
    def begin_evaluation(self) -> None:
        """An evaluation loop starts: every unit's forward agrees with the other ranks first, so ranks may run
        different numbers of forward calls (see [Note: agreed gathers])."""
        self.evaluating = True
        self._open.clear()
        self._last_agreed = -1

    def finish_evaluation(self) -> None:
        """This rank's evaluation loop is done: serve the other ranks' gathers until every rank is done, then
        release everything. A collective; a no-op outside an evaluation loop."""
        if not self.evaluating:
            return
        try:
            while (agreed := self._agree(-1, 0)) is not None:
                # Held until the next agreement closes it, as the rank that computes with it holds it
                # until its forward ends: both then make the same gathers.
                self._open_agreed(agreed)
        finally:
            self.evaluating = False
            self._open.clear()
            self.release(range(len(self.buckets)))

    def _agree(self, position: int, depth: int) -> tuple[int, int] | None:
        """Every rank's next unit (``position``, -1 when done) and nesting depth; the one the ranks still
        running agree on, or None when every rank is done. Raises on every rank when they disagree."""
        device = self.buckets[0].flat.device if self.buckets else torch.device("cpu")
        mine = torch.tensor([position + 1, depth], dtype=torch.int64, device=device)
        rows = [tuple(row) for row in exchange_flags(mine, self.comm.group).tolist()]
        self.agreements += 1
        wanted = sorted({row for row in rows if row[0] > 0})
        if not wanted:
            return None
        if len(wanted) > 1:
            raise self._divergence(rows)
        return wanted[0][0] - 1, wanted[0][1]

    def _open_agreed(self, agreed: tuple[int, int] | None) -> None:
        """Gather the agreed unit (after closing the units this rank holds open beyond its depth), and start
        gathering the one that followed it last time."""
        assert agreed is not None
        position, depth = agreed
        while len(self._open) > depth:
            self._close_innermost()
        self.gather(self._needed[position])
        self._open.append(position)
        if depth > 0:
            return  # nested inside another unit's forward: no successor learnt, nothing prefetched
        if self._last_agreed >= 0:
            self._next_unit[self._last_agreed] = position
        self._last_agreed = position
        following = self._next_unit.get(position)
        if following is not None:
            self.prefetch(self._needed[following])

    def _close_innermost(self) -> None:
        if self._open:
            self.release(self._needed[self._open.pop()])

    def _divergence(self, rows: list[tuple[int, ...]]) -> UnitDivergenceError:
        def unit(position: int) -> str:
            return f"'{self.units[position]}' ({self._unit_numel[position]} elements)"

        def said(row: tuple[int, ...]) -> str:
            code, calls = row
            if self.evaluating:
                return f"was about to run {unit(code - 1)}" if code else "had nothing to run (its loop was done)"
            if code > 0:
                return f"was about to run {unit(code - 1)} as unit call {calls + 1} of its forward"
            if code < 0:
                return f"was about to gather {unit(-code - 1)} for its backward"
            return f"had ended its forward after {calls} unit call{'' if calls == 1 else 's'}"

        ranks = "; ".join(f"rank {rank} {said(row)}" for rank, row in enumerate(rows))
        where = "an evaluation loop" if self.evaluating else "training"
        fix = ("ZeroStrategy(eval_gather='whole') gathers the whole model once per evaluation loop, so any "
               "rank may run any module there" if self.evaluating else
               "run every module on every rank (compute every head and mask or select the output), or use zero1/zero2, "
               "which allow it")
        return UnitDivergenceError(
            f"ZeRO stage 3 needs every rank to run the same modules in the same order, but in {where} {ranks}. "
            f"No gather was paired across different modules and no weight was updated. Fix: {fix}."
        )

    def remove_hooks(self) -> None:
        """Stop gathering on forward (the module is whole again, or being torn down)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
