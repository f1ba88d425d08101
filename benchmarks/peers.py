"""lightning-zero side by side with what users would run instead: torch DDP (what Lightning ``ddp`` runs),
DDP + ``ZeroRedundancyOptimizer``, FSDP1, FSDP2 and DeepSpeed, on GPT-style models of about 5M, 20M and 80M
parameters, AdamW in fp32 on gloo.

    python benchmarks/peers.py                                  # the full run (about 17 minutes on 2 cores)
    python benchmarks/peers.py --sizes 5M --repeats 1 --steps 3  # a quick look
    python benchmarks/peers.py --speed 80M:1 --memory --systems zero1 zero2 zero3 fsdp1_full_shard \
        fsdp1_shard_grad_op fsdp2_reshard deepspeed2 --repeats 3 --steps 3 --name peers_80m_speed

Speed (world size 2, each rank pinned to its own core, one thread): every repeat runs every system once, in
turn (the order rotated by one each repeat), on the same per-rank batches; a system's time is the median
optimizer step (all micro-batches of the window) of its run, and its ratio is the median over repeats of
(its time / torch DDP's time in the same repeat and accumulation).

Memory and communication (world sizes 2 and 4; 4 ranks on 2 cores share them): every system runs in a
fresh process per rank (forked from a server that imported torch once), so VmHWM is its own peak RSS. One
warm-up step, then one measured step:
- model-state bytes per rank right after the measured optimizer step (before ``zero_grad``), and their high
  point (also sampled after every backward of the window): lightning_zero by ``model_state_bytes``; the
  peers by walking every tensor reachable from the wrapped module and the optimizer (attributes,
  containers, hook closures; DTensor shards; DeepSpeed's ``ds_tensor``; DDP's bucket buffers, which live
  in C++ and are caught by a comm hook) and counting each storage once;
- communication: logical bytes of the measured window, counted as the ZeRO paper does (all-reduce 2n,
  reduce-scatter and all-gather the full buffer n, broadcast n) by wrapping the ``torch.distributed``
  collectives; DDP's C++ all-reduce is routed through the stock ``allreduce_hook`` so it is seen. For
  lightning_zero the engine's own ``collectives.traffic`` (the counted wrappers must agree: checked).
  On the wire gloo's own reduce-scatter (FSDP's) is an all-reduce plus a chunk, so it really moves 2n there;
  lightning_zero's sends move n.
Writes benchmarks/results/peers.json, peers.md and peers.png (``--name`` for another name).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import importlib.util
import inspect
import json
import logging
import os
import statistics
import sys
import threading
import time
import types
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
from harness import run_pinned  # noqa: E402

#: name -> (width, depth, heads); the example GPT (tied embeddings, 64-token block, 128-token vocabulary).
SIZES: dict[str, tuple[int, int, int]] = {"5M": (384, 3, 6), "20M": (512, 6, 8), "80M": (1152, 5, 18)}
ZERO = ("zero1", "zero2", "zero3")
PEERS = ("ddp_zero_redundancy", "fsdp1_full_shard", "fsdp1_shard_grad_op", "fsdp2_reshard", "fsdp2_no_reshard",
         "deepspeed1", "deepspeed2", "deepspeed3")
LIGHTNING = ("lightning_ddp", "lightning_zero2")  # speed only: the Trainer's overhead on top of the engine
SYSTEMS = ("ddp", *ZERO, *PEERS, *LIGHTNING)
POLICIES = ("boundary", "every_micro_batch")
LABELS = {
    "ddp": "torch DDP", "zero1": "zero1", "zero2": "zero2", "zero3": "zero3",
    "ddp_zero_redundancy": "DDP + ZeroRedundancyOptimizer", "fsdp1_full_shard": "FSDP1 FULL_SHARD",
    "fsdp1_shard_grad_op": "FSDP1 SHARD_GRAD_OP", "fsdp2_reshard": "FSDP2 reshard_after_forward=True",
    "fsdp2_no_reshard": "FSDP2 reshard_after_forward=False", "deepspeed1": "DeepSpeed stage 1",
    "deepspeed2": "DeepSpeed stage 2", "deepspeed3": "DeepSpeed stage 3",
    "lightning_ddp": "Lightning Trainer ddp", "lightning_zero2": "Lightning Trainer zero2",
}
#: The row of ../shared/DESIGN.md's table each system is held to (what it keeps sharded between steps).
FORMULA_STAGE = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "ddp_zero_redundancy": 1, "fsdp1_full_shard": 3,
                 "fsdp1_shard_grad_op": 3, "fsdp2_reshard": 3, "fsdp2_no_reshard": 3, "deepspeed1": 1,
                 "deepspeed2": 2, "deepspeed3": 3}
LR = 1e-3
#: What the full run measures (about 17 minutes on 2 cores): speed at 5M and 20M, memory and
#: communication at all three sizes (80M at accumulate 1 only, where a step takes seconds per micro-batch).
DEFAULT_SPEED = ("5M:1", "5M:4", "20M:1")
DEFAULT_MEMORY = ("5M:1", "5M:4", "20M:1", "20M:4", "80M:1")


# ---------------------------------------------------------------------------------------------- counting
#: Logical bytes per kind, and calls, of every ``torch.distributed`` collective since ``install_counters``.
counted: Counter[str] = Counter()
calls: Counter[str] = Counter()
_depth = threading.local()  # a collective calling another (all_gather_into_tensor -> all_gather_single) counts once


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


#: function name -> (kind, bytes from its bound arguments). All-reduce 2n; the rest move their full buffer once.
_COLLECTIVES: dict[str, tuple[str, Callable[[dict[str, Any]], int]]] = {
    "all_reduce": ("all_reduce", lambda a: 2 * _nbytes([a["tensor"]])),
    "all_reduce_coalesced": ("all_reduce", lambda a: 2 * _nbytes(a["tensors"])),
    "reduce_scatter_single": ("reduce_scatter", lambda a: _nbytes([a["input"]])),
    "reduce_scatter_tensor": ("reduce_scatter", lambda a: _nbytes([a["input"]])),
    "_reduce_scatter_base": ("reduce_scatter", lambda a: _nbytes([a["input"]])),
    "reduce_scatter": ("reduce_scatter", lambda a: _nbytes(a["input_list"])),
    "all_gather_single": ("all_gather", lambda a: _nbytes([a["output_tensor"]])),
    "all_gather_into_tensor": ("all_gather", lambda a: _nbytes([a["output_tensor"]])),
    "_all_gather_base": ("all_gather", lambda a: _nbytes([a["output_tensor"]])),
    "all_gather": ("all_gather", lambda a: _nbytes(a["tensor_list"])),
    "all_gather_coalesced": ("all_gather", lambda a: sum(_nbytes(out) for out in a["output_tensor_lists"])),
    "broadcast": ("broadcast", lambda a: _nbytes([a["tensor"]])),
    "reduce": ("reduce", lambda a: _nbytes([a["tensor"]])),
    "all_to_all_single": ("all_to_all", lambda a: _nbytes([a["input"]])),
    "all_to_all": ("all_to_all", lambda a: _nbytes(a["input_tensor_list"])),
    # Pickled metadata: counted as calls, not as bytes (and what they run inside is not counted twice).
    "all_gather_object": ("object", lambda a: 0),
    "broadcast_object_list": ("object", lambda a: 0),
}


def _counting(name: str, original: Callable[..., Any],
              as_kind: tuple[str, Callable[[dict[str, Any]], int]] | None = None) -> Callable[..., Any]:
    kind, size = as_kind or _COLLECTIVES[name]
    signature = inspect.signature(original)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        outer = getattr(_depth, "value", 0) == 0
        if outer:
            counted[kind] += size(signature.bind(*args, **kwargs).arguments)
            calls[kind] += 1
        _depth.value = getattr(_depth, "value", 0) + 1
        try:
            return original(*args, **kwargs)
        finally:
            _depth.value -= 1

    return wrapper


def install_counters() -> None:
    """Wrap the collectives in ``torch.distributed`` (both namespaces) and lightning_zero's bound aliases, before
    any system captures a reference (DeepSpeed keeps the functions it finds at initialisation)."""
    from torch.distributed import distributed_c10d

    from lightning_zero.sharding import collectives

    for name in _COLLECTIVES:
        original = getattr(distributed_c10d, name, None)
        if original is None:
            continue
        wrapped = _counting(name, original)
        setattr(distributed_c10d, name, wrapped)
        if getattr(dist, name, None) is original:
            setattr(dist, name, wrapped)
    collectives._reduce_scatter = dist.reduce_scatter_single
    collectives._all_gather = dist.all_gather_single
    # On gloo lightning_zero runs a reduce-scatter as point-to-point sends: count it as the reduce-scatter.
    collectives._reduce_scatter_by_sends = _counting(
        "reduce_scatter", collectives._reduce_scatter_by_sends,
        ("reduce_scatter", lambda a: a["source"].numel * a["source"].dtype.itemsize))
    # ... and an all-gather as one broadcast per rank of its slice (not counted again inside).
    collectives._all_gather_by_broadcasts = _counting(
        "all_gather", collectives._all_gather_by_broadcasts, ("all_gather", lambda a: _nbytes([a["flat"]])))


# ----------------------------------------------------------------------------------------------- memory
_SKIP = (str, bytes, int, float, bool, complex, type(None), type, types.ModuleType, weakref.ref,
         types.BuiltinFunctionType, types.CodeType, torch.dtype, torch.device)
_OWNERS = ("torch", "deepspeed", "lightning_zero", "gpt", "peers", "__mp_main__", "__main__")


def reachable_tensors(roots: Iterable[Any]) -> Iterator[torch.Tensor]:
    """Every plain tensor reachable from ``roots`` through attributes of torch/DeepSpeed/benchmark objects,
    containers, bound methods, partials and closures (hooks hold state there). DTensors yield their local
    shard; parameters also yield their ``.grad`` and any tensor attributes (``ds_tensor``, FSDP1's buffers)."""
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if isinstance(obj, _SKIP) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            local = getattr(obj, "_local_tensor", None)
            if isinstance(local, torch.Tensor):
                stack.append(local)
            else:
                yield obj
            if isinstance(obj, torch.nn.Parameter) and obj.grad is not None:
                stack.append(obj.grad)
            stack.extend(getattr(obj, "__dict__", {}).values())
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset, deque)):
            stack.extend(obj)
        elif isinstance(obj, types.MethodType):
            stack.append(obj.__self__)
        elif isinstance(obj, functools.partial):
            stack.extend([obj.func, *obj.args, *obj.keywords.values()])
        elif isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                with contextlib.suppress(ValueError):
                    stack.append(cell.cell_contents)
        elif type(obj).__module__.split(".")[0] in _OWNERS:
            stack.extend(getattr(obj, "__dict__", {}).values())
            for cls in type(obj).__mro__:
                slots = getattr(cls, "__slots__", ())
                for slot in (slots,) if isinstance(slots, str) else slots:
                    with contextlib.suppress(AttributeError):
                        stack.append(getattr(obj, slot))


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    local = getattr(tensor, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else tensor


def storage_bytes(tensors: Iterable[torch.Tensor | None], seen: set[int]) -> int:
    """Bytes of the storages behind ``tensors`` not yet in ``seen`` (each storage once, as ``memory.py`` does)."""
    total = 0
    for tensor in tensors:
        if tensor is None:
            continue
        storage = _plain(tensor).untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def peer_state_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer, roots: Iterable[Any]) -> dict[str, int]:
    """A peer's model-state bytes on this rank by role, each storage counted once, in this order: the module's
    parameters (and DeepSpeed stage 3's ``ds_tensor`` partitions), their gradients, the inner optimizer's own
    parameters where they are other tensors (fp32 masters) and their gradients, its state, and anything else
    reachable from ``roots`` (flat buffers, bucket buffers, reserved gradient buffers)."""
    seen: set[int] = set()
    params = list(module.parameters())
    partitions = [getattr(p, "ds_tensor", None) for p in params]
    out = {"parameters": storage_bytes([*params, *partitions], seen)}
    grads = [p.grad for p in params] + [t.grad for t in partitions if t is not None]
    out["gradients"] = storage_bytes(grads, seen)
    masters = [p for group in optimizer.param_groups for p in group["params"]]
    out["master"] = storage_bytes(masters, seen)
    out["gradients"] += storage_bytes([p.grad for p in masters], seen)
    state = [v for values in optimizer.state.values() for v in values.values() if torch.is_tensor(v)]
    out["optimizer_state"] = storage_bytes(state, seen)
    out["other"] = storage_bytes(reachable_tensors([module, optimizer, *roots]), seen)
    out["total"] = sum(out.values())
    return out


