"""How much model state ZeRO keeps per rank: ``estimate_memory`` predicts it before training (as DeepSpeed's
estimators do), ``ZeroReport`` measures it and the communication per optimizer step while a Trainer fits."""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import lightning.pytorch as pl
import torch
from torch import optim

from lightning_zero.config import OffloadName, PrecisionPolicy, ReducePolicyName, ZeroConfig, resolve_reduce_policy
from lightning_zero.memory import HostBytes, ModelStateBytes, model_state_bytes
from lightning_zero.sharding.collectives import ACROSS_GROUPS
from lightning_zero.sharding.engine import ZeroEngine
from lightning_zero.sharding.layout import ByModule, full_precision_params
from lightning_zero.sharding.parameters import module_units

__all__ = ["MemoryEstimate", "OPTIMIZER_STATES", "ZeroMeasurement", "ZeroReport", "estimate_memory"]

#: Element-wise state tensors each optimizer keeps per parameter element, by the names ``estimate_memory``
#: accepts. They are held in the master dtype (fp32, or 16-bit under ``*-true``). "sgd" means SGD with
#: momentum, as it is usually trained; "sgd-nomomentum" is plain SGD (no state at all).
OPTIMIZER_STATES: Mapping[str, int] = {
    "adam": 2, "adamw": 2, "adamax": 2, "nadam": 2, "radam": 2, "adadelta": 2, "rprop": 2,
    "sgd": 1, "sgd-nomomentum": 0, "adagrad": 1, "rmsprop": 1, "asgd": 1,
}
_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted model-state bytes per rank after the first optimizer step (stage 0: plain DDP).

    ``parameters`` to ``optimizer_state`` are device bytes; ``host`` is what ``offload="optimizer"`` keeps in
    host memory instead (master, a gradient slice in the master dtype, optimizer state; zero otherwise).
    ``total`` counts both, ``device_total`` the device alone. ``ddp_total`` is stage 0 with the same dtypes
    and optimizer: nothing sharded or offloaded, the ZeRO paper's baseline.
    Left out: bucket padding (under ``world_size`` elements per bucket), optimizers' scalar step counters
    (4 bytes per parameter slice), buffers, activations and transient communication buffers.
    """

    stage: int
    world_size: int
    precision: str
    optimizer: str
    trainable_params: int
    frozen_params: int
    parameters: int
    gradients: int
    master: int
    optimizer_state: int
    ddp_total: int
    offload: OffloadName = "none"
    host: HostBytes = HostBytes()

    @property
    def device_total(self) -> int:
        """One rank's model-state bytes on the device."""
        return self.parameters + self.gradients + self.master + self.optimizer_state

    @property
    def total(self) -> int:
        """All model-state bytes of one rank, device and host."""
        return self.device_total + self.host.total

    @property
    def ratio_to_ddp(self) -> float:
        """``device_total / ddp_total``: the share of plain data parallel's device bytes that a rank keeps."""
        return self.device_total / self.ddp_total if self.ddp_total else 1.0

    def table(self, measured: ModelStateBytes | None = None) -> str:
        """A short multi-line summary; with ``measured``, a second column of what a rank actually holds."""
        name = "DDP (stage 0)" if self.stage == 0 else f"ZeRO stage {self.stage}"
        offloaded = " (optimizer offloaded to CPU)" if self.offload == "optimizer" else ""
        frozen = f" + {self.frozen_params:,} frozen" if self.frozen_params else ""
        lines = [
            f"{name} on {self.world_size} rank{'s' if self.world_size != 1 else ''}{offloaded}, {self.precision}, "
            f"{self.optimizer}: {self.trainable_params:,} trainable{frozen} parameters",
            f"{'model state per rank':<22}{'estimated':>14}" + (f"{'measured':>14}" if measured else ""),
        ]
        def row(label: str, estimated: int, got: int | None) -> str:
            return f"{label:<22}{_human(estimated):>14}" + (f"{_human(got):>14}" if got is not None else "")

        device = measured or ModelStateBytes(0, 0, 0, 0, 0)
        show = measured is not None
        lines.append(row("parameters", self.parameters, device.parameters if show else None))
        lines.append(row("gradients", self.gradients, device.gradients if show else None))
        if self.master or device.master:
            lines.append(row("fp32 master", self.master, device.master if show else None))
        if self.offload == "none" or self.optimizer_state or device.optimizer_state:
            lines.append(row("optimizer state", self.optimizer_state, device.optimizer_state if show else None))
        if self.offload == "optimizer":  # the rest lives in host memory
            host = device.host
            lines.append(row("device total", self.device_total, device.device_total if show else None))
            lines.append(row("host: master", self.host.master, host.master if show else None))
            lines.append(row("host: gradients", self.host.gradients, host.gradients if show else None))
            lines.append(row("host: optimizer", self.host.optimizer_state, host.optimizer_state if show else None))
        total = "total (device + host)" if self.offload == "optimizer" else "total"
        lines.append(row(total, self.total, device.total if show else None))
        if measured is not None and self.total:
            lines.append(f"measured / estimated: {measured.total / self.total:.4f}")
        if self.stage != 0:
            where = " on the device" if self.offload == "optimizer" else ""
            lines.append(f"plain DDP would hold {_human(self.ddp_total)} per rank ({self.ratio_to_ddp:.2f}x here"
                         f"{where})")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Counts:
    """A model's parameters as the estimate needs them; byte sizes already in the dtype the engine keeps."""

    trainable: int
    frozen: tuple[tuple[int, int], ...] = ()  # (itemsize, elements) of parameters without gradients
    root_trainable: int = 0  # stage 3 keeps parameters the root module owns itself whole (no unit holds them)
    root_frozen_bytes: int = 0
    # Of ``trainable``: elements a *-mixed policy keeps in fp32 (norms, vectors, embeddings), and the root's share.
    kept: int = 0
    root_kept: int = 0

    @property
    def frozen_numel(self) -> int:
        return sum(numel for _, numel in self.frozen)


