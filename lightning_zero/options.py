"""What the Trainer's ``ZeroStrategy`` and Fabric's ``ZeroFabricStrategy`` share: one option set, validated
once, its documentation, the registered names, the precision pairing and DDP's buffer rule."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

from lightning_zero.config import ReducePolicyName, ShardSize, ZeroConfig
from lightning_zero.precision import ZeroPrecisionCore
from lightning_zero.sharding.collectives import CollectiveError, broadcast_coalesced, broadcast_object, wait_all
from lightning_zero.sharding.whereabouts import publish

__all__ = ["OPTIONS_DOC", "BufferSync", "SharedStrategyMethods", "StrategyOptions", "zero_precision_from"]

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
_GENERIC_PLUGINS = ("Precision", "MixedPrecision", "HalfPrecision")
_START_METHODS = ("popen", "spawn", "fork", "forkserver")

OPTIONS_DOC = """stage: 1 shards optimizer state, 2 also gradients, 3 also parameters.
        reduce_policy: "boundary" reduces only on the micro-batch that steps (no collective before it,
            full local gradients held meanwhile); "every_micro_batch" reduce-scatters every micro-batch so
            stage 2 keeps gradient memory sharded; "auto" picks per stage (see docs/trainer.md).
        bucket_numel: elements per gradient bucket.
        allow_unknown_optimizer: vouch that an optimizer class we do not know is element-wise: it then steps
            slices instead of whole parameters.
        state_dict_type: "sharded" (default): a checkpoint is a directory in which each rank writes only its
            own slices, committed atomically; resumable on any world size and stage, by the Trainer and by
            Fabric alike, and ``lightning_zero.consolidate_checkpoint`` turns it into one plain file. "full":
            one plain file, gathered whole on rank 0 (small models, or tools that expect a file).
        nonfinite: a NaN or inf loss or gradient outside fp16 loss scaling "raise"s, naming the step and
            the ranks, or "skip"s the step on every rank; either way no weight takes that step.
        unit_numel: stage 3 only: a module without weights of its own (a transformer block) is gathered as
            one unit when it holds at most this many elements (default 2**24) and no stack of blocks.
        persist_numel: stage 3 only: the smallest units, up to this many elements in all, stay gathered
            instead of being gathered at each use (default ``None``: the smaller of 2**17 and 1/64 of the
            model; 0: none).
        eval_gather: stage 3 only: "unit" (default) gathers each unit around its forward in validation, test,
            predict and the sanity check, as training does, so evaluation holds no more of the model than
            training; ranks may run different numbers of forward calls (uneven last batches, generation of
            different lengths): each unit's forward agrees with the other ranks first (one all-gather of two
            integers per rank), and a rank that is done serves the others' gathers until every rank is. "whole"
            gathers the whole model once per loop: faster, but every rank holds the whole model.
        check_gathers: stage 3 only, for debugging: every unit's training forward, and every backward
            gather, waits for the other ranks' announcement of theirs before it runs, naming the first
            divergence. Without it, training forwards are still announced and checked across ranks, one unit
            later and off the critical path, so a module run on some ranks only is named either way.
        after_fit: stage 3 only: what the module holds when training ends (the end of ``fit``, Fabric's
            ``strategy.teardown()``). "whole" (default): whole weights (master precision) on every rank's device,
            as under ``ddp``. "sharded": only this rank's slices, as during training, so the whole model is never
            on one device: ``validate``/``test``/``predict`` after ``fit`` gather per unit, ``save_checkpoint``
            writes the shards, and ``strategy.gathered_parameters()`` or a consolidated checkpoint give whole
            weights. Needs ``start_method="popen"`` (the spawn launchers hand rank 0's weights to the parent).
        shard_size: ranks per sharding group (hybrid sharding). None (default): shard over every rank. An int S
            dividing the world size: groups of S consecutive ranks each shard the model and hold replicas of
            each other, so parameter gathers and gradient reduce-scatters stay inside a group (a node) and only
            each rank's gradient slice is all-reduced across groups; memory per rank is that of S ranks.
            "node": the processes of one node.
        quantize_gathers: stage 3 only: parameters are all-gathered for compute as int8 blocks of 256 with an
            fp32 scale each (ZeRO++'s qwZ), about a quarter of fp32's gather bytes; the weights each forward
            and backward uses are rounded by at most 1/254 of their block's largest magnitude, while masters,
            optimizer state and checkpoints stay exact. Off by default.
        offload: "optimizer" keeps each rank's master slices and optimizer state in CPU memory and steps the
            optimizer there (ZeRO-Offload); "none" (default) keeps everything on the device.
        broadcast_buffers: as DDP's ``broadcast_buffers``: every rank takes rank 0's buffers (BatchNorm
            running statistics) before a forward that follows a training forward, as DDP does, so ranks train
            and evaluate with the same ones (default True).
        timeout: how long collectives wait before failing, as for DDP; it also bounds how long a rank waits
            for one that hangs, and how long a checkpoint save waits for every rank to join.
        start_method: "popen" (subprocess, like ``ddp``), "spawn", "fork" (notebooks) or "forkserver"."""


@dataclass(frozen=True)
class StrategyOptions:
    """The options both strategies take, checked once: the engine's ``config`` and the strategy's own."""

    config: ZeroConfig
    state_dict_type: Literal["sharded", "full"]
    nonfinite: Literal["raise", "skip"]
    broadcast_buffers: bool
    timeout: timedelta | None
    start_method: Literal["popen", "spawn", "fork", "forkserver"]
    after_fit: Literal["whole", "sharded"] = "whole"

    @classmethod
    def build(
        cls,
        stage: int = 2,
        reduce_policy: ReducePolicyName = "auto",
        bucket_numel: int = 2**23,
        allow_unknown_optimizer: bool = False,
        state_dict_type: str = "sharded",
        nonfinite: str = "raise",
        unit_numel: int | None = None,
        persist_numel: int | None = None,
        offload: str = "none",
        broadcast_buffers: bool = True,
        timeout: timedelta | None = default_pg_timeout,
        start_method: str = "popen",
        eval_gather: str | None = None,
        check_gathers: bool = False,
        after_fit: str | None = None,
        shard_size: ShardSize = None,
        quantize_gathers: bool = False,
    ) -> StrategyOptions:
        """Validate every option, raising with the fix before any process starts."""
        if after_fit is not None and after_fit not in ("whole", "sharded"):
            raise ValueError(f"after_fit must be 'whole' or 'sharded', got {after_fit!r}")
        stage3_only = {
            "unit_numel": (unit_numel is not None, "sizes the modules stage 3 gathers together"),
            "persist_numel": (persist_numel is not None, "sizes the parameters stage 3 keeps gathered"),
            "eval_gather": (eval_gather is not None, "chooses how stage 3 gathers parameters in evaluation loops"),
            "check_gathers": (check_gathers is not False, "checks stage 3's parameter gathers"),
            "quantize_gathers": (quantize_gathers is not False, "quantizes stage 3's parameter gathers"),
            "after_fit": (after_fit is not None, "chooses what a stage 3 module holds after training"),
        }
        for name, (given, what) in stage3_only.items():
            if given and stage != 3:
                raise ValueError(f"{name} {what}; it does nothing under stage {stage}: drop it, or use stage=3")
        if after_fit == "sharded" and start_method != "popen":
            raise ValueError(f"after_fit='sharded' keeps the trained module sharded, but start_method={start_method!r} "
                             "hands rank 0's module to the parent process, which would get empty weights: use "
                             "start_method='popen' (or torchrun/SLURM), or after_fit='whole'")
        if timeout is not None and not isinstance(timeout, timedelta):
            raise TypeError(f"timeout must be a datetime.timedelta, e.g. timedelta(minutes=10), got {timeout!r}")
        if timeout is not None and timeout <= timedelta(0):
            raise ValueError(f"timeout must be positive (how long collectives wait before failing), got {timeout!r}; "
                             "use e.g. timedelta(minutes=10), or None for the default (30 minutes)")
        if start_method not in _START_METHODS:
            raise ValueError(f"start_method must be one of {_START_METHODS}, got {start_method!r}")
        config = ZeroConfig(
            stage=stage, bucket_numel=bucket_numel, reduce_policy=reduce_policy,
            allow_unknown_optimizer=allow_unknown_optimizer, offload=offload,  # type: ignore[arg-type]
            **({"unit_numel": unit_numel} if unit_numel is not None else {}),
            persist_numel=persist_numel, eval_gather=eval_gather or "unit",  # type: ignore[arg-type]
            check_gathers=check_gathers, shard_size=shard_size, quantize_gathers=quantize_gathers,
        )
        if state_dict_type not in ("sharded", "full"):
            raise ValueError(f"state_dict_type must be 'sharded' or 'full', got {state_dict_type!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if not isinstance(broadcast_buffers, bool):
            raise TypeError(f"broadcast_buffers must be True or False, got {broadcast_buffers!r}")
        return cls(config, state_dict_type, nonfinite, broadcast_buffers, timeout,  # type: ignore[arg-type]
                   start_method, after_fit or "whole")  # type: ignore[arg-type]


def registry_entries() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """The registered names, as (name, description, keyword arguments), for the Trainer's and Fabric's
    strategy registries alike."""
    for stage in (1, 2, 3):
        for suffix, start_method in (("", "popen"), ("_spawn", "spawn"), ("_notebook", "fork")):
            yield (f"zero{stage}{suffix}", f"ZeRO stage {stage} with start_method '{start_method}'",
                   {"stage": stage, "start_method": start_method})
        yield (f"zero{stage}_offload", f"ZeRO stage {stage} with optimizer state and fp32 masters offloaded to CPU",
               {"stage": stage, "offload": "optimizer"})


P = TypeVar("P", bound=ZeroPrecisionCore)


def zero_precision_from(plugin: Any, zero_class: type[P], strategy: str) -> P | None:
    """The ZeRO precision for ``plugin``: Lightning and Fabric hand a third-party strategy their generic
    plugin (autocast ``MixedPrecision`` for "bf16-mixed"), converted here by its precision string."""
    if plugin is None or isinstance(plugin, zero_class):
        return plugin
    name = getattr(plugin, "precision", None)
    if isinstance(plugin, ZeroPrecisionCore):
        raise ValueError(f"{strategy} pairs with {zero_class.__name__}, not {type(plugin).__name__}: pass "
                         f"{zero_class.__name__}({name!r}, ...) with the same arguments, or just precision={name!r}")
    if type(plugin).__name__ not in _GENERIC_PLUGINS or name not in PRECISIONS:
        raise ValueError(
            f"{strategy} cannot run {type(plugin).__name__} (precision {name!r}); use precision= one of "
            f"{', '.join(PRECISIONS)}, or plugins=[lightning_zero.{zero_class.__name__}(...)]"
        )
    return zero_class(name)


class BufferSync:
    """DDP's buffer rule ([Note: buffers as under ddp]): rank 0's buffers are broadcast at the start of a
    forward when the forward before it ran with gradients and with gradient sync."""

    def __init__(self, enabled: bool, world_size: int) -> None:
        self.enabled = enabled and world_size > 1
        self.due = True  # as a fresh DDP wrapper: the first forward takes rank 0's buffers
        self.blocking = False  # inside a no-sync micro-batch

    def before(self, module: torch.nn.Module | None) -> None:
        """Broadcast ``module``'s buffers from rank 0 if due (a collective on every rank)."""
        if self.due and self.enabled and module is not None:
            buffers = list(module.buffers())
            if buffers:
                broadcast_coalesced(buffers, None)

    def after(self, training: bool) -> None:
        """Record whether the forward that just ran makes the next one due."""
        self.due = training and torch.is_grad_enabled() and not self.blocking


class SharedStrategyMethods:
    """Methods the Trainer's and Fabric's strategies share word for word; mixed in before Lightning's
    ``DDPStrategy`` of each."""

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, description, kwargs in registry_entries():
            strategy_registry.register(name, cls, description=description, **kwargs)

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        """As ``ddp``'s, but on gloo the barrier's handle stays with Python: a barrier is often a process's last
        collective (see [Note: keep finished work handles])."""
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
            wait_all([dist.barrier(async_op=True)], what="a barrier (strategy.barrier)")
        else:
            super().barrier(*args, **kwargs)  # type: ignore[misc]

    # Lightning's own collectives for users (self.log(sync_dist=True), strategy/fabric.broadcast, reduce and
    # all_gather), as ddp's but with their handles kept (see [Note: keep finished work handles]): such a
    # collective is often a script's last, and gloo would otherwise abort the exiting process now and then.

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """As ``ddp``'s: rank ``src``'s picklable ``obj`` on every rank."""
        if not (dist.is_available() and dist.is_initialized()):
            return obj
        return broadcast_object(obj, src, None, what=f"rank {src}'s object (strategy.broadcast)")

    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: dist.ReduceOp | str | None = "mean") -> Any:
        """As ``ddp``'s: ``tensor`` reduced in place across ranks ("mean" by default); other values unchanged."""
        if not (isinstance(tensor, torch.Tensor) and dist.is_available() and dist.is_initialized()):
            return tensor
        op, divide = _reduce_op(reduce_op, group)
        wait_all([dist.all_reduce(tensor, op=op, group=group, async_op=True)], what="a reduction (strategy.reduce)")
        if not divide:
            return tensor
        world = dist.get_world_size(group)
        return tensor.div_(world) if torch.is_floating_point(tensor) else tensor.copy_(tensor / world)

    all_reduce = reduce  # Fabric's name for it

    def all_gather(self, tensor: torch.Tensor, group: Any | None = None, sync_grads: bool = False) -> torch.Tensor:
        """As ``ddp``'s: every rank's ``tensor`` stacked along a new first dimension."""
        if sync_grads or not (dist.is_available() and dist.is_initialized()):
            return super().all_gather(tensor, group=group, sync_grads=sync_grads)  # type: ignore[misc]
        tensor = tensor.contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        wait_all([dist.all_gather(gathered, tensor, group=group, async_op=True)],
                 what="an all-gather (strategy.all_gather)")
        return torch.stack(gathered)

    def _joined(self) -> None:
        """Once the process group is up: checkpoint coordination (monitored barrier, small objects) gets a
        gloo group whatever the backend, and rank 0 of a subprocess launcher guards its child ranks."""
        timeout = self._timeout  # type: ignore[attr-defined]
        gloo = dist.get_backend() == "gloo"
        self._checkpoint_group = None if gloo else dist.new_group(backend="gloo", timeout=timeout)
        guard_child_ranks(self._launcher)  # type: ignore[attr-defined]


def _reduce_op(reduce_op: dist.ReduceOp | str | None, group: Any | None) -> tuple[dist.ReduceOp, bool]:
    """Lightning's reading of ``reduce_op`` ("mean"/"avg", "sum", ... or a ``ReduceOp``; None is a sum), and
    whether the sum is then divided by the world size (gloo has no ``AVG``)."""
    if not isinstance(reduce_op, str):
        return (dist.ReduceOp.SUM if reduce_op is None else reduce_op), False
    name = "avg" if reduce_op.lower() == "mean" else reduce_op.lower()
    if name == "avg" and dist.get_backend(group) == "gloo":
        return dist.ReduceOp.SUM, True
    return getattr(dist.ReduceOp, name.upper()), False


# [Note: no orphan ranks]
# Under Lightning's subprocess launcher, rank 0 is the parent of the other ranks. Lightning kills them on
# Ctrl+C only, and its observer ends rank 0 when a child fails, not the other way round: a rank 0 that
# fails leaves the children blocked in a collective (until its timeout) or stuck in a stalled file write.
# So rank 0 ends them: the Trainer's strategy in ``on_exception`` (a failed fit), and, for an exception that
# ends rank 0's process anywhere else (a save after fit, a Fabric script), a ``sys.excepthook`` that runs
# after the traceback is printed. Either way the children get ``CHILD_GRACE_S`` to exit on their own (a
# rank that failed first prints its own error) before they are killed. An exception the user catches ends
# nothing: the run goes on.
CHILD_GRACE_S = 2.0


def end_child_ranks(procs: list[subprocess.Popen]) -> None:
    """Let ``procs`` exit within ``CHILD_GRACE_S``, then kill those still running."""
    deadline = time.monotonic() + CHILD_GRACE_S
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)


def guard_child_ranks(launcher: Any) -> None:
    """Rank 0 of a subprocess launcher: an uncaught exception that ends this process ends the child ranks
    too (see [Note: no orphan ranks]). Installed once per process."""
    if not getattr(launcher, "procs", None) or getattr(sys.excepthook, "lightning_zero", False):
        return
    previous = sys.excepthook

    def end_children_too(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        previous(kind, error, traceback)
        publish(None if isinstance(error, CollectiveError) else error)  # for ranks still waiting on this one
        end_child_ranks(launcher.procs)

    end_children_too.lightning_zero = True  # type: ignore[attr-defined]
    sys.excepthook = end_children_too
