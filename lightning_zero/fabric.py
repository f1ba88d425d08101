"""ZeRO under Lightning Fabric: ``Fabric(strategy="zero2")`` runs the same engine, options and checkpoint
format as ``Trainer(strategy="zero2")``, for users who write their own loop (litgpt is built on Fabric).
See [Note: routed optimizer calls] in ``routing.py`` for the optimizer's own methods.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Generator, Iterable
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.accelerators import Accelerator
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.plugins.precision import Precision
from lightning.fabric.strategies import DDPStrategy
from lightning.fabric.strategies.strategy import _BackwardSyncControl, _Sharded
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning.fabric.utilities.types import Optimizable
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_zero.checkpoint import (
    CheckpointError,
    ShardedCheckpoint,
    consolidate_checkpoint,
    engine_shards,
    layout_names,
    open_sharded,
    restore_module,
    restore_optimizer,
    save_file_atomically,
    save_sharded,
    saved_entries,
)
from lightning_zero.config import ReducePolicyName, ShardSize
from lightning_zero.options import OPTIONS_DOC, BufferSync, SharedStrategyMethods, StrategyOptions, zero_precision_from
from lightning_zero.precision import ZeroPrecisionCore, cast_floats
from lightning_zero.routing import ALL_METHODS, shard_together
from lightning_zero.sharding.collectives import broadcast_coalesced
from lightning_zero.sharding.engine import ZeroEngine
from lightning_zero.sharding.init import pending_chunks, sharded_init
from lightning_zero.sharding.whereabouts import mark, start_fit

__all__ = ["ZeroFabricPrecision", "ZeroFabricStrategy"]


class ZeroFabricPrecision(ZeroPrecisionCore, Precision):
    __doc__ = f"""Precision plugin for Fabric's ``ZeroFabricStrategy``; ``Fabric(precision=...)`` pairs it
    automatically. ``fabric.clip_gradients`` sees true (unscaled, averaged) gradients; a non-finite loss or
    gradient on any rank skips ``optimizer.step()`` on every rank (fp16: and shrinks the loss scale).

    {ZeroPrecisionCore.__doc__.split(chr(10), 2)[2].strip()}
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._steps: dict[int, int] = {}  # optimizer steps taken, per engine, for messages

    def _engines_of(self, module: Module | None) -> list[ZeroEngine] | None:
        module = _inner(module)
        engines = [engine for engine in self._engines.values() if engine.module is module]
        return engines or None  # None: every engine (a loss whose model was not named)

    @override
    def backward(self, tensor: Tensor, model: Module | None, *args: Any, **kwargs: Any) -> None:
        """Flag a non-finite loss for the named model's step, apply the fp16 loss scale, then backward."""
        self._before_backward(tensor, self._engines_of(model)).backward(*args, **kwargs)

    @override
    def tensor_init_context(self) -> contextlib.AbstractContextManager:
        """``*-true``: tensors and modules are created in the 16-bit dtype, as Fabric's ``HalfPrecision`` creates
        them (no fp32 copy of the model at init); otherwise as created."""
        dtype = self.policy.whole_module_dtype
        return _default_dtype(dtype) if dtype is not None else contextlib.nullcontext()

    @override
    def module_init_context(self) -> contextlib.AbstractContextManager:
        return self.tensor_init_context()

    @override
    def convert_input(self, data: Any) -> Any:
        """Floating inputs in the 16-bit dtype, as Fabric's own ``MixedPrecision`` and ``HalfPrecision`` give
        them (the Trainer's plugin leaves them alone, as Lightning's does)."""
        if self.policy.storage == torch.float32:
            return data
        return cast_floats(data, self.policy.compute or self.policy.storage)

    @override
    def convert_output(self, data: Any) -> Any:
        """Floating outputs back in the default dtype (fp32), as Fabric's own 16-bit plugins give them: a
        loss computed outside the model is then computed as under ``ddp``."""
        if self.policy.storage == torch.float32:
            return data
        return cast_floats(data, torch.get_default_dtype())

    @override
    def optimizer_step(self, optimizer: Optimizable, **kwargs: Any) -> Any:
        """One sharded step of ``optimizer``'s engine: reduce, check, step the slices, gather."""
        closure = kwargs.pop("closure", None)
        if kwargs:
            raise TypeError(f"optimizer.step() under ZeRO takes only a closure, got {sorted(kwargs)}")
        engine = self.engine_for(optimizer)
        done = self._steps.get(id(engine), 0)
        result = self._step_engine(engine, closure or (lambda: None), lambda: None, f"optimizer step {done}",
                                   optimizer)
        self._steps[id(engine)] = done + 1
        return result

    @override
    def unscale_gradients(self, optimizer: Optimizer) -> None:
        return None  # the loss scale is divided out when the gradients are reduced