def estimate_memory(
    model_or_num_params: torch.nn.Module | int,
    stage: int,
    world_size: int,
    precision: str | PrecisionPolicy = "32-true",
    optimizer: str | type[optim.Optimizer] | optim.Optimizer = "adamw",
    *,
    reduce_policy: ReducePolicyName = "auto",
    offload: OffloadName = "none",
    unit_numel: int = ZeroConfig.unit_numel,
    persist_numel: int | None = ZeroConfig.persist_numel,
) -> MemoryEstimate:
    """Model-state bytes each of ``world_size`` ranks holds after an optimizer step under ZeRO ``stage``
    (0: plain DDP), as this engine lays them out, before building anything.

    A module's parameters without ``requires_grad`` count as frozen (no gradient, master or optimizer
    state; stage 3 shards them too); an int counts as that many trainable parameters. ``optimizer`` is a
    name from ``OPTIMIZER_STATES``, a torch optimizer class (its defaults decide, so ``torch.optim.SGD``
    has no momentum) or an instance (its param groups decide). ``precision`` is a Lightning precision
    string or a ``PrecisionPolicy`` (non-default reduce/accumulate dtypes); ``reduce_policy`` as for
    ``ZeroStrategy``: it decides whether stage 1 reduces inside its full gradient buffer. ``offload`` as
    for ``ZeroConfig``: ``"optimizer"`` moves the master and optimizer state to ``host`` bytes and adds the
    host gradient slice there (owned elements x master itemsize each); device bytes keep the rest.
    ``unit_numel`` and ``persist_numel`` as for ``ZeroConfig``: with a module under stage 3 they decide
    which parameters stay whole on every rank (the root's own and the persistent units').
    """
    if isinstance(stage, bool) or stage not in _STAGES:
        raise ValueError(
            f"stage must be 0 (plain DDP), 1 (optimizer state sharded), 2 (+ gradients) or 3 (+ parameters), "
            f"got {stage!r}"
        )
    policy = _policy(precision)
    label = precision if isinstance(precision, str) else _describe(policy)
    if isinstance(model_or_num_params, torch.nn.Module):
        counts = _counts_of_module(model_or_num_params, policy, unit_numel, persist_numel)
    elif isinstance(model_or_num_params, int) and not isinstance(model_or_num_params, bool):
        if model_or_num_params < 0:
            raise ValueError(f"the number of parameters must be >= 0, got {model_or_num_params}")
        counts = _Counts(model_or_num_params)
    else:
        raise TypeError(
            f"estimate_memory takes a torch.nn.Module or a number of parameters, got "
            f"{type(model_or_num_params).__name__}"
        )
    return _estimate(counts, stage, world_size, policy, label, optimizer, reduce_policy, offload)


