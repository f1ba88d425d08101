"""Step time through Lightning's Trainer: Lightning ``ddp`` (the reference), zero1/2/3, Lightning's
``FSDPStrategy`` (FSDP1 FULL_SHARD and SHARD_GRAD_OP, one unit per GPT block), FSDP2 through Lightning's
``ModelParallelStrategy`` (``fully_shard`` per block in ``configure_model``) and, where importable, Lightning's
DeepSpeed stage 3. Owns this Lightning-level comparison; ``peers.py`` owns the bare-loop one (torch DDP as
reference), so the two can be set side by side.

    python benchmarks/lightning_speed.py                        # 5M, accumulate 1 and 4, 3 repeats: ~11 min
                                                                # on an idle 2-core machine (42 fits, ~10 s each
                                                                # to start and stop, plus 8 steps)
    python benchmarks/lightning_speed.py --size 20M --accumulate 1 --repeats 5
    python benchmarks/lightning_speed.py --pin setup --no-barrier  # pinned as a Lightning user would pin
    python benchmarks/lightning_speed.py --repeats 1 --steps 2 --warmup 1 --accumulate 1 --name smoke

The GPTs are peers.py's (``--size`` 5M/20M/80M: 5.4M, 19.0M, 79.9M parameters), fp32 AdamW (lr 1e-3),
micro-batch 8 x 64 tokens drawn per rank as peers.py draws them; 2 ranks on gloo, ``accelerator="cpu"``,
``devices=2``. Every Trainer fit runs in a fresh ``python`` process (its rank 0; Lightning's launcher starts
rank 1), so launchers, process groups and allocator state never leak from one system into the next. Each
repeat runs every system once, the order rotated by one per repeat. A callback times each micro-batch from
``on_train_batch_start`` to ``on_train_batch_end`` (which holds forward, backward, the optimizer step and
``zero_grad``; not the data fetch) and sums them per optimizer step; the first ``--warmup`` steps are dropped;
a system's time in a repeat is rank 0's median step, and its ratio is the median over repeats of that time
over Lightning ``ddp``'s in the same repeat and accumulation.

Pinning (``--pin``): ``start`` (default) pins each rank to its own core and one thread before torch is
imported, as harness.py does, so every thread the rank creates later (gloo's, OpenMP's) inherits that core.
``setup`` pins as a Lightning user would, in ``Callback.setup``: by then Lightning has created the process
group, whose gloo threads keep both cores (``sched_setaffinity(0)`` moves only the calling thread), and the
thread counts are Lightning's own: 1 per rank under ``ddp`` and the zero stages, but torch's default on rank 1
under FSDPStrategy and ModelParallelStrategy (they make no launcher in rank 1, which is what sets the count
there). ``none``: one thread per rank, unpinned. Each fit records every rank's thread count and how many of
its threads may use more than one core; the table shows them.

Lightning refuses FSDP on CPU twice; in the rank processes of the FSDP1 systems only, this script patches
(lightning 2.6.6, torch 2.13):
1. ``lightning/pytorch/trainer/connectors/accelerator_connector.py`` ``_check_strategy_and_fallback``
   (lines 424-445) raises "The strategy `fsdp` requires a GPU accelerator" (lines 431-438) for an
   ``FSDPStrategy`` instance with ``accelerator="cpu"``. For a Strategy instance that refusal is the method's
   only effect, so the patch skips the method when the strategy is an ``FSDPStrategy``.
2. ``lightning/pytorch/strategies/fsdp.py`` ``_setup_model`` (line 315) passes ``device_id=
   self.root_device.index``, None on CPU, and torch then refuses: "FSDP needs a non-CPU accelerator device"
   (``torch/distributed/fsdp/_init_utils.py`` line 390). The patch wraps ``FullyShardedDataParallel.__init__``
   so that ``device_id=None`` becomes ``torch.device("cpu")``, what peers.py passes.
(Fabric's own refusal, ``lightning/fabric/connector.py`` lines 433-439, is not on the Trainer's path.)
FSDP2 through ``ModelParallelStrategy`` needs no patch on CPU. DeepSpeed is skipped, and named, when it is
not importable.

Writes benchmarks/results/lightning_speed.json and .md (``--name`` for another name).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning.pytorch as pl
    import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))

#: name -> what the table calls it. Lightning ``ddp`` is the reference; the first block is the default set.
SYSTEMS: dict[str, str] = {
    "ddp": "Lightning ddp", "zero1": "zero1", "zero2": "zero2", "zero3": "zero3",
    "fsdp1_full_shard": "FSDPStrategy FULL_SHARD", "fsdp1_shard_grad_op": "FSDPStrategy SHARD_GRAD_OP",
    "fsdp2": "ModelParallelStrategy FSDP2 (reshard after forward)", "deepspeed3": "DeepSpeedStrategy stage 3",
    # Opt-in: FSDP1 as peers.py builds it (use_orig_params=False; Lightning's default is True), FSDP2 without
    # resharding, DeepSpeed stages 1 and 2.
    "fsdp1_full_shard_flat": "FSDPStrategy FULL_SHARD, use_orig_params=False",
    "fsdp1_shard_grad_op_flat": "FSDPStrategy SHARD_GRAD_OP, use_orig_params=False",
    "fsdp2_no_reshard": "ModelParallelStrategy FSDP2 (no reshard after forward)",
    "deepspeed1": "DeepSpeedStrategy stage 1", "deepspeed2": "DeepSpeedStrategy stage 2",
    # Opt-in: zero2 with 2**20-element buckets (several reductions overlapping backward at 5M).
    "zero2_bucket_1m": "zero2, bucket_numel=2**20",
}
DEFAULT_SYSTEMS = ("ddp", "zero1", "zero2", "zero3", "fsdp1_full_shard", "fsdp1_shard_grad_op", "fsdp2",
                   "deepspeed3")
SIZE_NAMES = ("5M", "20M", "80M")  # peers.SIZES' keys (peers imports torch, which must wait for the pinning)
LR = 1e-3
PIN_ENV, CORES_ENV = "LIGHTNING_SPEED_PIN", "LIGHTNING_SPEED_CORES"
#: ``--interleave step``: "directory,index,count": this fit is system ``index`` of ``count`` taking turns.
TURN_ENV = "LIGHTNING_SPEED_TURN"
#: What the orchestrator clears so that every fit launches its own pair of ranks on a fresh port.
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE",
              "GROUP_RANK", "PL_GLOBAL_SEED")


# --------------------------------------------------------------------------------------- rank processes
def _local_rank() -> int:
    # Rank 0 is the process the orchestrator starts; Lightning's launcher starts rank 1 with LOCAL_RANK set.
    return int(os.environ.get("LOCAL_RANK", "0"))


def _core() -> int:
    return [int(c) for c in os.environ[CORES_ENV].split(",")][_local_rank()]


def pin_at_start() -> None:
    """In a rank process, before torch is imported: one thread (``start``, ``none``) on this rank's core
    (``start``). Rank 1 inherits rank 0's mask and environment, so rank 0 sets ``OMP_NUM_THREADS`` itself:
    Lightning sets it only after starting rank 1 (subprocess_script.py:100-104)."""
    mode = os.environ.get(PIN_ENV)
    if mode in ("start", "none"):
        os.environ["OMP_NUM_THREADS"] = "1"
    if mode == "start":
        os.sched_setaffinity(0, {_core()})


def thread_report() -> dict[str, Any]:
    """This rank's torch threads and how many of its OS threads may run on more than one core."""
    import torch

    wide = 0
    tasks = os.listdir("/proc/self/task")
    for tid in tasks:
        try:
            wide += len(os.sched_getaffinity(int(tid))) > 1
        except OSError:  # the thread ended meanwhile
            continue
    return {"torch_threads": torch.get_num_threads(), "os_threads": len(tasks), "threads_on_several_cores": wide,
            "main_thread_cores": sorted(os.sched_getaffinity(0))}