def _rss() -> dict[str, int]:
    """This process's resident bytes now and at their peak (VmRSS, VmHWM)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}


def _release_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---------------------------------------------------------------------------------------------- systems
@dataclass
class Runner:
    """One system, built: run a micro-batch's forward and backward (``last`` closes the accumulation window),
    the optimizer step, then clear gradients; ``state_bytes`` reads model-state bytes now."""

    forward_backward: Callable[[torch.Tensor, torch.Tensor, bool], None]
    step: Callable[[], None]
    zero_grad: Callable[[], None]
    state_bytes: Callable[[], dict[str, int]]
    close: Callable[[], None] = lambda: None
    traffic: Callable[[], Counter[str]] = field(default=lambda: Counter(counted))


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _plain_runner(net: torch.nn.Module, optimizer: torch.optim.Optimizer, inner: torch.optim.Optimizer,
                  accumulate: int, no_sync: Callable[[bool], contextlib.AbstractContextManager[Any]],
                  roots: list[Any]) -> Runner:
    def forward_backward(x: torch.Tensor, y: torch.Tensor, last: bool) -> None:
        with no_sync(last):
            (_cross_entropy(net(x), y) / accumulate).backward()

    return Runner(forward_backward, optimizer.step, lambda: optimizer.zero_grad(set_to_none=True),
                  lambda: peer_state_bytes(net, inner, [optimizer, *roots]))


def _ddp(model: torch.nn.Module, accumulate: int, accounting: bool, optimizer_class: str) -> Runner:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    net = DistributedDataParallel(model)
    buckets: dict[int, torch.Tensor] = {}
    if accounting:  # DDP's reducer all-reduces in C++; the stock Python hook does the same, visibly

        # Left unannotated: DDP compares a hook's annotations with ``dist.GradBucket`` by identity, and this
        # module's annotations are postponed strings.
        def hook(state, bucket):  # type: ignore[no-untyped-def]
            buckets[bucket.index()] = bucket.buffer()
            return allreduce_hook(state, bucket)

        net.register_comm_hook(None, hook)
    if optimizer_class == "zero_redundancy":
        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=LR)
        inner = optimizer.optim
    else:
        optimizer = inner = torch.optim.AdamW(model.parameters(), lr=LR)
    return _plain_runner(net, optimizer, inner, accumulate,
                         lambda last: contextlib.nullcontext() if last else net.no_sync(), [buckets])


def _fsdp1(model: torch.nn.Module, accumulate: int, full_shard: bool) -> Runner:
    from gpt import Block
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    strategy = ShardingStrategy.FULL_SHARD if full_shard else ShardingStrategy.SHARD_GRAD_OP
    net = FullyShardedDataParallel(model, sharding_strategy=strategy, auto_wrap_policy=ModuleWrapPolicy({Block}),
                                   device_id=torch.device("cpu"))
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR)
    return _plain_runner(net, optimizer, optimizer, accumulate,
                         lambda last: contextlib.nullcontext() if last else net.no_sync(), [])


def _fsdp2(model: torch.nn.Module, accumulate: int, reshard: bool) -> Runner:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

    def no_sync(last: bool) -> contextlib.AbstractContextManager[Any]:
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    return _plain_runner(model, optimizer, optimizer, accumulate, no_sync, [])


def _deepspeed(model: torch.nn.Module, accumulate: int, batch_size: int, stage: int) -> Runner:
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    inner = torch.optim.AdamW(model.parameters(), lr=LR)
    config = {
        "train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": accumulate,
        "gradient_clipping": 0.0,  # its default is 1.0; the others do not clip
        "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=inner, config=config)

    def forward_backward(x: torch.Tensor, y: torch.Tensor, last: bool) -> None:
        engine.backward(_cross_entropy(engine(x), y))  # the engine divides by the accumulation itself
        if not last:
            engine.step()  # not a boundary: DeepSpeed only accumulates here

    def close() -> None:
        with contextlib.suppress(Exception):
            engine.destroy()

    return Runner(forward_backward, engine.step, lambda: None,
                  lambda: peer_state_bytes(engine.module, inner, [engine, engine.optimizer]), close)


def _zero(model: torch.nn.Module, accumulate: int, stage: int, policy: str) -> Runner:
    from lightning_zero import ZeroConfig, ZeroEngine, model_state_bytes
    from lightning_zero.sharding import collectives

    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters(), lr=LR),
                        ZeroConfig(stage=stage, reduce_policy=policy))

    def forward_backward(x: torch.Tensor, y: torch.Tensor, last: bool) -> None:
        with contextlib.nullcontext() if last else engine.no_sync():
            (_cross_entropy(model(x), y) / accumulate).backward()

    def state_bytes() -> dict[str, int]:
        measured = model_state_bytes(engine)
        out = {"parameters": measured.parameters, "gradients": measured.gradients, "master": measured.master,
               "optimizer_state": measured.optimizer_state, "other": measured.in_flight + measured.host.total}
        out["total"] = measured.total
        out["walked"] = peer_state_bytes(model, engine.optimizer.optimizer, [engine])["total"]
        return out

    return Runner(forward_backward, engine.step, lambda: None, state_bytes, engine.close,
                  lambda: Counter(collectives.traffic))


def build(system: str, size: str, accumulate: int, policy: str, batch_size: int, accounting: bool) -> Runner:
    """A fresh GPT of ``size`` (same seed everywhere) wrapped by ``system``."""
    from gpt import GPT

    torch.manual_seed(0)
    model = GPT(*SIZES[size])
    if system in ("ddp", "ddp_zero_redundancy"):
        return _ddp(model, accumulate, accounting, "zero_redundancy" if system != "ddp" else "adamw")
    if system.startswith("fsdp1"):
        return _fsdp1(model, accumulate, full_shard=system == "fsdp1_full_shard")
    if system.startswith("fsdp2"):
        return _fsdp2(model, accumulate, reshard=system == "fsdp2_reshard")
    if system.startswith("deepspeed"):
        return _deepspeed(model, accumulate, batch_size, int(system[-1]))
    return _zero(model, accumulate, int(system[-1]), policy)


def _batches(count: int, batch_size: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from gpt import corpus, sample_batch

    generator = torch.Generator().manual_seed(rank)
    data = corpus()
    return [sample_batch(data, batch_size, 64, generator) for _ in range(count)]


def _window(runner: Runner, batches: list[tuple[torch.Tensor, torch.Tensor]],
            after_backward: Callable[[], None] = lambda: None) -> None:
    """One optimizer step over ``batches`` (one micro-batch each); ``after_backward`` runs after each backward."""
    for micro, (x, y) in enumerate(batches):
        runner.forward_backward(x, y, micro == len(batches) - 1)
        after_backward()
    runner.step()


# ------------------------------------------------------------------------------------------------ speed
@dataclass(frozen=True)
class Case:
    """One row: a system at an accumulation (and, for lightning_zero at accumulation > 1, a policy)."""

    system: str
    accumulate: int
    policy: str = "auto"

    @property
    def name(self) -> str:
        return self.system if self.policy == "auto" else f"{self.system}/{self.policy}"


def cases(systems: Iterable[str], accumulate: int, lightning: bool,
          policy_choice: Iterable[str] = POLICIES) -> list[Case]:
    """The rows to run at ``accumulate``: each of ``policy_choice`` for the zero stages when it is above 1."""
    out = []
    for system in systems:
        if system in LIGHTNING and (not lightning or accumulate != 1):
            continue
        policies = policy_choice if system in ZERO and accumulate > 1 else ("auto",)
        out.extend(Case(system, accumulate, policy) for policy in policies)
    return out


def _lightning_times(case: Case, size: str, batches: list[tuple[torch.Tensor, torch.Tensor]],
                     warmup: int) -> list[float]:
    import lightning.pytorch as pl
    from gpt import GPT
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader

    from lightning_zero import ZeroStrategy

    class Bench(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = GPT(*SIZES[size])

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            x, y = batch
            return _cross_entropy(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=LR)

    class StepTimer(pl.Callback):
        """Times each batch (one optimizer step) from a barrier, as the bare loop does."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = 0.0

        def on_train_batch_start(self, *_: Any) -> None:
            dist.barrier()
            self.start = time.perf_counter()

        def on_train_batch_end(self, *_: Any) -> None:
            self.times.append(time.perf_counter() - self.start)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    timer = StepTimer()
    strategy = DDPStrategy() if case.system == "lightning_ddp" else ZeroStrategy(stage=int(case.system[-1]))
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=dist.get_world_size(),
                         max_steps=len(batches), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[timer])
    trainer.fit(Bench(), DataLoader(batches, batch_size=None))
    return timer.times[warmup:]