def _estimate(
    counts: _Counts,
    stage: int,
    world_size: int,
    policy: PrecisionPolicy,
    precision: str,
    optimizer: str | type[optim.Optimizer] | optim.Optimizer,
    reduce_policy: ReducePolicyName,
    offload: OffloadName = "none",
) -> MemoryEstimate:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(
            f"world_size must be a positive number of ranks (processes, e.g. trainer.world_size), got {world_size!r}"
        )
    if offload not in ("none", "optimizer"):
        raise ValueError(f"offload must be 'none' or 'optimizer', got {offload!r}")
    if offload == "optimizer" and stage == 0:
        raise ValueError("offload='optimizer' is a ZeRO option (stages 1-3); plain DDP (stage 0) keeps state on "
                         "the device: use offload='none' or a stage from 1 to 3")
    optimizer_label, states = _optimizer_states(optimizer)
    # Stage 0 ignores the world size: nothing is sharded.
    ddp = _split_bytes(counts, 0, 1, policy, states, reduce_policy)
    parameters, gradients, master, optimizer_state = _split_bytes(counts, stage, world_size, policy, states,
                                                                  reduce_policy)
    host = HostBytes()
    if offload == "optimizer":
        # The host master is a tensor of its own even where the storage slice would be the master (32-true).
        owned_bytes = math.ceil(counts.trainable / world_size) * policy.master.itemsize
        host = HostBytes(master=owned_bytes, gradients=owned_bytes, optimizer_state=optimizer_state)
        master = optimizer_state = 0
    return MemoryEstimate(stage, world_size, precision, optimizer_label, counts.trainable, counts.frozen_numel,
                          parameters, gradients, master, optimizer_state, ddp_total=sum(ddp), offload=offload,
                          host=host)


def _split_bytes(
    counts: _Counts, stage: int, world_size: int, policy: PrecisionPolicy, states: int,
    reduce_policy: ReducePolicyName,
) -> tuple[int, int, int, int]:
    """``_bytes`` of the parameters in the policy's dtypes plus those of the ones kept in fp32."""
    if not counts.kept:
        return _bytes(counts, stage, world_size, policy, states, reduce_policy)
    main = replace(counts, trainable=counts.trainable - counts.kept,
                   root_trainable=counts.root_trainable - counts.root_kept, kept=0, root_kept=0)
    kept = _Counts(counts.kept, root_trainable=counts.root_kept)
    fp32 = PrecisionPolicy.from_precision("32-true")
    parts = zip(_bytes(main, stage, world_size, policy, states, reduce_policy),
                _bytes(kept, stage, world_size, fp32, states, reduce_policy))
    a, b, c, d = (x + y for x, y in parts)
    return a, b, c, d