class _ZeroBackwardSyncControl(_BackwardSyncControl):
    """``fabric.no_backward_sync(model)``: no collective before the boundary under ``reduce_policy="boundary"``
    ("every_micro_batch", stage 2's and 3's default, reduce-scatters every micro-batch by design)."""

    def __init__(self, strategy: ZeroFabricStrategy) -> None:
        self._strategy = strategy

    @override
    def no_backward_sync(self, module: Module, enabled: bool) -> contextlib.AbstractContextManager:
        if not enabled:
            return contextlib.nullcontext()
        engine = self._strategy.engine_of(module)
        if engine is None:
            raise TypeError("fabric.no_backward_sync(model) needs a model set up together with its optimizer "
                            "(fabric.setup(model, optimizer) or fabric.setup_optimizers after setup_module)")
        wrapper = getattr(module, "_forward_module", module)
        return _no_sync(engine, wrapper._sync if isinstance(wrapper, ZeroModule) else None)


@contextlib.contextmanager
def _no_sync(engine: ZeroEngine, sync: BufferSync | None) -> Generator[None, None, None]:
    with engine.no_sync():
        if sync is not None:
            sync.blocking = True
        try:
            yield
        finally:
            if sync is not None:
                sync.blocking = False


class ZeroModule(Module):
    """What ``fabric.setup`` wraps in its ``_FabricModule``: a thin wrapper, as DDP's, so that Fabric routes
    ``training_step`` and other marked methods through ``forward`` (autocast, input conversion) and so that
    rank 0's buffers are broadcast on a forward through Fabric only (DDP's rule), never on a direct call of
    the inner module on some ranks. The engine hooks the inner module, whose names carry no prefix."""

    def __init__(self, module: Module, sync: BufferSync, world_size: int) -> None:
        super().__init__()
        self.module = module
        self._sync = sync
        self._world_size = world_size
        self._warned = False
        #: The engine sharding ``module``, set when its optimizer is set up.
        self.engine: ZeroEngine | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.engine is None:
            self._without_engine()
        self._sync.before(self.module)
        output = self.module(*args, **kwargs)
        self._sync.after(True)
        return output

    def _without_engine(self) -> None:
        if any(p in pending_chunks for p in self.module.parameters()):  # built sharded (stage 3's init_module)
            raise RuntimeError(
                "this model was built sharded (fabric.init_module() under stage 3) and has no optimizer yet: set it "
                "up with its optimizer (fabric.setup(model, optimizer), or fabric.setup_optimizers(optimizer) after "
                "setup_module) before its first forward, or build it outside init_module() for inference"
            )
        if (not self._warned and torch.is_grad_enabled() and self._world_size > 1
                and any(p.requires_grad for p in self.module.parameters())):
            self._warned = True
            rank_zero_warn("this model was set up without an optimizer, so ZeRO reduces none of its gradients: "
                           "set its optimizer up too (fabric.setup_optimizers(optimizer)), or run it under "
                           "torch.no_grad() if it only infers")