def allow_fsdp1_on_cpu() -> None:
    """Lift Lightning's two CPU refusals for FSDP1 in this process (see the module docstring)."""
    import torch
    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector
    from torch.distributed.fsdp import FullyShardedDataParallel

    check = _AcceleratorConnector._check_strategy_and_fallback

    @functools.wraps(check)
    def check_unless_fsdp(self: Any) -> None:
        if not isinstance(self._strategy_flag, FSDPStrategy):
            check(self)

    _AcceleratorConnector._check_strategy_and_fallback = check_unless_fsdp
    init = FullyShardedDataParallel.__init__

    @functools.wraps(init)
    def init_on_cpu(self: Any, module: torch.nn.Module, *args: Any, device_id: Any = None, **kwargs: Any) -> None:
        init(self, module, *args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)

    FullyShardedDataParallel.__init__ = init_on_cpu


def build_strategy(system: str) -> Any:
    """What ``Trainer(strategy=...)`` gets for ``system``: Lightning's defaults except the wrapping."""
    if system == "ddp":
        return "ddp"
    if system.startswith("zero"):
        import lightning_zero  # registers "zero1", "zero2", "zero3"

        if system == "zero2_bucket_1m":
            return lightning_zero.ZeroStrategy(stage=2, bucket_numel=2**20)
        return system
    if system.startswith("fsdp1"):
        from gpt import Block
        from lightning.pytorch.strategies import FSDPStrategy

        allow_fsdp1_on_cpu()
        kwargs = {"use_orig_params": False} if system.endswith("_flat") else {}
        return FSDPStrategy(sharding_strategy="FULL_SHARD" if "full_shard" in system else "SHARD_GRAD_OP",
                            auto_wrap_policy={Block}, **kwargs)
    if system.startswith("fsdp2"):
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=int(system[-1]))