def _bytes(
    counts: _Counts, stage: int, world_size: int, policy: PrecisionPolicy, states: int,
    reduce_policy: ReducePolicyName,
) -> tuple[int, int, int, int]:
    """(parameters, gradients, master, optimizer state) bytes per rank; see DESIGN.md's table."""
    trainable = counts.trainable
    owned = math.ceil(trainable / world_size)  # each rank owns an equal 1/N slice of every bucket
    storage, accumulate = policy.storage.itemsize, policy.accumulate.itemsize
    separate_master = policy.master != policy.storage  # otherwise the parameter slice is the master
    frozen_whole = sum(size * numel for size, numel in counts.frozen)
    if stage == 0:
        return (trainable * storage + frozen_whole, trainable * storage,
                trainable * policy.master.itemsize if separate_master else 0,
                trainable * states * policy.master.itemsize)
    master = owned * policy.master.itemsize if separate_master else 0
    optimizer_state = owned * states * policy.master.itemsize
    if stage == 3:  # slices, except that what stays whole is its own slice (the slice is a view of it)
        frozen_owned = sum(size * math.ceil(numel / world_size) for size, numel in counts.frozen)
        whole = counts.root_trainable * storage + counts.root_frozen_bytes
        sliced = math.ceil((trainable - counts.root_trainable) / world_size) * storage
        frozen_sliced = frozen_owned - counts.root_frozen_bytes // world_size
        return sliced + frozen_sliced + whole, owned * accumulate, master, optimizer_state
    parameters = trainable * storage + frozen_whole
    if stage == 2:
        return parameters, owned * accumulate, master, optimizer_state
    # Stage 1 keeps full flat gradient buffers; it reduces inside them (no separate slice) only at the
    # boundary with one dtype throughout, as GradientReducer._reduces_in_place decides.
    in_place = resolve_reduce_policy(1, reduce_policy) == "boundary" and (
        policy.storage == policy.reduce == policy.accumulate)
    gradients = trainable * storage + (0 if in_place else owned * accumulate)
    return parameters, gradients, master, optimizer_state


def _policy(precision: str | PrecisionPolicy) -> PrecisionPolicy:
    if isinstance(precision, PrecisionPolicy):
        return precision
    if not isinstance(precision, str):
        raise TypeError(f"precision must be a Lightning precision string or a PrecisionPolicy, got {precision!r}")
    return PrecisionPolicy.from_precision(precision)


def _describe(policy: PrecisionPolicy) -> str:
    def short(dtype: torch.dtype) -> str:
        return str(dtype).removeprefix("torch.")

    return (f"storage {short(policy.storage)}, reduce {short(policy.reduce)}, accumulate "
            f"{short(policy.accumulate)}, master {short(policy.master)}")


def _counts_of_module(module: torch.nn.Module, policy: PrecisionPolicy, unit_numel: int,
                      persist_numel: int | None) -> _Counts:
    # *-true casts the whole module to the 16-bit dtype (ZeroPrecision.convert_module); otherwise parameters
    # without gradients keep their own dtype, and trainable ones take the policy's storage dtype.
    casts_module = policy.master == policy.storage and policy.storage != torch.float32
    # Stage 3 keeps whole what no gather unit holds (the root's own parameters, the persistent units').
    grouping = ByModule(module_units(module, unit_numel, persist_numel))
    whole = {id(p) for fqn, p in module.named_parameters() if not grouping.unit_of(fqn)}
    mixed = policy.storage.itemsize < policy.master.itemsize
    fp32 = {id(p) for p in full_precision_params(module) if p.dtype == torch.float32} if mixed else set()
    trainable = root_trainable = root_frozen_bytes = kept = root_kept = 0
    frozen: Counter[int] = Counter()
    for param in module.parameters():
        if param.requires_grad:
            trainable += param.numel()
            root_trainable += param.numel() if id(param) in whole else 0
            kept += param.numel() if id(param) in fp32 else 0
            root_kept += param.numel() if id(param) in fp32 and id(param) in whole else 0
            continue
        size = policy.storage.itemsize if casts_module and param.is_floating_point() else param.element_size()
        frozen[size] += param.numel()
        root_frozen_bytes += size * param.numel() if id(param) in whole else 0
    return _Counts(trainable, tuple(sorted(frozen.items())), root_trainable, root_frozen_bytes, kept, root_kept)