def _speed_worker(rank: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """Per repeat, every case in turn (rotated by one each repeat); returns case key -> median step time of
    each repeat."""
    torch.set_num_threads(1)
    if args.interleave == "step":
        return _step_interleaved(rank, args)
    medians: dict[str, list[float]] = {}
    windows = args.warmup + args.steps
    for repeat in range(args.repeats):
        shift = repeat % len(args.cases)  # rotate the order, so no system always runs right after the same one
        for case in args.cases[shift:] + args.cases[:shift]:
            batches = _batches(windows * case.accumulate, args.batch_size, rank)
            if case.system in LIGHTNING:
                times = _lightning_times(case, args.size, batches, args.warmup)
            else:
                runner = build(case.system, args.size, case.accumulate, case.policy, args.batch_size, False)
                times = []
                for step in range(windows):
                    dist.barrier()
                    start = time.perf_counter()
                    _window(runner, batches[step * case.accumulate:(step + 1) * case.accumulate])
                    runner.zero_grad()
                    if step >= args.warmup:
                        times.append(time.perf_counter() - start)
                runner.close()
                del runner
            gc.collect()
            medians.setdefault(f"{case.name}@{case.accumulate}", []).append(statistics.median(times))
    return medians


def _step_interleaved(rank: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """Every (bare-loop) case built at once in this process, then one optimizer step of each in turn, round
    after round (the order rotated by one each round): a system and DDP are timed seconds apart, so a slow
    minute of the machine slows both. Returns case key -> step time of each timed round."""
    runners = {case: build(case.system, args.size, case.accumulate, case.policy, args.batch_size, False)
               for case in args.cases}
    rounds = args.warmup + args.repeats * args.steps
    accumulate = args.cases[0].accumulate
    batches = _batches(rounds * accumulate, args.batch_size, rank)
    times: dict[str, list[float]] = {f"{case.name}@{case.accumulate}": [] for case in args.cases}
    for round_ in range(rounds):
        shift = round_ % len(args.cases)
        for case in args.cases[shift:] + args.cases[:shift]:
            runner = runners[case]
            dist.barrier()
            start = time.perf_counter()
            _window(runner, batches[round_ * accumulate:(round_ + 1) * accumulate])
            runner.zero_grad()
            if round_ >= args.warmup:
                times[f"{case.name}@{case.accumulate}"].append(time.perf_counter() - start)
    for runner in runners.values():
        runner.close()
    return times


# ---------------------------------------------------------------------------------------------- accounting
def _accounting_worker(rank: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One case in this fresh process: a warm-up window, then a measured one, its model state sampled after every
    backward and after the step. Returns every rank's numbers."""
    torch.set_num_threads(1)
    install_counters()
    case: Case = args.case
    _release_memory()
    before = _rss()
    batches = _batches(2 * case.accumulate, args.accounting_batch_size, rank)
    runner = build(case.system, args.size, case.accumulate, case.policy, args.accounting_batch_size, True)
    _window(runner, batches[:case.accumulate])
    runner.zero_grad()
    traffic_before, calls_before, wrapped_before = runner.traffic(), Counter(calls), Counter(counted)
    samples: list[int] = []
    _window(runner, batches[case.accumulate:], lambda: samples.append(runner.state_bytes()["total"]))
    traffic = runner.traffic() - traffic_before
    state = runner.state_bytes()
    result = {"rank": rank, "state": state, "before_step": samples[-1], "high_point": max([*samples, state["total"]]),
              "traffic": dict(traffic), "calls": dict(Counter(calls) - calls_before),
              "wrapped_bytes": sum((counted - wrapped_before).values()), "rss_before": before["rss"],
              "peak_rss": _rss()["peak"]}
    runner.zero_grad()
    runner.close()
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    return gathered


# ------------------------------------------------------------------------------------------------- driver
def _available(systems: list[str]) -> tuple[list[str], dict[str, str]]:
    skipped = {}
    if importlib.util.find_spec("deepspeed") is None:
        skipped.update({s: "deepspeed is not installed (DS_BUILD_OPS=0 pip install deepspeed)"
                        for s in systems if s.startswith("deepspeed")})
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        skipped.update({s: f"torch {torch.__version__} has no FSDP2 fully_shard" for s in systems
                        if s.startswith("fsdp2")})
    return [s for s in systems if s not in skipped], skipped


def _preload(systems: list[str]) -> list[str]:
    modules = ["torch", "torch.distributed.fsdp", "lightning.pytorch", "lightning_zero", "gpt"]
    return modules + (["deepspeed"] if any(s.startswith("deepspeed") for s in systems) else [])


def run_speed(args: argparse.Namespace, systems: list[str], preload: list[str]) -> list[dict[str, Any]]:
    """Interleaved timing at world size 2, one launch per (size, accumulation) pair of ``--speed``."""
    rows = []
    for size, accumulate in args.speed:
        run_args = argparse.Namespace(**vars(args), size=size, cases=cases(systems, accumulate, True, args.policies))
        print(f"speed: {size} at accumulate {accumulate}, {len(run_args.cases)} systems x {args.repeats} repeats",
              flush=True)
        if args.interleave == "step":
            run_args.cases = [case for case in run_args.cases if case.system not in LIGHTNING]
        medians = run_pinned(_speed_worker, run_args, world=2, preload=preload)
        base = medians.get(f"ddp@{accumulate}")
        lightning_base = medians.get(f"lightning_ddp@{accumulate}")
        for case in run_args.cases:
            times = medians[f"{case.name}@{accumulate}"]
            ref = lightning_base if case.system == "lightning_zero2" else base
            rows.append({
                "size": size, "case": case.name, "system": case.system, "policy": case.policy,
                "accumulate": accumulate, "median_step_s": statistics.median(times), "per_repeat_s": times,
                "ratio_to_ddp": statistics.median(a / b for a, b in zip(times, base)) if base else None,
                "ratio_to_lightning_ddp": (statistics.median(a / b for a, b in zip(times, ref))
                                           if ref and case.system in LIGHTNING else None),
            })
    return rows


def run_accounting(args: argparse.Namespace, systems: list[str], preload: list[str],
                   params: dict[str, int]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Memory and communication: one fresh launch per (size, accumulation) of ``--memory``, world size and case."""
    from lightning_zero import estimate_memory

    rows, failures = [], {}
    bare = [s for s in systems if s not in LIGHTNING]
    for size, accumulate in args.memory:
        for world in args.world_sizes:
            for case in cases(bare, accumulate, False):
                run_args = argparse.Namespace(**vars(args), size=size, case=case)
                label = f"{size} world {world} accumulate {accumulate} {case.name}"
                print(f"memory/communication: {label}", flush=True)
                try:
                    ranks = run_pinned(_accounting_worker, run_args, world=world, preload=preload)
                except RuntimeError as exc:
                    failures[label] = str(exc)
                    print(f"  failed: {exc}", flush=True)
                    continue
                formula = estimate_memory(params[size], FORMULA_STAGE[case.system], world, "32-true", "adamw")
                totals = [r["state"]["total"] for r in ranks]
                rows.append({
                    "size": size, "world": world, "accumulate": accumulate, "case": case.name,
                    "system": case.system, "policy": case.policy,
                    "model_state_bytes": max(totals), "model_state_bytes_per_rank": totals,
                    "model_state_by_kind": ranks[totals.index(max(totals))]["state"],
                    "formula_stage": FORMULA_STAGE[case.system], "formula_bytes": formula.total,
                    "ratio_to_formula": max(totals) / formula.total,
                    "before_step_bytes": max(r["before_step"] for r in ranks),
                    "high_point_bytes": max(r["high_point"] for r in ranks),
                    "peak_rss_bytes": max(r["peak_rss"] for r in ranks),
                    "peak_rss_per_rank": [r["peak_rss"] for r in ranks],
                    "rss_before_bytes": max(r["rss_before"] for r in ranks),
                    "traffic": ranks[0]["traffic"], "calls": ranks[0]["calls"],
                    "comm_bytes": sum(ranks[0]["traffic"].values()),
                    "wrapped_comm_bytes": ranks[0]["wrapped_bytes"],
                })
    return rows, failures


# ------------------------------------------------------------------------------------------------ output
def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value / 2**20:,.1f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def table(result: dict[str, Any]) -> str:
    """One markdown table per model size: speed at world size 2, memory and communication per world size."""
    speed = {(r["size"], r["case"], r["accumulate"]): r for r in result["speed"]}
    accounting = {(r["size"], r["case"], r["accumulate"], r["world"]): r for r in result["accounting"]}
    worlds = sorted({r["world"] for r in result["accounting"]})
    settings = result["settings"]
    lines = [
        f"torch {result['torch']}, DeepSpeed {result['deepspeed'] or 'not installed'}, {result['cpu']}; "
        f"AdamW (lr {LR}) in fp32 on gloo. Speed: world size 2, one pinned core and thread per rank, micro-batch "
        f"{settings['batch_size']} x 64 tokens, median of {settings['steps']} optimizer steps after "
        f"{settings['warmup']} warm-up, {settings['repeats']} interleaved repeats; ratio = median over repeats of "
        f"time / torch DDP's time (Lightning zero2: / Lightning ddp's). Memory and communication: fresh processes "
        f"per system, micro-batch {settings['accounting_batch_size']}; model state per rank (max over ranks) "
        "right after the second optimizer step, and its high point (sampled also after every backward); formula = "
        "../shared/DESIGN.md fp32 row of the sharding the system keeps between steps (1: zero1, "
        "ZeroRedundancyOptimizer, DeepSpeed 1; 2: zero2, DeepSpeed 2; 3: zero3, FSDP, "
        "DeepSpeed 3); state counts allocated storages, so a buffer reserved but never written counts in full "
        "while adding little RSS on CPU; peak RSS includes the "
        f"{min((r['rss_before_bytes'] for r in result['accounting']), default=0) / 2**20:.0f} MiB a rank holds "
        "before building its model (torch, Lightning, DeepSpeed imported); communication = logical bytes per "
        f"optimizer step per rank. Load average (1 min) {result['load_average'][0]:.2f} at the start, "
        f"{result['load_average'][1]:.2f} at the end.",
    ]
    for size, info in result["models"].items():
        keys = sorted({(k[1], k[2]) for k in [*speed, *accounting] if k[0] == size},
                      key=lambda k: (k[1], SYSTEMS.index(k[0].split("/")[0]), k[0]))
        if not keys:
            continue
        head = ["system", "accumulate", "step (s)", "vs DDP"]
        for world in worlds:
            head += [f"state/rank N={world} (MiB)", "vs formula", "high point (vs formula)"]
        if worlds:
            head += [f"peak RSS N={'/'.join(map(str, worlds))} (MiB)",
                     f"comm/step N={'/'.join(map(str, worlds))} (MiB)", f"comm vs DDP N={worlds[0]}"]
        lines += ["", f"**{size}: {info['parameters']:,} parameters** (width {info['width']}, depth {info['depth']}, "
                  f"{info['heads']} heads)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for case, accumulate in keys:
            system, _, policy = case.partition("/")
            timed = speed.get((size, case, accumulate), {})
            ratio = timed.get("ratio_to_lightning_ddp") if system == "lightning_zero2" else timed.get("ratio_to_ddp")
            name = LABELS[system] + (f" ({policy})" if policy else "")
            cells = [name, str(accumulate), f"{timed['median_step_s']:.3f}" if timed else "—", _ratio(ratio)]
            rows = [accounting.get((size, case, accumulate, world)) for world in worlds]
            for row in rows:
                cells += [_mib(row and row["model_state_bytes"]), _ratio(row and row["ratio_to_formula"]),
                          f"{_mib(row['high_point_bytes'])} ({row['high_point_bytes'] / row['formula_bytes']:.2f}x)"
                          if row else "—"]
            if worlds:
                cells.append(" / ".join(_mib(row and row["peak_rss_bytes"]) for row in rows))
                cells.append(" / ".join(_mib(row and row["comm_bytes"]) for row in rows))
                ddp, first = accounting.get((size, "ddp", accumulate, worlds[0])), rows[0]
                cells.append(_ratio(first["comm_bytes"] / ddp["comm_bytes"]) if first and ddp and ddp["comm_bytes"]
                             else "—")
            lines.append("| " + " | ".join(cells) + " |")
    if result["skipped"] or result["failed"]:
        lines += [""] + [f"- skipped {name}: {why}" for name, why in result["skipped"].items()]
        lines += [f"- failed {name}: {why}" for name, why in result["failed"].items()]
    return "\n".join(lines)


def _memory_panel(axis: Any, result: dict[str, Any], size: str, worlds: list[int]) -> None:
    rows = [r for r in result["accounting"] if r["size"] == size and r["accumulate"] == 1]
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
    width = 0.8 / len(worlds)
    # DeepSpeed stage 3 reserves gigabytes of gradient buffers; cap the axis so the others stay readable.
    regular = [r["model_state_bytes"] for r in rows if r["ratio_to_formula"] < 3]
    top = 1.25 * max(regular or [r["model_state_bytes"] for r in rows]) / 2**20
    for i, world in enumerate(worlds):
        by_system = {r["system"]: r for r in rows if r["world"] == world}
        xs = [x + (i - (len(worlds) - 1) / 2) * width for x in range(len(systems))]
        mib = [by_system[s]["model_state_bytes"] / 2**20 if s in by_system else 0.0 for s in systems]
        axis.bar(xs, [min(v, top) for v in mib], width, label=f"{world} ranks")
        axis.scatter(xs, [by_system[s]["formula_bytes"] / 2**20 if s in by_system else float("nan")
                          for s in systems], marker="_", color="black", s=80, label="formula" if i == 0 else None)
        for x, value in zip(xs, mib):
            if value > top:
                axis.text(x, top * 0.97, f"{value:,.0f}", rotation=90, ha="center", va="top", fontsize=7)
    axis.set_ylim(0, top)
    axis.set_xticks(range(len(systems)), systems, rotation=45, ha="right", fontsize=8)
    axis.set_ylabel("model state per rank (MiB)")
    axis.set_title(f"{size} ({result['models'][size]['parameters'] / 1e6:.1f}M parameters), accumulate 1",
                   fontsize=10)
    axis.legend(fontsize=8)


def _speed_panel(axis: Any, result: dict[str, Any]) -> None:
    configs = sorted({(r["size"], r["accumulate"]) for r in result["speed"]},
                     key=lambda c: (list(result["models"]).index(c[0]), c[1]))
    # One group per system; under accumulation the zero stages' "boundary" row shares it, the other policy
    # gets its own.
    def group(row: dict[str, Any]) -> str:
        return row["system"] if row["policy"] in ("auto", "boundary") else row["case"]

    ordered = sorted(result["speed"], key=lambda r: (SYSTEMS.index(r["system"]), r["policy"]))
    names = [name for name in dict.fromkeys(group(r) for r in ordered) if name != "ddp"]
    width = 0.8 / len(configs)
    for i, config in enumerate(configs):
        by_group = {group(r): r for r in result["speed"] if (r["size"], r["accumulate"]) == config}
        values = []
        for name in names:
            row = by_group.get(name, {})
            value = row.get("ratio_to_lightning_ddp") if name == "lightning_zero2" else row.get("ratio_to_ddp")
            values.append(float("nan") if value is None else value)
        axis.bar([x + (i - (len(configs) - 1) / 2) * width for x in range(len(names))], values, width,
                 label=f"{config[0]}, accumulate {config[1]}")
    axis.axhline(1.0, color="black", linewidth=0.8)
    for target, style in ((1.05, ":"), (1.10, "--")):
        axis.axhline(target, color="gray", linewidth=0.8, linestyle=style, label=f"{target:.2f}x")
    axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    axis.set_ylabel("step time / torch DDP\n(lightning_zero2: / Lightning ddp)")
    axis.set_title(f"Step time, world size 2, one pinned core per rank, median of {result['settings']['repeats']} "
                   "repeats (zero stages at accumulate > 1: boundary policy unless named)", fontsize=10)
    axis.legend(fontsize=8, ncol=2)


def plot(result: dict[str, Any], path: Path) -> str | None:
    """Model-state bytes per rank by system and world size (accumulate 1), and step-time ratios to DDP; returns
    why there is no plot, if there is none."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no plot"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s for s in result["models"] if any(r["size"] == s and r["accumulate"] == 1
                                                 for r in result["accounting"])]
    worlds = sorted({r["world"] for r in result["accounting"]})
    rows = int(bool(sizes)) + int(bool(result["speed"]))
    if not rows:
        return "nothing measured: no plot"
    fig = plt.figure(figsize=(max(6 * len(sizes), 12), 4.5 * rows))
    grid = fig.add_gridspec(rows, max(len(sizes), 1))
    for column, size in enumerate(sizes):
        _memory_panel(fig.add_subplot(grid[0, column]), result, size, worlds)
    if result["speed"]:
        _speed_panel(fig.add_subplot(grid[rows - 1, :]), result)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _configs(values: list[str] | None, default: tuple[str, ...], sizes: list[str]) -> list[tuple[str, int]]:
    """``SIZE:ACCUMULATE`` strings as pairs: the default filtered by ``--sizes``, given ones as they are."""
    out = []
    for value in default if values is None else values:
        size, _, accumulate = value.partition(":")
        if size not in SIZES or not accumulate.isdigit() or int(accumulate) < 1:
            raise SystemExit(f"expected SIZE:ACCUMULATE with SIZE in {list(SIZES)}, got {value!r}")
        if values is not None or size in sizes:
            out.append((size, int(accumulate)))
    return out


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES),
                        help="model sizes to run; filters the defaults of --speed and --memory (default: all)")
    parser.add_argument("--speed", nargs="*", default=None, metavar="SIZE:ACCUMULATE",
                        help=f"timed at world size 2 (default: {' '.join(DEFAULT_SPEED)} within --sizes; "
                             "none: give the flag alone)")
    parser.add_argument("--memory", nargs="*", default=None, metavar="SIZE:ACCUMULATE",
                        help=f"memory and communication, at every --world-sizes (default: {' '.join(DEFAULT_MEMORY)} "
                             "within --sizes; none: give the flag alone)")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--world-sizes", nargs="*", type=int, default=[2, 4],
                        help="world sizes for memory and communication (none: give the flag alone)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--policies", nargs="+", choices=("auto", *POLICIES), default=list(POLICIES),
                        help="the zero stages' reduce policies timed at accumulation above 1 (default: both; auto: "
                             "each stage's default alone)")
    parser.add_argument("--interleave", choices=("run", "step"), default="run",
                        help="run: each system's run in turn, each built afresh; step: every bare-loop system "
                             "built at once, one optimizer step of each in turn (--repeats x --steps rounds; "
                             "Lightning rows are left out)")
    parser.add_argument("--batch-size", type=int, default=8, help="micro-batch (sequences of 64 tokens), speed")
    parser.add_argument("--name", default="peers",
                        help="results go to benchmarks/results/NAME.json, .md and .png (default: peers)")
    parser.add_argument("--accounting-batch-size", type=int, default=2,
                        help="micro-batch for memory and communication (neither depends on it; peak RSS does)")
    args = parser.parse_args()
    if "ddp" not in args.systems:
        args.systems.insert(0, "ddp")  # every ratio is taken against it
    if "lightning_zero2" in args.systems and "lightning_ddp" not in args.systems:
        args.systems.append("lightning_ddp")
    args.speed = _configs(args.speed, DEFAULT_SPEED, args.sizes)
    args.memory = _configs(args.memory, DEFAULT_MEMORY, args.sizes)
    systems, skipped = _available(args.systems)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", flush=True)
    preload = _preload(systems)
    from gpt import GPT

    models = {}
    for size in dict.fromkeys(s for s, _ in [*args.speed, *args.memory]):
        width, depth, heads = SIZES[size]
        models[size] = {"width": width, "depth": depth, "heads": heads,
                        "parameters": sum(p.numel() for p in GPT(width, depth, heads).parameters())}
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    speed = run_speed(args, systems, preload)
    accounting, failed = run_accounting(args, systems, preload, {s: m["parameters"] for s, m in models.items()})
    deepspeed = importlib.util.find_spec("deepspeed") and importlib.import_module("deepspeed").__version__
    settings = vars(args) | {"speed": [list(c) for c in args.speed], "memory": [list(c) for c in args.memory]}
    result = {"torch": torch.__version__, "deepspeed": deepspeed or None, "cpu": _cpu(), "settings": settings,
              "models": models, "skipped": skipped, "failed": failed, "speed": speed, "accounting": accounting,
              "wall_s": time.perf_counter() - started, "load_average": [load_start, os.getloadavg()[0]]}
    mismatched = [f"{r['size']} {r['case']} N={r['world']} acc {r['accumulate']}" for r in accounting
                  if r["system"] in ZERO and r["wrapped_comm_bytes"] != r["comm_bytes"]]
    if mismatched:
        print("warning: lightning_zero's traffic counter and the wrapped collectives disagree for "
              + ", ".join(mismatched), flush=True)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    text = table(result)
    files = {kind: out / f"{args.name}.{kind}" for kind in ("json", "md", "png")}
    files["json"].write_text(json.dumps(result, indent=1))
    files["md"].write_text(text + "\n")
    problem = plot(result, files["png"])
    print(text)
    print(problem or f"wrote {', '.join(map(str, files.values()))} in {result['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