class ZeroFabricStrategy(SharedStrategyMethods, DDPStrategy, _Sharded):
    """ZeRO data parallel training under Fabric: stage 1 shards optimizer state, stage 2 also gradients,
    stage 3 also parameters. ``import lightning_zero`` registers the same names as for the Trainer
    (``Fabric(strategy="zero2")``, ``"zero3_offload"``, ...); the options are the Trainer strategy's.

    Launching (``fabric.launch()``, torchrun, SLURM), cluster environments and the process group come from
    Fabric's DDP machinery; the model is not wrapped. Each model set up with its optimizer gets its own engine;
    ``fabric.no_backward_sync(model)`` marks micro-batches that do not step; under stage 3,
    ``fabric.init_module()`` builds the model sharded from the start and ``strategy.gathered_parameters()``
    gives whole weights inside a block. ``fabric.save``/``fabric.load`` write and read the Trainer's sharded
    format, so a Fabric checkpoint resumes in the Trainer and the other way round.

    Args:
        {{options}}
        accelerator, parallel_devices, cluster_environment, checkpoint_io, process_group_backend: as for
            Fabric's ``DDPStrategy``; normally set by Fabric.
        precision: a ``ZeroFabricPrecision``; normally built from ``Fabric(precision=...)``.
    """

    __doc__ = (__doc__ or "").replace("{{options}}", OPTIONS_DOC)

    def __init__(
        self,
        stage: Literal[1, 2, 3] = 2,
        reduce_policy: ReducePolicyName = "auto",
        bucket_numel: int = 2**23,
        allow_unknown_optimizer: bool = False,
        state_dict_type: Literal["sharded", "full"] = "sharded",
        nonfinite: Literal["raise", "skip"] = "raise",
        unit_numel: int | None = None,
        persist_numel: int | None = None,
        offload: Literal["none", "optimizer"] = "none",
        broadcast_buffers: bool = True,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        eval_gather: Literal["unit", "whole"] | None = None,
        check_gathers: bool = False,
        after_fit: Literal["whole", "sharded"] | None = None,
        shard_size: ShardSize = None,
        quantize_gathers: bool = False,
    ) -> None:
        self.options = StrategyOptions.build(
            stage, reduce_policy, bucket_numel, allow_unknown_optimizer, state_dict_type, nonfinite, unit_numel,
            persist_numel, offload, broadcast_buffers, timeout, start_method, eval_gather, check_gathers,
            after_fit, shard_size, quantize_gathers)
        self.config = self.options.config
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision=precision,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self._backward_sync_control = _ZeroBackwardSyncControl(self)
        self.engines: list[ZeroEngine] = []
        self._wrappers: list[ZeroModule] = []  # the models set up, with or without an optimizer yet
        self._checkpoint_group: dist.ProcessGroup | None = None

    # ------------------------------------------------------------------ precision pairing
    @property  # type: ignore[override]
    @override
    def precision(self) -> ZeroFabricPrecision:
        if not isinstance(self._precision, ZeroFabricPrecision):
            self._precision = ZeroFabricPrecision()
        return self._precision

    @precision.setter
    @override
    def precision(self, precision: Precision | None) -> None:
        self._precision = zero_precision_from(precision, ZeroFabricPrecision, "ZeroFabricStrategy")

    # ------------------------------------------------------------------ setup
    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        start_fit()
        self.precision.device_type = self.root_device.type
        self.precision.nonfinite = self.options.nonfinite
        self._joined()

    @override
    def setup_module_and_optimizers(
        self, module: Module, optimizers: list[Optimizer], scheduler: Any | None = None
    ) -> tuple[Module, list[Optimizer], Any | None]:
        module = self.setup_module(module)
        if len(optimizers) > 1:  # one engine for them all (see [Note: several optimizers])
            self._shard(self._wrappers[-1], optimizers)
            return module, optimizers, scheduler
        return module, [self.setup_optimizer(optimizer) for optimizer in optimizers], scheduler

    @override
    def setup_module(self, module: Module) -> Module:
        """Wrap ``module`` thinly (``ZeroModule``); its engine is built with its optimizer. Every rank takes
        rank 0's weights and buffers, as DDP's wrapper does."""
        if self.world_size > 1 and not any(p in pending_chunks for p in module.parameters()):
            with torch.no_grad():
                broadcast_coalesced([*module.parameters(), *module.buffers()], None)
        wrapper = ZeroModule(module, BufferSync(self.options.broadcast_buffers, self.world_size), self.world_size)
        self._wrappers.append(wrapper)
        return wrapper

    @override
    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """Shard ``optimizer`` with the model set up earlier whose parameters it holds."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        owners = [w for w in self._wrappers if any(id(p) in held for p in w.module.parameters())]
        if not owners:
            raise ValueError(
                "this optimizer holds no parameter of a model set up with Fabric: call fabric.setup(model, optimizer)"
                ", or fabric.setup_module(model) before fabric.setup_optimizers(optimizer)"
            )
        if len(owners) > 1:
            raise ValueError(
                f"this optimizer holds parameters of {len(owners)} models set up separately, and ZeRO shards one "
                "model per optimizer: put them in one module (e.g. torch.nn.ModuleDict) set up together, or give "
                "each model its own optimizer"
            )
        wrapper = owners[0]
        if wrapper.engine is not None:
            raise ValueError(
                "this model already has an optimizer: ZeRO shards a model's optimizers together, so pass them all "
                "at once, fabric.setup(model, optimizer_a, optimizer_b)"
            )
        self._shard(wrapper, [optimizer])
        return optimizer

    def _shard(self, wrapper: ZeroModule, optimizers: list[Optimizer]) -> None:
        wrapper.engine = shard_together(wrapper.module, optimizers, self.config, self.precision, ALL_METHODS)
        self.engines.append(wrapper.engine)

    def engine_of(self, module: Module) -> ZeroEngine | None:
        """The engine sharding ``module`` (None before its optimizer is set up)."""
        module = _inner(module)
        return next((engine for engine in self.engines if engine.module is module), None)

    @override
    def module_init_context(self, empty_init: bool | None = None) -> contextlib.AbstractContextManager:
        """Stage 3: modules built inside keep only this rank's chunk of their weights from the moment each is
        built, initialised exactly as without sharding (``empty_init`` is moot). Stages 1-2: as DDP."""
        if self.config.stage < 3:
            return super().module_init_context(empty_init)
        stack = contextlib.ExitStack()
        stack.enter_context(self.root_device)
        stack.enter_context(self.precision.module_init_context())
        stack.enter_context(sharded_init())
        return stack

    @override
    def module_sharded_context(self) -> contextlib.AbstractContextManager:
        return self.module_init_context()

    # ------------------------------------------------------------------ gradients
    @override
    def clip_gradients_norm(self, module: Module, optimizer: Optimizer, max_norm: float | int,
                            norm_type: float | int = 2.0, error_if_nonfinite: bool = True) -> Tensor:
        """Clip the global norm over every rank's gradient shards; return the norm before clipping."""
        engine = self.precision.engine_for(optimizer)
        which = engine.index_of(optimizer)
        if error_if_nonfinite:  # as torch's clip_grad_norm_: check before clipping (one host read)
            total = engine.grad_norm(float(norm_type), which)
            if not torch.isfinite(total):
                raise RuntimeError(
                    f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, so "
                    "it cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
                    "anyway, set `error_if_nonfinite=False`"
                )
        return engine.clip_grad_norm_(float(max_norm), float(norm_type), which)

    @override
    def clip_gradients_value(self, module: Module, optimizer: Optimizer, clip_val: float | int) -> None:
        engine = self.precision.engine_for(optimizer)
        engine.clip_grad_value_(float(clip_val), engine.index_of(optimizer))

    def gathered_parameters(
        self, params: Iterable[torch.nn.Parameter] | None = None, modifier_rank: int | None = None
    ) -> contextlib.AbstractContextManager[list[torch.nn.Parameter]]:
        """Whole values of ``params`` (default: every sharded parameter) inside the block on every rank, like
        DeepSpeed's ``GatheredParameters``; with ``modifier_rank`` changes made on that rank are written back
        to every rank's slices on exit. A collective."""
        return _gathered(self.engines, None if params is None else list(params), modifier_rank)

    @contextlib.contextmanager
    def evaluation(self, module: Module) -> Generator[None, None, None]:
        """Stage 3: ``module``'s forward calls inside the block run as in the Trainer's evaluation loops
        (``eval_gather``), so ranks may make different numbers of them (uneven last batches, generation of
        different lengths); leaving the block waits until every rank has left it (a collective). Other
        stages, or a module without an engine: no effect."""
        engine = self.engine_of(module)
        if engine is None:
            yield
            return
        engine.begin_evaluation()
        try:
            yield
        finally:
            engine.finish_evaluation()

    # ------------------------------------------------------------------ checkpoints
    # [Note: one format for the Trainer and Fabric] in ``lightning_zero/checkpoint.py``.
    @override
    def get_module_state_dict(self, module: Module) -> dict[str, Any]:
        """The module's state with whole master-precision weights (a collective while it is sharded)."""
        module = _inner(module)
        state = module.state_dict()
        engine = self.engine_of(module)
        if engine is not None and engine.holds_sharded_values:
            state.update(engine.full_params())
        return state

    @override
    def get_optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """A sharded optimizer's whole state keyed by parameter name, on every rank (a collective); any other
        optimizer's as under ``ddp``."""
        if id(getattr(optimizer, "_optimizer", optimizer)) not in self.precision._engines:
            return super().get_optimizer_state(optimizer)
        engine = self.precision.engine_for(optimizer)
        return engine.sharded(optimizer).full_state_dict(engine.group)

    @override
    def load_module_state_dict(self, module: Module, state_dict: dict[str, Any], strict: bool = True) -> None:
        _inner(module).load_state_dict(state_dict, strict=strict)

    @override
    def save_checkpoint(
        self,
        path: str | os.PathLike[str],
        state: dict[str, Module | Optimizer | Any],
        storage_options: Any | None = None,
        filter: dict[str, Callable[[str, Any], bool]] | None = None,
    ) -> None:
        """"sharded": a directory every rank writes its slices into, committed atomically (a collective: call
        it on every rank); "full", or before launch: one file written by rank 0, atomically."""
        if storage_options is not None:
            raise TypeError("ZeroFabricStrategy.save_checkpoint takes no storage_options; it writes files itself")
        mark("save")
        launched = dist.is_available() and dist.is_initialized()
        sharded = [(key, self.engine_of(obj)) for key, obj in state.items()
                   if isinstance(obj, Module) and self.engine_of(obj) is not None]
        optimizers = {key: self.precision.engine_for(obj) for key, obj in state.items()
                      if isinstance(obj, Optimizer) and id(obj) in self.precision._engines}
        if self.options.state_dict_type == "full" or not launched or not (sharded or optimizers):
            converted = self._convert_stateful_objects_in_state(state, filter=filter or {})
            if self.is_global_zero:
                save_file_atomically(converted, path)
            return
        engines = {id(engine): engine for _, engine in sharded} | {id(e): e for e in optimizers.values()}
        if len(engines) > 1:
            raise ValueError(
                "a sharded checkpoint holds one sharded model and its optimizer, and this state holds "
                f"{len(engines)}: save each model with its optimizer to its own path, or use "
                "ZeroFabricStrategy(state_dict_type='full')"
            )
        engine = next(iter(engines.values()))
        module_key = next((key for key, e in sharded if e is engine), None)
        keys = [key for key, e in optimizers.items() if e is engine]
        optimizer_key: str | list[str] | None = keys[0] if len(keys) == 1 else keys or None
        if filter and (module_key in filter or any(key in filter for key in keys)):
            raise ValueError(
                f"fabric.save(filter=...) on the sharded model or optimizer ({module_key!r}, {optimizer_key!r}) needs "
                "whole tensors: use ZeroFabricStrategy(state_dict_type='full'), or drop the filter for those keys"
            )
        names = layout_names([engine])
        rest = {key: obj for key, obj in state.items() if key != module_key and key not in keys}
        meta = self._convert_stateful_objects_in_state(rest, filter=filter or {})
        if module_key is not None:
            meta[module_key] = {k: v for k, v in engine.module.state_dict().items() if k not in names}
        for key in keys:
            meta[key] = {"lightning_zero": "sharded", "param_groups": engine.sharded(state[key]).param_groups()}
        local, manifest = engine_shards(engine, self.config.stage, bool(keys),
                                        entries={"module": module_key, "optimizer": optimizer_key})
        save_sharded(path, local, meta if self.is_global_zero else None, self._checkpoint_group,
                     self._timeout or default_pg_timeout, manifest)

    @override
    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        state: Module | Optimizer | dict[str, Module | Optimizer | Any] | None = None,
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Restore ``state``'s objects from a sharded directory (saved by Fabric or the Trainer, on any world size
        and stage) or a file (saved by ZeRO "full" or ``ddp``); with no ``state``, return the checkpoint whole."""
        mark("load")
        shards: ShardedCheckpoint | None = None
        if os.path.isdir(path):
            shards = open_sharded(path, self.global_rank, self.world_size, self._checkpoint_group)
            if not state:
                return consolidate_checkpoint(path, optimizer=shards.has_optimizer, weights_only=bool(weights_only))
            checkpoint = shards.load_meta(weights_only=bool(weights_only))
            entries = saved_entries(shards.manifest)
        else:
            checkpoint = self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)
            if not state:
                return checkpoint
            trainer_file = "pytorch-lightning_version" in checkpoint and "state_dict" in checkpoint
            entries = saved_entries({}) if trainer_file else {"module": None, "optimizer": None}
        if isinstance(state, (Module, Optimizer)):  # fabric.load_raw: the checkpoint is that object's state
            kind = "module" if isinstance(state, Module) else "optimizer"
            key = entries.get(kind)
            if isinstance(key, list):
                raise CheckpointError(f"{os.fspath(path)} holds {len(key)} optimizers ({key}): load them together, "
                                      "fabric.load(path, {name: optimizer, ...}) with those names")
            if key is not None and key not in checkpoint:
                raise CheckpointError(f"{os.fspath(path)} holds no {kind} state (no {key!r} entry)")
            entry = checkpoint[key] if key is not None else checkpoint
            self._restore(state, _first(entry), shards, strict, whole_from_shards=True)
            return {}
        # A key the checkpoint lacks maps onto the Trainer's entry when the checkpoint is the Trainer's and this
        # state asks for one model (one optimizer): a Trainer checkpoint loads into {"model":..., "optimizer":...}.
        trainer_saved = entries == saved_entries({})
        objects = [key for key, obj in state.items() if isinstance(obj, (Module, Optimizer))]
        source_of: dict[str, str] = {}
        for key in objects:
            kind = "module" if isinstance(state[key], Module) else "optimizer"
            saved = entries.get(kind)
            alone = sum(isinstance(state[k], Module) == (kind == "module") for k in objects) == 1
            remap = trainer_saved and key not in checkpoint and alone and saved in checkpoint
            source_of[key] = str(saved) if remap else key
        missing = [key for key in state if source_of.get(key, key) not in checkpoint]
        if strict and missing:
            raise KeyError(f"The requested state contains keys {missing} that do not exist in the loaded "
                           f"checkpoint {os.fspath(path)!r} (it holds {sorted(checkpoint)}); pass strict=False to "
                           "skip them")
        for key, obj in state.copy().items():
            source = source_of.get(key, key)
            if source not in checkpoint:
                continue
            if key in source_of:
                self._restore(obj, _first(checkpoint.pop(source)), shards, strict,
                              whole_from_shards=source == entries.get("module"))
            elif hasattr(obj, "load_state_dict") and hasattr(obj, "state_dict"):
                obj.load_state_dict(checkpoint.pop(source))
            else:
                state[key] = checkpoint.pop(source)
        return checkpoint

    def _restore(self, obj: Module | Optimizer, entry: Any, shards: ShardedCheckpoint | None, strict: bool,
                 whole_from_shards: bool) -> None:
        """Load ``entry`` into ``obj``; the shards' weights go only to the module they were saved from."""
        if isinstance(obj, Module):
            restore_module(_inner(obj), self.engine_of(obj), entry, shards if whole_from_shards else None, strict)
            return
        if id(obj) not in self.precision._engines:
            if shards is not None and isinstance(entry, dict) and entry.get("lightning_zero") == "sharded":
                raise CheckpointError("a sharded checkpoint's optimizer state loads only into an optimizer set up "
                                      "with its model (fabric.setup(model, optimizer))")
            obj.load_state_dict(entry)
            return
        engine = self.precision.engine_for(obj)
        restore_optimizer(engine, entry, shards, engine.index_of(obj))

    # ------------------------------------------------------------------ teardown and names
    @override
    def teardown(self) -> None:
        """Give every sharded model whole weights (master precision) and unhook it (a collective), or, with
        ``after_fit="sharded"``, leave it sharded and hooked. The engines stay, so a ``fabric.save``
        afterwards still writes the optimizer state, as in the Trainer."""
        if self.options.after_fit == "whole":
            for engine in self.engines:
                engine.materialize_module()
                engine.close()
        super().teardown()


@contextlib.contextmanager
def _gathered(engines: list[ZeroEngine], chosen: list[torch.nn.Parameter] | None,
              modifier_rank: int | None) -> Generator[list[torch.nn.Parameter], None, None]:
    gathered: list[torch.nn.Parameter] = []
    with contextlib.ExitStack() as stack:
        for engine in engines:
            own = None if chosen is None else [p for p in chosen if any(p is q for q in engine.params)]
            if own is None or own:
                gathered += stack.enter_context(engine.gathered_parameters(own, modifier_rank))
        yield gathered


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Generator[None, None, None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _inner(module: Any) -> Any:
    """The user's module behind Fabric's ``_FabricModule`` and this strategy's ``ZeroModule``."""
    module = getattr(module, "_forward_module", module)
    return module.module if isinstance(module, ZeroModule) else module


def _first(entry: Any) -> Any:
    """The Trainer keeps optimizer states in a list, one per optimizer; Fabric keeps one."""
    return entry[0] if isinstance(entry, list) and len(entry) == 1 else entry