def _counts_of_engine(engine: ZeroEngine) -> _Counts:
    """The counts of the model ``engine`` shards, from its layout (stage 3's module holds empty tensors)."""
    trainable = root_trainable = root_frozen_bytes = kept = root_kept = 0
    frozen: Counter[int] = Counter()
    for bucket in engine.layout.buckets:
        # Stage 3's root unit "" holds the parameters no gather unit covers: they stay gathered.
        root = engine.config.stage == 3 and bucket.unit == ""
        if bucket.trainable:
            trainable += bucket.numel
            root_trainable += bucket.numel if root else 0
            kept += bucket.numel if bucket.key.own_dtype else 0
            root_kept += bucket.numel if bucket.key.own_dtype and root else 0
        else:
            frozen[bucket.key.dtype.itemsize] += bucket.numel
            root_frozen_bytes += bucket.key.dtype.itemsize * bucket.numel if root else 0
    return _Counts(trainable, tuple(sorted(frozen.items())), root_trainable, root_frozen_bytes, kept, root_kept)


def _optimizer_states(optimizer: str | type[optim.Optimizer] | optim.Optimizer) -> tuple[str, int]:
    """(label, element-wise state tensors per parameter element) for a name, class or instance."""
    known = ", ".join(OPTIMIZER_STATES)
    if isinstance(optimizer, str):
        name = optimizer.strip().lower()
        if name not in OPTIMIZER_STATES:
            raise ValueError(
                f"unknown optimizer {optimizer!r}; use one of {known}, or pass the torch.optim class or "
                "instance itself"
            )
        return optimizer, OPTIMIZER_STATES[name]
    if isinstance(optimizer, optim.Optimizer):
        cls: type = type(optimizer)
        settings = optimizer.param_groups
    elif isinstance(optimizer, type) and issubclass(optimizer, optim.Optimizer):
        cls = optimizer
        defaults = inspect.signature(cls.__init__).parameters
        settings = [{key: p.default for key, p in defaults.items() if p.default is not inspect.Parameter.empty}]
    else:
        raise TypeError(f"optimizer must be a name ({known}), a torch.optim class or an instance, got {optimizer!r}")
    base = next((k for k in cls.__mro__ if k.__name__.lower() in OPTIMIZER_STATES), None)
    if base is None:
        raise ValueError(
            f"cannot tell how much state {cls.__name__} keeps per element; known: {known}. Pass the name of "
            "the known optimizer whose state it matches (e.g. 'adamw' for two moments per element)"
        )

    def anywhere(key: str) -> bool:
        return any(bool(group.get(key, False)) for group in settings)

    states = OPTIMIZER_STATES[base.__name__.lower()]
    if base is optim.SGD:
        states = int(anywhere("momentum"))
    elif base in (optim.Adam, optim.AdamW):
        states += int(anywhere("amsgrad"))  # max of the second moments
    elif base is optim.RMSprop:
        states += int(anywhere("momentum")) + int(anywhere("centered"))
    return f"{cls.__name__} ({states} state{'s' if states != 1 else ''} per element)", states


def _human(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:,.2f} {unit}"
    return f"{count:,} B"


# ---------------------------------------------------------------------------------------------- callback
@dataclass(frozen=True)
class ZeroMeasurement:
    """What this rank held after optimizer step ``step``, and the logical bytes its collectives moved in that
    step's window (the micro-batches since the previous step), by kind (see ``collectives.traffic``)."""

    step: int
    held: ModelStateBytes
    traffic: Mapping[str, int]

    def metrics(self, prefix: str = "zero") -> dict[str, float]:
        """Flat metric names for loggers: ``zero/bytes/<kind>`` (with offload also ``device_total`` and
        ``host_<kind>``) and ``zero/comm_bytes/<kind>``."""
        held = self.held
        values = {"parameters": held.parameters, "gradients": held.gradients, "master": held.master,
                  "optimizer_state": held.optimizer_state, "in_flight": held.in_flight, "total": held.total}
        if held.host.total:  # optimizer offload
            values.update(device_total=held.device_total, host_master=held.host.master,
                          host_gradients=held.host.gradients, host_optimizer_state=held.host.optimizer_state)
        out = {f"{prefix}/bytes/{key}": float(value) for key, value in values.items()}
        out.update({f"{prefix}/comm_bytes/{kind}": float(value) for kind, value in sorted(self.traffic.items())})
        out[f"{prefix}/comm_bytes/total"] = float(sum(self.traffic.values()))
        if ACROSS_GROUPS in self.traffic:  # hybrid sharding: what crossed sharding groups, and what stayed inside
            out[f"{prefix}/comm_bytes/across_groups"] = float(self.traffic[ACROSS_GROUPS])
            out[f"{prefix}/comm_bytes/inside_groups"] = float(sum(
                n for kind, n in self.traffic.items() if kind not in (ACROSS_GROUPS, "flags")))
        return out