def wrapping_report(strategy: Any) -> dict[str, Any]:
    """The settings in effect for the model the Trainer runs: FSDP1's per-unit options, DDP's, FSDP2's units,
    lightning_zero's configuration."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    model = strategy.model
    report: dict[str, Any] = {"strategy": type(strategy).__name__}
    if isinstance(model, FullyShardedDataParallel):
        options = ("sharding_strategy", "_use_orig_params", "limit_all_gathers", "forward_prefetch",
                   "backward_prefetch", "compute_device")
        report |= {"wrapper": "FSDP1", "units": len(FullyShardedDataParallel.fsdp_modules(model))}
        report |= {k.lstrip("_"): str(getattr(model, k, "?")) for k in options}
        precision = model.mixed_precision  # Lightning passes fp32 dtypes for "32-true" where peers.py passes None
        report["mixed_precision"] = f"param {precision.param_dtype}, reduce {precision.reduce_dtype}"
    elif isinstance(model, DistributedDataParallel):
        report |= {"wrapper": "DDP", "find_unused_parameters": model.find_unused_parameters,
                   "gradient_as_bucket_view": model.gradient_as_bucket_view, "static_graph": model.static_graph,
                   "broadcast_buffers": model.broadcast_buffers, "bucket_bytes_cap": model.bucket_bytes_cap}
    else:
        units = sum("FSDP" in type(module).__name__ for module in model.modules())
        report["wrapper"] = f"fully_shard ({units} units)" if units else "none"
    config = getattr(strategy, "config", None)  # ZeroStrategy's ZeroConfig
    for name in ("stage", "reduce_policy", "bucket_numel"):
        if hasattr(config, name):
            report[name] = getattr(config, name)
    return report


def make_module(size: str, system: str, batch_size: int, batches: int) -> pl.LightningModule:
    """peers.py's GPT of ``size`` (seed 0), AdamW in fp32, ``batches`` micro-batches drawn for this rank."""
    import lightning.pytorch as pl
    import torch
    from gpt import GPT, corpus, sample_batch
    from peers import SIZES
    from torch.utils.data import DataLoader

    class Bench(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = GPT(*SIZES[size])

        def configure_model(self) -> None:
            if not system.startswith("fsdp2"):
                return
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            reshard = system == "fsdp2"
            for layer in self.model.layers:
                fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
            fully_shard(self.model, mesh=mesh, reshard_after_forward=reshard)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            return self.model.loss(*batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            # FSDP1 with use_orig_params=False must be handed its flat parameters, i.e. the wrapped model's.
            params = self.trainer.model.parameters() if system.endswith("_flat") else self.parameters()
            return torch.optim.AdamW(params, lr=LR)

        def train_dataloader(self) -> DataLoader:
            generator = torch.Generator().manual_seed(self.global_rank)  # as peers.py: per-rank batches
            data = corpus()
            return DataLoader([sample_batch(data, batch_size, 64, generator) for _ in range(batches)],
                              batch_size=None)

    return Bench()


class Turns:
    """``--interleave step``: the fits of every system run at once and take turns, one optimizer step each
    (system ``index`` of ``count`` steps on turns ``step * count + index``), through a counter in a file the
    orchestrator starts at -1 and sets to 0 once every fit is ready."""

    def __init__(self, spec: str) -> None:
        directory, index, count = spec.split(",")
        self.directory, self.index, self.count = Path(directory), int(index), int(count)

    def _turn(self) -> int:
        try:
            return int((self.directory / "turn").read_text() or -1)
        except (OSError, ValueError):  # being replaced right now
            return -1

    def wait(self, turn: int) -> None:
        while self._turn() < turn:
            time.sleep(0.01)

    def ready(self) -> None:
        (self.directory / f"ready-{self.index}").touch()

    def before_step(self, step: int) -> None:
        self.wait(step * self.count + self.index)

    def after_step(self, step: int, rank: int) -> None:
        """Both ranks are done with the step (the caller's barrier): rank 0 hands the turn on."""
        if rank == 0:
            scratch = self.directory / f"turn-{self.index}"
            scratch.write_text(str(step * self.count + self.index + 1))
            os.replace(scratch, self.directory / "turn")

    def until_all_done(self, steps: int) -> None:
        """Leave the fit (teardown) only when every system has run all its steps, so none is timed beside it."""
        self.wait(steps * self.count)


def make_timer(accumulate: int, barrier: bool, pin_in_setup: bool, steps: int) -> pl.Callback:
    """A callback summing each optimizer step's micro-batch times; at the end it gathers every rank's times,
    threads and wrapping into ``result`` on rank 0. Under ``TURN_ENV`` each step waits for its turn."""
    import lightning.pytorch as pl
    import torch.distributed as dist

    turns = Turns(os.environ[TURN_ENV]) if os.environ.get(TURN_ENV) else None

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = 0.0
            self.threads: dict[str, Any] = {}
            self.wrapping: dict[str, Any] = {}
            self.result: list[dict[str, Any]] = []

        def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
            if pin_in_setup:  # after Lightning made the process group: moves this thread only
                os.sched_setaffinity(0, {_core()})

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.threads = thread_report()
            self.wrapping = wrapping_report(trainer.strategy)
            if turns is not None:
                dist.barrier()
                if trainer.global_rank == 0:
                    turns.ready()

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                 batch_idx: int) -> None:
            if batch_idx % accumulate == 0:
                if turns is not None:
                    turns.before_step(batch_idx // accumulate)
                if barrier:  # both ranks start each optimizer step together, as peers.py's loops do
                    dist.barrier()
                self.times.append(0.0)
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                               batch: Any, batch_idx: int) -> None:
            self.times[-1] += time.perf_counter() - self.start
            if turns is not None and batch_idx % accumulate == accumulate - 1:
                dist.barrier()
                turns.after_step(batch_idx // accumulate, trainer.global_rank)

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if turns is not None:
                turns.until_all_done(steps)
            mine = {"times": self.times, "threads": self.threads, "wrapping": self.wrapping,
                    "global_step": trainer.global_step}
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
            self.result = gathered

    return StepTimer()


def run_rank(args: argparse.Namespace) -> None:
    """One Trainer fit of ``args.child`` (this process is rank 0, or rank 1 re-run by Lightning's launcher);
    rank 0 writes every rank's step times to ``args.out``."""
    import logging
    import warnings

    import lightning.pytorch as pl
    import torch

    if args.pin != "setup":
        torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # Lightning's CPU and dataloader advice would fill the log of each fit
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    steps, (accumulate,) = args.warmup + args.steps, args.accumulate  # a rank runs one accumulation
    timer = make_timer(accumulate, args.barrier, args.pin == "setup", steps)
    trainer = pl.Trainer(strategy=build_strategy(args.child), accelerator="cpu", devices=2, max_steps=steps,
                         accumulate_grad_batches=accumulate, precision="32-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(make_module(args.size, args.child, args.batch_size, steps * accumulate))
    counts = {(rank["global_step"], len(rank["times"])) for rank in timer.result}
    if counts != {(steps, steps)}:  # every window timed, none split or merged
        raise RuntimeError(f"expected {steps} optimizer steps and timed windows per rank, got {counts}")
    if trainer.global_rank == 0:
        Path(args.out).write_text(json.dumps({"ranks": timer.result}))


# ------------------------------------------------------------------------------------------- orchestrator
def available(systems: list[str]) -> tuple[list[str], dict[str, str]]:
    """The systems that can run here, and why each other one cannot."""
    skipped = {}
    if importlib.util.find_spec("deepspeed") is None:
        skipped.update({s: "deepspeed is not installed (DS_BUILD_OPS=0 pip install deepspeed)"
                        for s in systems if s.startswith("deepspeed")})
    return [s for s in systems if s not in skipped], skipped


def launch(system: str, accumulate: int, args: argparse.Namespace, cores: list[int], workdir: Path
           ) -> dict[str, Any]:
    """One fit of ``system`` in a fresh process pair; returns its ranks' results, or ``{"error": ...}``."""
    return finish(*start(system, accumulate, args, cores, workdir), args.timeout)


def start(system: str, accumulate: int, args: argparse.Namespace, cores: list[int], workdir: Path,
          turn: str | None = None) -> tuple[subprocess.Popen[bytes], Path, Path, float]:
    """Start one fit of ``system`` (its rank 0; Lightning starts rank 1); ``turn``: its ``TURN_ENV``."""
    out, log = workdir / f"{system}-{accumulate}.json", workdir / f"{system}-{accumulate}.log"
    out.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", system, "--accumulate", str(accumulate),
               "--size", args.size, "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size",
               str(args.batch_size), "--pin", args.pin, "--out", str(out)] + ([] if args.barrier else ["--no-barrier"])
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update({PIN_ENV: args.pin, CORES_ENV: ",".join(map(str, cores))} | ({TURN_ENV: turn} if turn else {}))
    if args.pin == "setup":
        env.pop("OMP_NUM_THREADS", None)  # leave the thread counts to Lightning, as a user's run would
    with log.open("w") as sink:
        # A session of its own: whatever the pair leaves behind (rank 1 after a rank-0 failure) is ended by id.
        proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, out, log, time.perf_counter()


def finish(proc: subprocess.Popen[bytes], out: Path, log: Path, started: float, timeout: float) -> dict[str, Any]:
    """Wait for a fit ``start`` began; its ranks' results, or ``{"error": ...}``."""
    try:
        code = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - started)))
    except subprocess.TimeoutExpired:
        code = None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    wall = time.perf_counter() - started
    if code != 0 or not out.exists():
        text = log.read_text()
        # The exception's own line names the failure; the tail shows where.
        raised = [line for line in text.splitlines() if "Error" in line or "Exception" in line]
        why = f"exit code {code} after {wall:.0f} s" + (" (timed out)" if code is None else "")
        return {"error": why + (f": {raised[-1].strip()}" if raised else ""), "log_tail": text[-2000:], "wall_s": wall}
    return json.loads(out.read_text()) | {"wall_s": wall}


