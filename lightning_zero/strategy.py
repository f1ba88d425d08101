"""ZeroStrategy: Lightning lifecycle glue around the sharding engine (setup, accumulation, checkpoint
hooks, registration). The ZeRO mechanics live in ``lightning_zero.sharding``."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Generator, Mapping
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.distributed import ProcessGroup
from torch.optim import Optimizer
from typing_extensions import override

from lightning_zero.checkpoint import (
    CheckpointError,
    as_trainer_checkpoint,
    engine_shards,
    fill_from_shards,
    layout_names,
    open_sharded,
    restore_module,
    restore_optimizer,
    save_file_atomically,
    save_sharded,
)
from lightning_zero.config import ReducePolicyName, ShardSize
from lightning_zero.options import (
    OPTIONS_DOC,
    BufferSync,
    SharedStrategyMethods,
    StrategyOptions,
    end_child_ranks,
    zero_precision_from,
)
from lightning_zero.precision import ZeroPrecision
from lightning_zero.routing import shard_together
from lightning_zero.sharding.collectives import CollectiveError, wait_all
from lightning_zero.sharding.engine import ZeroEngine
from lightning_zero.sharding.init import sharded_init
from lightning_zero.sharding.whereabouts import mark, publish, start_fit

__all__ = ["ZeroStrategy"]

_SHARDS = "_lightning_zero_sharded_checkpoint"  # the open ShardedCheckpoint, in a loaded checkpoint dict


def _refuse_callbacks_zero_cannot_follow(callbacks: list[pl.Callback], stage: int) -> None:
    """Refuse at setup, on every rank and naming what to use instead, Lightning's callbacks that would train
    something else than ``ddp`` does: under stage 3 those that read or rewrite every parameter between
    steps (a parameter is whole only inside its unit's forward and backward); under any stage
    ``ModelPruning``'s lottery-ticket reset, which replaces each parameter's ``.data`` (ZeRO trains the
    flat buffers the parameters were views of, so the reset weights would never be trained)."""
    from lightning.pytorch.callbacks import ModelPruning, StochasticWeightAveraging

    instead: dict[type, str] = {
        StochasticWeightAveraging: "zero1 or zero2, which run it as ddp does",
        ModelPruning: "zero1 or zero2 with ModelPruning(..., use_lottery_ticket_hypothesis=False), which prune as "
                      "ddp does",
    }
    with contextlib.suppress(ImportError):
        from lightning.pytorch.callbacks import WeightAveraging

        instead[WeightAveraging] = "zero1 or zero2, which average and resume as ddp does"
    for callback in callbacks:
        if stage < 3:
            if isinstance(callback, ModelPruning) and getattr(callback, "_use_lottery_ticket_hypothesis", False):
                raise ValueError(
                    "ModelPruning(use_lottery_ticket_hypothesis=True), its default, resets the kept weights by "
                    "replacing each parameter's .data, which ZeRO cannot follow (its flat buffers would keep training "
                    "the old values, unlike ddp): pass use_lottery_ticket_hypothesis=False, which prunes as ddp does"
                )
            continue
        for kind, fix in instead.items():
            if isinstance(callback, kind):
                raise ValueError(
                    f"{type(callback).__name__} reads and rewrites the model's parameters between steps, where ZeRO "
                    f"stage 3 keeps only each rank's slice (the parameters are empty tensors there): use {fix}"
                )



def _toggle_through(module: pl.LightningModule, engine: ZeroEngine) -> None:
    """Lightning's ``toggle_optimizer`` flips ``requires_grad`` of the tensors in the optimizer's param groups,
    which ZeRO re-pointed at this rank's slices: route it (and ``untoggle_optimizer``) to the engine, which
    flips the module's own parameters. A module that overrides them keeps its own."""
    if type(module).toggle_optimizer is pl.LightningModule.toggle_optimizer:
        module.toggle_optimizer = lambda optimizer: engine.toggle(engine.index_of(optimizer))  # type: ignore[method-assign]
    if type(module).untoggle_optimizer is pl.LightningModule.untoggle_optimizer:
        module.untoggle_optimizer = lambda optimizer: engine.untoggle()  # type: ignore[method-assign]


def _finetuning_through(callbacks: list[Any]) -> None:
    """Lightning's ``BaseFinetuning`` records each param group's parameters by looking them up among the
    module's, and ZeRO's param groups hold this rank's slices: hand it the groups with the module's own
    parameters instead (the names it records are then those of the whole groups, equal on every rank)."""
    for callback in callbacks:
        if isinstance(callback, BaseFinetuning) and "_store" not in callback.__dict__:
            store = callback._store

            def translated(pl_module: Any, opt_idx: int, num_param_groups: int, groups: list[dict[str, Any]],
                           store: Callable[..., None] = store) -> None:
                engine = pl_module.trainer.strategy.engines[0]
                store(pl_module, opt_idx, num_param_groups, engine.module_param_groups(groups))

            callback._store = translated  # type: ignore[method-assign]


class ZeroStrategy(SharedStrategyMethods, DDPStrategy):
    """ZeRO data parallel training: stage 1 shards optimizer state, stage 2 also gradients, stage 3 also
    parameters (gathered just in time around each unit's forward and backward).

    Launching, cluster environments, ``num_nodes`` and the process group come from Lightning's DDP
    machinery (subprocess, spawn and fork launchers; torchrun and SLURM); the model is not wrapped.
    Lightning's ``accumulate_grad_batches`` decides the reduction boundary through
    ``block_backward_sync()``; ``reduce_policy`` decides whether micro-batches before it reduce too.

    Args:
        {options}
        accelerator: as for ``DDPStrategy``; normally set by the Trainer.
        parallel_devices: as for ``DDPStrategy``; normally set by the Trainer from ``devices``.
        cluster_environment: as for ``DDPStrategy`` (torchrun, SLURM, ...); normally detected.
        checkpoint_io: used only for single-file checkpoints (loading ``ddp`` files); sharded ones are
            written by the strategy.
        precision_plugin: a ``ZeroPrecision``; normally built from ``Trainer(precision=...)``.
        process_group_backend: "nccl" or "gloo"; by default from the device.
    """

    __doc__ = (__doc__ or "").format(options=OPTIONS_DOC)
    strategy_name = "zero"
    pairs_with_zero_precision = True  # what ZeroPrecision checks, without importing this module

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
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
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
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.state_dict_type = self.options.state_dict_type
        self.nonfinite = self.options.nonfinite
        self.broadcast_buffers = self.options.broadcast_buffers
        self._buffers = BufferSync(self.broadcast_buffers, 1)  # see [Note: buffers as under ddp]
        self.engines: list[ZeroEngine] = []
        self._checkpoint_group: ProcessGroup | None = None
        self._kept_sharded = False  # the engines still shard the module after fit (after_fit="sharded")

    # ------------------------------------------------------------------ precision pairing
    @property  # type: ignore[override]
    @override
    def precision_plugin(self) -> ZeroPrecision:
        if not isinstance(self._precision_plugin, ZeroPrecision):
            self._precision_plugin = ZeroPrecision()
        return self._precision_plugin

    @precision_plugin.setter
    @override
    def precision_plugin(self, plugin: Precision | None) -> None:
        self._precision_plugin = zero_precision_from(plugin, ZeroPrecision, "ZeroStrategy")

    # ------------------------------------------------------------------ setup
    @override
    def setup_distributed(self) -> None:
        super().setup_distributed()
        self._joined()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        if self.config.stage == 3 and self.config.eval_gather == "unit":
            self._finish_evaluation_before_metric_sync(trainer)
        # After fit with after_fit="sharded" the engines still shard the module: evaluating it reuses them
        # (per unit, never whole); a new fit rebuilds them from whole weights.
        reuse = self._kept_sharded and trainer.state.fn != TrainerFn.FITTING and all(
            engine.module is self.lightning_module for engine in self.engines)
        if self._kept_sharded and not reuse:
            for engine in self.engines:
                engine.materialize_module()
        if not reuse:
            self._release_engines()
            self._kept_sharded = False
        start_fit()
        self._buffers = BufferSync(self.broadcast_buffers, self.world_size)
        precision = self.precision_plugin
        precision.device_type = self.root_device.type
        precision.nonfinite = self.nonfinite
        if trainer.state.fn == TrainerFn.FITTING and self._layer_sync:
            if self.root_device.type not in ("cuda", "xpu"):
                raise ValueError(
                    f"Trainer(sync_batchnorm=True) converts BatchNorm layers to torch's SyncBatchNorm, which runs only "
                    f"on CUDA or XPU devices, not {self.root_device.type}: drop sync_batchnorm=True here (rank 0's "
                    "buffers are still broadcast as under ddp: broadcast_buffers=True)"
                )
            self.model = self._layer_sync.apply(self.model)
        self.model = precision.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            _refuse_callbacks_zero_cannot_follow(trainer.callbacks, self.config.stage)
            self.setup_optimizers(trainer)
            self._shard_optimizers()
        else:
            from lightning.pytorch.strategies.ddp import _sync_module_states

            _sync_module_states(self.model)
        self.setup_precision_plugin()

    def _shard_optimizers(self) -> None:
        assert self.lightning_module is not None
        from torch._dynamo.eval_frame import OptimizedModule

        compiled = getattr(self.lightning_module, "_compiler_ctx", None) is not None or any(
            isinstance(m, OptimizedModule) for m in self.lightning_module.modules())
        if compiled and self.config.stage == 3:
            raise ValueError(
                "torch.compile does not work with ZeRO stage 3 yet: stage 3 swaps parameter storage around every "
                "unit's forward and backward, which compiled graphs do not allow. Use stage 1 or 2 with "
                "torch.compile (tested), or stage 3 without it."
            )
        several = len(self.optimizers) > 1  # then each optimizer's zero_grad() clears its own gradients
        engine = shard_together(self.lightning_module, self.optimizers, self.config, self.precision_plugin,
                                ("zero_grad",) if several else ())
        if several:
            self.optimizers = self.optimizers  # Lightning's wrappers take the routed classes
            _toggle_through(self.lightning_module, engine)
        _finetuning_through(self.lightning_module.trainer.callbacks)
        self.engines.append(engine)

    def _release_engines(self) -> None:
        for engine in self.engines:
            for name in ("toggle_optimizer", "untoggle_optimizer"):
                engine.module.__dict__.pop(name, None)
            engine.close()
        self.engines.clear()
        if isinstance(self._precision_plugin, ZeroPrecision):
            self._precision_plugin.release()

    @contextlib.contextmanager
    @override
    def model_sharded_context(self) -> Generator[None, None, None]:
        """Stage 3: modules built in ``configure_model()`` keep only this rank's chunk of their weights
        from the moment each is built; ``self.apply(init_fn)`` still sees whole weights per module."""
        module = self.lightning_module
        fitting = module is not None and module._trainer is not None and (
            module._trainer.state.fn == TrainerFn.FITTING)
        if self.config.stage < 3 or not fitting:  # only fit has an engine to assemble the chunks
            yield
            return
        with sharded_init():
            yield

    @override
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # ZeRO needs no wrapper: the engine hooks the parameters themselves

    @override
    def configure_ddp(self) -> None:
        return None

    # ------------------------------------------------------------------ training
    @contextlib.contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Lightning enters this on micro-batches that do not step: reduce nothing there ("boundary")."""
        with contextlib.ExitStack() as stack:
            for engine in self.engines:
                stack.enter_context(engine.no_sync())
            self._buffers.blocking = True
            try:
                yield
            finally:
                self._buffers.blocking = False

    # [Note: buffers as under ddp] DDP broadcasts rank 0's buffers at the start of a forward when the forward
    # before it ran with gradients and with gradient sync (its ``require_forward_param_sync``): so before the
    # first validation forward after training, and before a training forward that follows one, but not
    # before the training forward after validation, nor after a micro-batch inside ``no_sync``. Matching
    # that rule is what makes BatchNorm statistics, and validation metrics, equal ``ddp``'s.
    def _through_buffers(self, step: Callable[..., Any], training: bool, *args: Any, **kwargs: Any) -> Any:
        self._buffers.before(self.lightning_module)
        output = step(*args, **kwargs)
        self._buffers.after(training)
        return output

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        batch = args[1] if len(args) > 1 and isinstance(args[1], int) else kwargs.get("batch_idx")
        mark("forward", step=trainer.global_step if trainer is not None else None, batch=batch)
        self._replan_if_needed()
        return self._through_buffers(super().training_step, True, *args, **kwargs)

    def _replan_if_needed(self) -> None:
        """Between steps: plan the buckets anew when the param groups or the trainable set changed (see
        [Note: re-planning]); inside a window the step's own checks name the change instead."""
        for engine in self.engines:
            reason = engine.needs_replan()
            if reason is not None and not engine.window_open:
                rank_zero_info(f"lightning-zero: planning the buckets anew: {reason}")
                engine.replan()

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        mark("validation")
        return self._through_buffers(super().validation_step, False, *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        mark("test")
        return self._through_buffers(super().test_step, False, *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._through_buffers(super().predict_step, False, *args, **kwargs)

    def gathered_parameters(
        self, params: Any = None, modifier_rank: int | None = None
    ) -> contextlib.AbstractContextManager[list[torch.nn.Parameter]]:
        """Whole values of ``params`` (default: all) inside the block on every rank, like DeepSpeed's
        ``GatheredParameters``; with ``modifier_rank`` changes made on that rank are written back to every
        rank's slices on exit. A collective while fitting; outside fit the module is whole already."""
        if not self.engines:
            return contextlib.nullcontext(list(params) if params is not None else [])
        return self.engines[0].gathered_parameters(params, modifier_rank)

    def communication(self) -> dict[str, int]:
        """Logical bytes by collective kind (reduce_scatter, all_gather, all_reduce, broadcast; flags for the
        step's control exchange; all_reduce_across for what crosses sharding groups under ``shard_size``) that
        this rank's last optimizer step moved, its micro-batches included; the numbers ``ZeroReport`` and the
        benchmarks read. Logical as the ZeRO paper counts (a reduce-scatter or an all-gather: its full buffer)."""
        return dict(self.engines[0].last_step_traffic) if self.engines else {}

    def grad_norm(self, norm_type: float = 2.0, optimizer: Any = None) -> torch.Tensor:
        """Global norm of the (reduced, averaged) gradient; a collective, for ``on_before_optimizer_step``.
        With several optimizers: that of ``optimizer``'s parameters, by default the one stepping."""
        if not self.engines:
            raise RuntimeError("grad_norm() is available while fitting, once the optimizer is set up")
        engine = self.engines[0]
        which = engine.index_of(optimizer) if optimizer is not None else self.precision_plugin.stepping
        return engine.grad_norm(norm_type, which)

    # ------------------------------------------------------------------ checkpoints
    # [Note: sharded checkpoint layout and commit] in ``lightning_zero/checkpoint.py`` has the format.
    @property
    def _sharded_save(self) -> bool:
        return self.state_dict_type == "sharded"

    def _layout_names(self) -> set[str]:
        return layout_names(self.engines)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """"full": the module's state with whole master-precision weights (fp32 under ``*-mixed``) on rank 0,
        which writes the file, gathered one bucket at a time into its host memory (a collective while engines
        hold the masters; the other ranks keep no whole copy). "sharded": only what the engines do not hold (buffers),
        with no collective; the engines' slices go to each rank's file in ``save_checkpoint``."""
        assert self.lightning_module is not None
        state = self.lightning_module.state_dict()
        if self._sharded_save:
            names = self._layout_names()
            return {key: value for key, value in state.items() if key not in names}
        for engine in self.engines:
            if engine.holds_sharded_values:
                state.update(engine.full_params(rank=0))  # only rank 0 writes the file
        return state

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """"full": the whole optimizer state keyed by parameter name, on rank 0 (a collective). "sharded": a marker;
        each rank's slices are written by ``save_checkpoint``."""
        engine = self.precision_plugin.engine_for(optimizer)
        sharded = engine.sharded(optimizer)
        if self._sharded_save:
            return {"lightning_zero": "sharded", "param_groups": sharded.param_groups()}
        return sharded.full_state_dict(engine.group, rank=engine.keeper(0))  # only rank 0 writes the file

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` atomically: "sharded", a directory every rank writes its slices into (a
        collective: call it on every rank); "full", or before the processes are launched (``save_checkpoint``
        before ``fit``, as under ``ddp``), one file written by rank 0."""
        if storage_options is not None:
            raise TypeError("ZeroStrategy.save_checkpoint takes no storage_options; it writes files itself")
        mark("save")
        launched = dist.is_available() and dist.is_initialized()
        if not self._sharded_save or not launched:  # before fit the module is whole here: one file, as ddp
            if self.is_global_zero:
                save_file_atomically(checkpoint, filepath)
            return
        engine = self.engines[0] if self.engines else None
        local, manifest = engine_shards(engine, self.config.stage, "optimizer_states" in checkpoint)
        save_sharded(filepath, local, checkpoint if self.is_global_zero else None, self._checkpoint_group,
                     self._timeout or default_pg_timeout, manifest)

    @override
    def remove_checkpoint(self, filepath: str | os.PathLike[str]) -> None:
        """Rank 0 removes a checkpoint, file or sharded directory (``ModelCheckpoint``'s rotation)."""
        if self.is_global_zero:
            if os.path.isdir(filepath) and not os.path.islink(filepath):
                shutil.rmtree(filepath)
            elif os.path.lexists(filepath):
                os.remove(filepath)

    @override
    def load_checkpoint(
        self, checkpoint_path: str | os.PathLike[str], weights_only: bool | None = None
    ) -> dict[str, Any]:
        """A plain file loads as with ``ddp``; a sharded directory is checked on every rank first (each
        rank checks the CRCs of a share of the files; any failure raises on every rank) and read lazily."""
        if not os.path.isdir(checkpoint_path):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        checkpoint = open_sharded(checkpoint_path, self.global_rank, self.world_size, self._checkpoint_group)
        loaded = as_trainer_checkpoint(checkpoint.load_meta(weights_only=bool(weights_only)), checkpoint.manifest)
        if "entries" in checkpoint.manifest:  # saved by Fabric: weights and optimizer state, no loops or schedulers
            loaded.setdefault("pytorch-lightning_version", pl.__version__)
            if "optimizer_states" in loaded:
                loaded.setdefault("lr_schedulers", [])
        # Stages 1-2 restore before setup into the whole module: the user's ``on_load_checkpoint`` then sees
        # (and may edit) the whole state, as under ddp. A weight-averaging callback reads the module's own
        # state from ``current_model_state``, under any stage.
        if self.config.stage < 3 or "current_model_state" in loaded:
            fill_from_shards(loaded, checkpoint.whole_params())
        loaded[_SHARDS] = checkpoint
        return loaded

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        """Stages 1-2 restore the weights before setup, into the whole module, so the user's hooks run in
        ``ddp``'s order (``on_load_checkpoint`` before ``configure_optimizers``). Stage 3 restores after
        setup, into the engine's slices: its module may never hold whole parameters (``sharded_init``), as
        with Lightning's own FSDP and DeepSpeed strategies."""
        return self.config.stage == 3

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        assert self.lightning_module is not None
        live = [engine for engine in self.engines if engine.module is self.lightning_module]
        # Without an engine (before setup, or a run without an optimizer) the module loads whole; stages 1-2
        # have the shards' weights in the state dict already (``load_checkpoint``).
        restore_module(self.lightning_module, live[0] if live else None, checkpoint["state_dict"],
                       checkpoint.get(_SHARDS), strict, fill_whole=self.config.stage == 3)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        # Lightning restores callbacks after this strategy's setup (restore_checkpoint_after_setup), so
        # BaseFinetuning's on_fit_start found nothing to restore: it brings its param groups back now, and the
        # buckets are planned for them before their state loads.
        trainer = self.lightning_module.trainer
        for callback in trainer.callbacks:
            if isinstance(callback, BaseFinetuning) and callback._restarting:
                callback.on_fit_start(trainer, self.lightning_module)
        self._replan_if_needed()
        states = checkpoint["optimizer_states"]
        if states and len(states) != len(self.optimizers):  # none: saved before fit, as ddp allows
            raise CheckpointError(f"the checkpoint holds the state of {len(states)} optimizer(s), and "
                                  f"configure_optimizers() returned {len(self.optimizers)}: resume with the same "
                                  "optimizers, or load the weights only")
        for optimizer, state in zip(self.optimizers, states):
            engine = self.precision_plugin.engine_for(optimizer)
            restore_optimizer(engine, state, checkpoint.get(_SHARDS), engine.index_of(optimizer))

    # ------------------------------------------------------------------ evaluation loops
    # Stage 3 gathers per unit in evaluation too, each unit's forward agreed with the other ranks, so ranks
    # that run different numbers of forward calls (uneven last batches, generation of different lengths)
    # never wait on each other (see [Note: agreed gathers]).
    @override
    def on_validation_start(self) -> None:
        for engine in self.engines:
            engine.begin_evaluation()

    def finish_evaluation(self) -> None:
        """This rank's evaluation forwards are done: take part in the others' gathers until every rank's
        are (a collective), then back to slices."""
        for engine in self.engines:
            engine.finish_evaluation()

    @override
    def on_validation_end(self) -> None:
        self.finish_evaluation()

    on_test_start = on_predict_start = on_validation_start
    on_test_end = on_predict_end = on_validation_end

    def _finish_evaluation_before_metric_sync(self, trainer: pl.Trainer) -> None:
        """A validation or test loop synchronises the logged metrics (a collective) as soon as a dataloader
        is exhausted on this rank (``_store_dataloader_outputs``), before any hook runs: a rank whose batches
        are done must serve the others' gathers before that, and begin again for the next dataloader or
        the epoch-end hooks. The predict loop synchronises nothing: ``on_predict_end`` serves."""
        loops = (trainer.fit_loop.epoch_loop.val_loop, trainer.validate_loop, trainer.test_loop)
        for loop in loops:
            store = getattr(loop, "_store_dataloader_outputs", None)
            if store is None or getattr(store, "lightning_zero", False):
                continue

            def finish_first(store: Callable[[], None] = store) -> None:
                self.finish_evaluation()
                store()
                for engine in self.engines:
                    engine.begin_evaluation()

            finish_first.lightning_zero = True  # type: ignore[attr-defined]
            loop._store_dataloader_outputs = finish_first  # type: ignore[method-assign]

    # ------------------------------------------------------------------ teardown and names
    @override
    def on_exception(self, exception: BaseException) -> None:
        """Rank 0 of the subprocess launcher ends its child ranks when fit fails: Lightning kills them only
        on Ctrl+C, so a rank blocked in a collective or hung would outlive the run. They get a moment to
        finish on their own (a rank that failed first prints its error) before being killed."""
        super().on_exception(exception)
        # Ranks still waiting on this one read where it stopped and why (see [Note: whereabouts]).
        publish(None if isinstance(exception, CollectiveError) else exception)
        launcher = self.launcher
        procs = getattr(launcher, "procs", None) if isinstance(launcher, _SubprocessScriptLauncher) else None
        if not procs:
            return
        # Lightning's child-process observer may SIGKILL this process while it waits below, before the
        # traceback is printed: say what failed first.
        print(f"[rank {self.global_rank}] {type(exception).__name__}: {exception}", file=sys.stderr, flush=True)
        end_child_ranks(procs)

    @override
    def teardown(self) -> None:
        # Unhook the model but keep the engines (after_fit="sharded": leave them hooked too):
        # trainer.save_checkpoint() after fit still gathers their optimizer state. The next setup releases
        # them. Collectives only after a clean finish, so a rank that failed does not wait here for ranks
        # that are gone.
        module = self.lightning_module
        finished = module is not None and module._trainer is not None and (
            module._trainer.state.status != TrainerStatus.INTERRUPTED)
        mark("end of run", step=module._trainer.global_step if module is not None and module._trainer else None)
        self._kept_sharded = finished and self.options.after_fit == "sharded" and bool(self.engines)
        for engine in self.engines:
            if self._kept_sharded:
                continue  # still sharded and hooked: see setup
            if finished:
                engine.materialize_module()
            engine.close(release_group=finished)
        if finished and torch.distributed.is_available() and torch.distributed.is_initialized():
            # The last collective's handle stays with Python (see [Note: keep finished work handles]).
            wait_all([torch.distributed.barrier(async_op=True)], what="the barrier every rank passes at the end of fit")
        super().teardown()