class ZeroReport(pl.Callback):
    """Prints ZeroStrategy's stage, world size, precision, parameter count and ``estimate_memory`` for the run
    at fit start, logs measured model-state bytes and communication bytes per optimizer step to the
    Trainer's loggers, and prints measured against estimated at fit end. Rank 0 prints and logs.

    ``every_n_steps``: measure after the first optimizer step and every n-th one (default: the Trainer's
    ``log_every_n_steps``). A measurement walks the engine's tensors and reads a counter: no collective,
    so each rank measures itself and rank 0 logs its own numbers (ranks hold the same bytes up to a few
    scalars: every rank owns an equal slice). ``last`` is this rank's latest measurement and ``estimate``
    the run's estimate.
    """

    def __init__(self, every_n_steps: int | None = None, verbose: bool = True) -> None:
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive integer or None, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.verbose = verbose
        self.estimate: MemoryEstimate | None = None
        self.last: ZeroMeasurement | None = None
        self._engine: ZeroEngine | None = None
        self._seen_step = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engines = getattr(trainer.strategy, "engines", None)
        if not engines:
            raise ValueError(
                f"ZeroReport reports on ZeroStrategy, got {type(trainer.strategy).__name__}; use "
                "strategy='zero1', 'zero2' or 'zero3' (or remove the callback)"
            )
        engine = self._engine = engines[0]
        plugin = trainer.strategy.precision_plugin
        policy: PrecisionPolicy = plugin.policy
        default = PrecisionPolicy.from_precision(plugin.precision)
        label = plugin.precision if policy == default else _describe(policy)
        self.last = None
        try:
            if len(engine.optimizers) > 1 or any(engine.whole_params):
                raise ValueError("several optimizers, or whole parameters per rank")
            self.estimate = _estimate(_counts_of_engine(engine), engine.config.stage, engine.world_size, policy,
                                      label, engine.optimizer.optimizer, engine.reduce_policy, engine.config.offload)
        except ValueError as exc:  # measured bytes are still logged
            self.estimate = None
            if self.verbose and trainer.is_global_zero:
                print(f"[ZeroReport] fit start: no estimate for this run ({exc}); measured bytes are logged",
                      flush=True)
            return
        if self.verbose and trainer.is_global_zero:
            print(f"[ZeroReport] fit start (estimate)\n{self.estimate.table()}", flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_step = trainer.global_step  # restored by now when resuming

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._seen_step or self._engine is None:
            return  # a micro-batch inside an accumulation window
        self._seen_step = step
        every = self.every_n_steps or trainer.log_every_n_steps or 1
        if step != 1 and step % every:
            return
        # The engine's own per-step window (also ZeroStrategy.communication() and the benchmarks' numbers).
        self.last = ZeroMeasurement(step, model_state_bytes(self._engine), dict(self._engine.last_step_traffic))
        if trainer.is_global_zero:
            metrics = self.last.metrics()
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.verbose and trainer.is_global_zero):
            return
        if self.estimate is None:
            if self.last is not None:
                print(f"[ZeroReport] fit end (after optimizer step {self.last.step}): "
                      f"{self.last.metrics()}", flush=True)
            return
        if self.last is None:
            print("[ZeroReport] fit end: no optimizer step was measured", flush=True)
            return
        comm = ", ".join(f"{kind} {_human(n)}" for kind, n in sorted(self.last.traffic.items())) or "none"
        if ACROSS_GROUPS in self.last.traffic:
            comm += f" ({_human(self.last.traffic[ACROSS_GROUPS])} of it across sharding groups)"
        print(f"[ZeroReport] fit end (after optimizer step {self.last.step})\n"
              f"{self.estimate.table(self.last.held)}\ncommunication in that step: {comm}", flush=True)