def step_medians(ranks: list[dict[str, Any]], warmup: int) -> list[float]:
    """Each rank's median optimizer step after the warm-up."""
    return [statistics.median(rank["times"][warmup:]) for rank in ranks]


def measure(args: argparse.Namespace, systems: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Interleaved fits: per repeat and accumulation, every system once, the order rotated by one per repeat.
    Returns per "system@accumulate" the per-repeat rank-0 medians (and the first fit's threads and wrapping),
    and the systems that failed (left out of later repeats)."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    runs: dict[str, Any] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="lightning_speed_") as tmp:
        for repeat in range(args.repeats):
            for accumulate in args.accumulate:
                shift = repeat % len(systems)
                for system in systems[shift:] + systems[:shift]:
                    key = f"{system}@{accumulate}"
                    if key in failed:
                        continue
                    result = launch(system, accumulate, args, cores, Path(tmp))
                    if "error" in result:
                        failed[key] = result["error"]
                        print(f"repeat {repeat + 1} accumulate {accumulate} {system}: FAILED {result['error']}\n"
                              f"{result['log_tail']}", flush=True)
                        continue
                    medians = step_medians(result["ranks"], args.warmup)
                    entry = runs.setdefault(key, {"system": system, "accumulate": accumulate, "per_repeat_s": [],
                                                  "rank1_per_repeat_s": [], "fit_wall_s": [],
                                                  "threads": [r["threads"] for r in result["ranks"]],
                                                  "wrapping": result["ranks"][0]["wrapping"]})
                    entry["per_repeat_s"].append(medians[0])
                    entry["rank1_per_repeat_s"].append(medians[1])
                    entry["fit_wall_s"].append(result["wall_s"])
                    print(f"repeat {repeat + 1}/{args.repeats} accumulate {accumulate} {system}: median step "
                          f"{medians[0]:.4f} s (rank 1 {medians[1]:.4f} s), fit {result['wall_s']:.1f} s", flush=True)
    return runs, failed


def measure_by_step(args: argparse.Namespace, systems: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``--interleave step``: per accumulation, every system's fit at once, taking turns one optimizer step
    each (``Turns``), ``--warmup`` + ``--repeats`` x ``--steps`` steps. Returns what ``measure`` returns, with a
    timed round in place of a repeat."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    runs: dict[str, Any] = {}
    failed: dict[str, str] = {}
    rounds = args.repeats * args.steps
    fit_args = argparse.Namespace(**(vars(args) | {"steps": rounds}))
    with tempfile.TemporaryDirectory(prefix="lightning_speed_") as tmp:
        for accumulate in args.accumulate:
            workdir = Path(tmp) / f"acc{accumulate}"
            workdir.mkdir()
            (workdir / "turn").write_text("-1")
            fits = {system: start(system, accumulate, fit_args, cores, workdir, f"{workdir},{index},{len(systems)}")
                    for index, system in enumerate(systems)}
            deadline = time.perf_counter() + args.timeout
            while not all((workdir / f"ready-{i}").exists() for i in range(len(systems))):
                if time.perf_counter() > deadline or any(proc.poll() is not None for proc, *_ in fits.values()):
                    break  # a fit died before it was ready: the others are ended below
                time.sleep(0.05)
            (workdir / "turn").write_text("0")
            for system, fit in fits.items():
                result = finish(*fit, args.timeout)
                key = f"{system}@{accumulate}"
                if "error" in result:
                    failed[key] = result["error"]
                    print(f"accumulate {accumulate} {system}: FAILED {result['error']}\n{result['log_tail']}",
                          flush=True)
                    for proc, *_ in fits.values():  # the others would wait for its turns forever
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGKILL)
                    continue
                ranks = result["ranks"]
                runs[key] = {"system": system, "accumulate": accumulate,
                             "per_repeat_s": ranks[0]["times"][args.warmup:],
                             "rank1_per_repeat_s": ranks[1]["times"][args.warmup:], "fit_wall_s": [result["wall_s"]],
                             "threads": [r["threads"] for r in ranks], "wrapping": ranks[0]["wrapping"]}
                print(f"accumulate {accumulate} {system}: median step "
                      f"{statistics.median(runs[key]['per_repeat_s']):.4f} s over {rounds} rounds", flush=True)
    return runs, failed


def ratios(runs: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows with the median over repeats of time / Lightning ddp's time in the same repeat."""
    rows = []
    for key, run in runs.items():
        base = runs.get(f"ddp@{run['accumulate']}")
        paired = list(zip(run["per_repeat_s"], base["per_repeat_s"])) if base else []
        # A failed system is left out of later repeats, so both lists run from repeat 1: zip pairs repeats.
        per_repeat = [a / b for a, b in paired]
        rows.append(run | {"case": key, "median_step_s": statistics.median(run["per_repeat_s"]),
                           "ratio_per_repeat": per_repeat,
                           "ratio_to_lightning_ddp": statistics.median(per_repeat) if per_repeat else None})
    return rows


def table(result: dict[str, Any]) -> str:
    """The step-time table (a column pair per accumulation) and what each fit really ran."""
    s = result["settings"]
    accs = s["accumulate"]
    by_case = {(r["system"], r["accumulate"]): r for r in result["rows"]}
    lines = [f"{result['parameters']:,}-parameter GPT ({s['size']}), fp32 AdamW (lr {LR}), micro-batch "
             f"{s['batch_size']} x 64 tokens, through Lightning {result['lightning']}'s Trainer on torch "
             f"{result['torch']}, gloo, 2 ranks (pinning: {s['pin']}; barrier before each step: {s['barrier']}); "
             + (f"every system's fit at once in its own process pair, taking turns one optimizer step each: "
                f"{s['repeats'] * s['steps']} timed rounds after {s['warmup']} warm-up; step = median over rounds; "
                f"ratio = median over rounds of time / Lightning ddp's in the same round. "
                if s.get("interleave") == "step" else
                f"median of {s['steps']} optimizer steps after {s['warmup']} warm-up, {s['repeats']} interleaved "
                f"repeats, each fit a fresh process pair; ratio = median over repeats of time / Lightning ddp's. ")
             + f"Load average (1 min) {result['load_average'][0]:.2f} at the start, {result['load_average'][1]:.2f} "
             f"at the end; {result['wall_s'] / 60:.1f} min.", ""]
    head = ["system"] + [c for a in accs for c in (f"acc. {a}: step (s)", f"acc. {a}: vs Lightning ddp")]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for system in result["systems"]:
        cells = [SYSTEMS[system]]
        for a in accs:
            row = by_case.get((system, a))
            ratio = row and row["ratio_to_lightning_ddp"]
            cells += [f"{row['median_step_s']:.4f}" if row else "—", f"{ratio:.3f}x" if ratio else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "What each system ran (first fit; threads: rank 0 / rank 1 torch threads, and OS threads "
              "allowed on more than one core):", "", "| system | threads | wrapping |", "|---|---|---|"]
    for system in result["systems"]:
        row = next((r for r in result["rows"] if r["system"] == system), None)
        if row:
            threads = " / ".join(f"{t['torch_threads']} ({t['threads_on_several_cores']} of {t['os_threads']} "
                                 f"on >1 core)" for t in row["threads"])
            wrapping = ", ".join(f"{k}={v}" for k, v in row["wrapping"].items())
            lines.append(f"| {SYSTEMS[system]} | {threads} | {wrapping} |")
    lines += [""] + [f"- skipped {name}: {why}" for name, why in result["skipped"].items()]
    lines += [f"- failed {key}: {why}" for key, why in result["failed"].items()]
    return "\n".join(lines).rstrip() + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZE_NAMES, default="5M", help="peers.py's GPT sizes (default: 5M)")
    parser.add_argument("--accumulate", type=int, nargs="+", default=[1, 4],
                        help="accumulate_grad_batches values (default: 1 4)")
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(DEFAULT_SYSTEMS),
                        help="ddp is always added: it is the reference (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per fit")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps dropped at the start of each fit")
    parser.add_argument("--batch-size", type=int, default=8, help="micro-batch, sequences of 64 tokens")
    parser.add_argument("--pin", choices=("start", "setup", "none"), default="start",
                        help="start: each rank on its core, one thread, from process start (as harness.py); "
                             "setup: the main thread pinned in Callback.setup, threads as Lightning sets them; "
                             "none: one thread, unpinned")
    parser.add_argument("--no-barrier", dest="barrier", action="store_false",
                        help="do not start each optimizer step with a barrier")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one fit may take")
    parser.add_argument("--interleave", choices=("run", "step"), default="run",
                        help="run: one fit after another (--repeats of each, rotated); step: every system's fit at "
                             "once, taking turns one optimizer step each (--repeats x --steps rounds; each system's "
                             "ratio is the median over rounds of its step over Lightning ddp's of the same round)")
    parser.add_argument("--name", default="lightning_speed", help="results go to benchmarks/results/NAME.json, .md")
    parser.add_argument("--child", choices=list(SYSTEMS), help=argparse.SUPPRESS)  # a rank process: run one fit
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is None and "ddp" not in args.systems:
        args.systems.insert(0, "ddp")
    return args


def orchestrate(args: argparse.Namespace) -> None:
    import lightning
    import torch
    from gpt import GPT
    from peers import SIZES

    if len(os.sched_getaffinity(0)) < 2 and args.pin != "none":
        raise SystemExit("pinning needs two cores in this process's affinity mask; use --pin none")
    systems, skipped = available(list(dict.fromkeys(args.systems)))
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", flush=True)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    runs, failed = (measure_by_step if args.interleave == "step" else measure)(args, systems)
    result = {"torch": torch.__version__, "lightning": lightning.__version__,
              "parameters": sum(p.numel() for p in GPT(*SIZES[args.size]).parameters()),
              "settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
              "systems": systems, "skipped": skipped, "failed": failed, "rows": ratios(runs),
              "wall_s": time.perf_counter() - started, "load_average": [load_start, os.getloadavg()[0]]}
    text = table(result)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{args.name}.md").write_text(text)
    print(text + f"wrote {out / args.name}.json and .md in {result['wall_s'] / 60:.1f} min", flush=True)


def main() -> None:
    pin_at_start()  # before anything imports torch, so every thread the rank makes inherits the core
    args = parse()
    if args.child:
        run_rank(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
