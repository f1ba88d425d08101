"""Faults and bad input: every error names its fix and comes before training, on every rank; a rank that
raises, dies or hangs ends every process within a bound; a non-finite loss never reaches the weights; long
runs and repeated fits do not grow."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

from lightning_zero import ZeroConfig, ZeroPrecision, ZeroStrategy
from tests.lit_helpers import LitTiny, loader, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------ bad configuration
def _trainer_with(**kwargs: Any) -> Callable[[], object]:
    return lambda: pl.Trainer(accelerator="cpu", devices=2, logger=False, **kwargs)


CONSTRUCTION: list[tuple[str, Callable[[], object], str]] = [
    ("stage 4", lambda: ZeroStrategy(stage=4), "stage must be one of"),  # type: ignore[arg-type]
    ("stage 0", lambda: ZeroStrategy(stage=0), "stage must be one of"),  # type: ignore[arg-type]
    ("unknown reduce policy", lambda: ZeroStrategy(reduce_policy="sometimes"),  # type: ignore[arg-type]
     "reduce_policy must be one of"),
    ("bucket_numel 0", lambda: ZeroStrategy(bucket_numel=0), "bucket_numel must be a positive integer"),
    ("bucket_numel not an int", lambda: ZeroStrategy(bucket_numel=1.5), "bucket_numel must be a positive"),  # type: ignore[arg-type]
    ("unit_numel negative", lambda: ZeroConfig(stage=3, unit_numel=-1), "unit_numel must be a non-negative"),
    ("unit_numel given to stage 2", lambda: ZeroStrategy(stage=2, unit_numel=2**16), "drop it, or use stage=3"),
    ("persist_numel negative", lambda: ZeroStrategy(stage=3, persist_numel=-1), "persist_numel must be a non-negative"),
    ("persist_numel given to stage 1", lambda: ZeroStrategy(stage=1, persist_numel=0), "drop it, or use stage=3"),
    ("unknown checkpoint format", lambda: ZeroStrategy(state_dict_type="dcp"),  # type: ignore[arg-type]
     "state_dict_type must be 'sharded' or 'full'"),
    ("unknown nonfinite policy", lambda: ZeroStrategy(nonfinite="ignore"),  # type: ignore[arg-type]
     "nonfinite must be 'raise' or 'skip'"),
    ("timeout as a number", lambda: ZeroStrategy(timeout=30), "timeout must be a datetime.timedelta"),  # type: ignore[arg-type]
    ("timeout zero", lambda: ZeroStrategy(timeout=timedelta(0)), "timeout must be positive"),
    ("timeout negative", lambda: ZeroStrategy(timeout=timedelta(seconds=-5)), "timeout must be positive"),
    ("stage True", lambda: ZeroStrategy(stage=True), "stage must be one of"),  # type: ignore[arg-type]
    ("stage 2.0", lambda: ZeroStrategy(stage=2.0), "stage must be one of"),  # type: ignore[arg-type]
    ("bucket_numel True", lambda: ZeroStrategy(bucket_numel=True), "bucket_numel must be a positive"),
    ("unit_numel True", lambda: ZeroConfig(stage=3, unit_numel=True), "unit_numel must be a non-negative"),
    ("unknown start method", lambda: ZeroStrategy(start_method="thread"),  # type: ignore[arg-type]
     "start_method must be one of"),
    ("double precision", _trainer_with(strategy="zero2", precision="64-true"), "use precision= one of"),
    ("unknown ZeroPrecision", lambda: ZeroPrecision("64-true"), "not supported by ZeRO"),  # type: ignore[arg-type]
    ("integer reduce dtype", lambda: ZeroPrecision("bf16-mixed", reduce_dtype=torch.int32), "floating point"),
    ("loss scaling knobs without fp16", lambda: ZeroPrecision("bf16-mixed", initial_scale_power=8),
     "or use precision '16-mixed'"),
]


@pytest.mark.parametrize(("case", "build", "message"), CONSTRUCTION, ids=[c[0] for c in CONSTRUCTION])
def test_bad_settings_fail_at_construction(case: str, build: Callable[[], object], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message) as caught:
        build()
    print(f"{case}: {caught.value}")


class WithOptimizer(LitTiny):
    """LitTiny whose optimizer (or model) is replaced by ``make(module)`` / ``change(module)``."""

    def __init__(self, make: Callable[[LitTiny], Any] | None = None, change: Callable[[LitTiny], None] | None = None
                 ) -> None:
        super().__init__("sgd")
        self.make = make
        if change is not None:
            change(self)

    def configure_optimizers(self) -> Any:
        return self.make(self) if self.make is not None else super().configure_optimizers()


def _freeze_all(module: LitTiny) -> None:
    module.requires_grad_(False)


def _rank1_wider_head(module: LitTiny) -> None:
    if dist.get_rank() == 1:
        module.net.head = torch.nn.Linear(11, 4)


def _rank1_double_head(module: LitTiny) -> None:
    if dist.get_rank() == 1:
        module.net.head.double()


def _sparse_embedding(module: LitTiny) -> None:
    module.lookup = torch.nn.Embedding(5, 3, sparse=True)


FIT: dict[str, tuple[dict[str, Any], str]] = {
    "LBFGS": ({"make": lambda m: torch.optim.LBFGS(m.parameters())}, "two-loop recursion"),
    "SparseAdam": ({"make": lambda m: torch.optim.SparseAdam(m.parameters())}, "sparse gradients"),
    "nothing trainable": ({"make": lambda m: torch.optim.SGD(m.parameters(), lr=0.1), "change": _freeze_all},
                          "holds no trainable parameter"),
    "a trainable parameter outside the optimizer": (
        {"make": lambda m: torch.optim.SGD(m.net.head.parameters(), lr=0.1)}, "Add them to the optimizer"),
    "an optimizer tensor outside the model": (
        {"make": lambda m: torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)},
        "build the optimizer from module.parameters()"),
    "ranks with different shapes": ({"change": _rank1_wider_head}, "Build the same model and optimizer"),
    "ranks with different dtypes": ({"change": _rank1_double_head}, "Build the same model and optimizer"),
    "a sparse embedding": ({"make": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                            "change": _sparse_embedding}, "sparse=False"),
}


def fit_expecting_error(case: str) -> str:
    """Fit under zero2 and return the error (or "no error"); every rank must see one before a step."""
    if case == "ZeroPrecision under ddp":
        fit = trainer(DDPStrategy(), plugins=[ZeroPrecision("bf16-mixed")])
        module: LitTiny = LitTiny()
    else:
        fit = trainer(ZeroStrategy(stage=2, bucket_numel=150))
        module = WithOptimizer(**FIT[case][0])
    try:
        fit.fit(module, loader(2, 1))
    except (ValueError, TypeError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc} [steps taken: {module.counts['optimizer_step']}]"
    return "no error"


@pytest.mark.parametrize("case", [*FIT, "ZeroPrecision under ddp"])
def test_bad_setups_fail_on_every_rank_before_training(pools, case: str) -> None:
    message = FIT[case][1] if case in FIT else "works only with ZeroStrategy"
    errors = pools(2).run(fit_expecting_error, case)
    print(f"{case}: {errors[0]}")
    assert all(message in error and "[steps taken: 0]" in error for error in errors), errors


# ------------------------------------------------------------------------------------ a rank that fails
def _session_processes(session: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session and fields[0] != "Z":
                found.append(int(entry))
    return found


def run_fault(mode: str, rank: int, step: int, devices: int, timeout_s: float, checkpoint: str = "",
              started: threading.Event | None = None) -> tuple[int, float, str, list[int]]:
    """Exit code, seconds from the fault to the last process's exit, output, and processes left behind.
    ``started`` is set once every rank trains (or the job ended before that)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "FAULT_CKPT": checkpoint}
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "fault_script.py"), mode, str(rank), str(step), str(devices),
         str(timeout_s)], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)
    watchdog = threading.Timer(timeout_s + 120, os.killpg, (process.pid, 9))
    watchdog.start()
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if started is not None and line.startswith("TRAINING"):
            started.set()
    process.wait()
    if started is not None:
        started.set()
    out = "".join(lines)
    if not watchdog.is_alive():
        return -1, float("inf"), out, []
    watchdog.cancel()
    deadline = time.time() + 15
    while _session_processes(process.pid) and time.time() < deadline:
        time.sleep(0.2)
    ended = time.time()
    left = _session_processes(process.pid)
    if left:
        os.killpg(process.pid, 9)
    fault = [float(line.split()[1]) for line in out.splitlines() if line.startswith("FAULT ")]
    return process.returncode, (ended - fault[0]) if fault else float("inf"), out, left


FAULTS = [
    # rank 0's own error says where rank 1 stopped and what it raised (see [Note: whereabouts])
    ("raise", 1, 2, 2, "rank 1 was in the forward of training batch 2 (optimizer step 2), where it raised "
                       "ValueError: injected failure on rank 1 at step 2"),
    ("raise", 2, 3, 3, "ValueError: injected failure on rank 2 at step 3"),
    ("raise", 0, 2, 3, "ValueError: injected failure on rank 0 at step 2"),
    ("exit", 1, 2, 2, "a collective failed on rank 0"),
    ("kill", 1, 2, 3, "a collective failed on rank 0"),
    ("hang", 1, 2, 2, "a collective failed on rank 0"),
    ("uneven", 1, 2, 2, "cause: the ranks ran different numbers of training batches (rank 0: 4, rank 1: 5)"),
    # a rank whose checkpoint write stalls cannot say anything: the others report where it said it went
    ("stall-save", 1, 2, 2, "waiting for every rank's report that its checkpoint file is written; rank 1 said "
                            "nothing within 3s; "),
    ("stall-save-after-fit", 1, 2, 2, "told it was in save (optimizer step 5, 5 training batches so far), and it "
                                      "is most likely stuck there (a stalled file write or a hung filesystem)"),
    ("stall-save-after-fit", 0, 2, 2, "rank 0 said nothing within 3s; "),
    # a Fabric script: rank 0's uncaught exception ends the other ranks at once, not after their timeout
    ("fabric-raise", 0, 2, 2, "ValueError: injected failure on rank 0 at step 2"),
]


FAULT_IDS = [f"{m}-rank{r}-of-{d}" for m, r, _, d, _ in FAULTS]
_CONCURRENT_FAULTS = 3  # jobs at once: most of a fault's time is spent waiting on a timeout, not computing


def _timeout_s(mode: str) -> float:
    # ZeroStrategy(timeout=...) bounds the wait for a rank that hangs; Fabric's ranks must end long before it
    return 60.0 if mode.startswith("fabric") else 8.0


@pytest.fixture(scope="module")
def fault_matrix(tmp_path_factory) -> dict[str, tuple[int, float, str, list[int]]]:
    """Every fault of ``FAULTS``, each a fresh launcher job (what is tested is how the launched processes
    end), run a few at a time; one job starts at a time (the others then wait on timeouts, not the CPU), so
    no job's start-up meets its short timeout. Prints the matrix: fault, time to exit, rank 0's message."""
    starting = threading.Lock()

    def one(case: tuple[Any, ...], name: str) -> tuple[int, float, str, list[int]]:
        mode, rank, step, devices, _ = case
        started = threading.Event()
        with starting:
            job = threading.Thread(target=lambda: result.append(run_fault(
                mode, rank, step, devices, _timeout_s(mode), str(tmp_path_factory.mktemp(name) / "s.ckpt"), started)))
            result: list[tuple[int, float, str, list[int]]] = []
            job.start()
            started.wait()
        job.join()
        return result[0]

    with ThreadPoolExecutor(_CONCURRENT_FAULTS) as jobs:
        outcomes = dict(zip(FAULT_IDS, jobs.map(one, FAULTS, FAULT_IDS)))
    for name, (code, seconds, out, _) in outcomes.items():
        said = [line for line in out.splitlines() if "Error: " in line and "[rank" in line]
        print(f"| {name} | exit {code} | all gone {seconds:.1f}s after the fault | {said[-1][:400] if said else ''}")
    return outcomes


@pytest.mark.parametrize(("mode", "rank", "step", "devices", "shown"), FAULTS, ids=FAULT_IDS)
def test_a_failing_rank_ends_every_process(fault_matrix, mode: str, rank: int, step: int, devices: int,
                                           shown: str) -> None:
    code, seconds, out, left = fault_matrix[f"{mode}-rank{rank}-of-{devices}"]
    print(f"{mode} on rank {rank} of {devices} at step {step}: exit code {code}, all processes gone "
          f"{seconds:.1f}s after the fault")
    assert code != 0 and shown in out, out[-4000:]
    assert not left, f"processes left behind: {left}"
    waits = mode in ("hang", "uneven") or mode.startswith("stall")
    assert seconds < (_timeout_s(mode) if waits else 0) + 15
    if mode.startswith("fabric"):
        assert seconds < 10


# ------------------------------------------------------------------------------------ numerics
class NonFinite(LitTiny):
    """LitTiny whose loss on ``rank`` at optimizer step ``step`` is NaN; records weights after each step."""

    def __init__(self, rank: int, step: int, where: str = "loss") -> None:
        super().__init__("adamw")
        self.bad_rank, self.bad_step, self.where = rank, step, where
        self.after: list[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.global_rank == self.bad_rank and self.global_step == self.bad_step:
            if self.where == "loss":
                loss = loss * float("nan")
            else:  # a finite loss whose gradient is NaN: d sqrt(x)/dx at 0 times 0
                weight = next(self.net.parameters())
                loss = loss + 0.0 * torch.sqrt(weight.sum() * 0.0)
        return loss

    def on_train_batch_end(self, *args: Any) -> None:
        self.after.append(_masters(self))


def _masters(module: pl.LightningModule) -> torch.Tensor:
    """This rank's fp32 master slices (every stage and precision keeps the true weights there)."""
    engine = module.trainer.strategy.engines[0]
    return torch.cat([master.detach().float().clone() for master in (b.master for b in engine.trainable_buckets)])


def nonfinite_run(stage: int, policy: str, precision: str, where: str = "loss") -> dict[str, Any]:
    module = NonFinite(rank=1, step=2, where=where)
    fit = trainer(ZeroStrategy(stage=stage, bucket_numel=150, nonfinite=policy), precision=precision, max_steps=5)
    error = None
    try:
        fit.fit(module, loader(5, 1))
    except FloatingPointError as exc:
        error = str(exc)
    return {"error": error, "changed": [not torch.equal(a, b) for a, b in zip(module.after, module.after[1:])],
            "unchanged_since_error": torch.equal(_masters(module), module.after[-1]),
            "skipped": fit.precision_plugin.skipped_steps, "steps": fit.global_step}


@pytest.mark.parametrize(("stage", "precision"), [(2, "32-true"), (3, "bf16-mixed")])
def test_nonfinite_loss_raises_naming_step_and_rank(pools, stage: int, precision: str) -> None:
    results = pools(2).run(nonfinite_run, stage, "raise", precision)
    print(results[0]["error"])
    for result in results:
        assert "non-finite loss at optimizer step 2 on rank(s) [1]" in result["error"]
        assert result["changed"] == [True]  # steps 0 and 1 moved the weights, step 2 raised before it did
        assert result["unchanged_since_error"]


def test_nonfinite_gradient_names_the_parameter_and_the_shard_owner(pools) -> None:
    results = pools(2).run(nonfinite_run, 2, "raise", "32-true", "gradient")
    print(results[0]["error"])
    first = next(n for n, p in LitTiny("adamw").named_parameters())
    for result in results:
        error = result["error"]
        assert error is not None and "non-finite gradient of [" in error and first in error, error
        assert "reduced shards owned by rank(s)" in error and "may have come from any rank" in error
        assert result["unchanged_since_error"]


def test_nonfinite_loss_can_skip_the_step_on_every_rank(pools) -> None:
    results = pools(2).run(nonfinite_run, 2, "skip", "32-true")
    for result in results:
        assert result["error"] is None and result["steps"] == 5 and result["skipped"] == 1
        assert result["changed"] == [True, False, True, True]  # step 2 left the weights as they were


# ------------------------------------------------------------------------------------ long runs
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _slope(points: list[tuple[int, int]]) -> float:
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


class Sampler(pl.Callback):
    """Every ``every`` optimizer steps: this rank's RSS and the engine's exact model-state bytes."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.rss: list[tuple[int, int]] = []
        self.tensor_bytes: list[int] = []
        self.live_tensors: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        from lightning_zero import model_state_bytes

        if trainer.global_step % self.every == 0:
            import gc

            self.rss.append((trainer.global_step, _rss()))
            gc.collect()  # count what is alive, not cycles awaiting collection
            self.live_tensors.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)))
            engines = getattr(trainer.strategy, "engines", [])
            self.tensor_bytes.append(model_state_bytes(engines[0]).total if engines else 0)


def long_run(steps: int, strategy: str = "zero2") -> dict[str, Any]:
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from lit_gpt import LitGPT, RandomWindows  # the README's small example
    from torch.utils.data import DataLoader

    warm = LitGPT()  # the allocator's first growth in a fresh process is not a leak: warm it up first
    trainer(ZeroStrategy(stage=2) if strategy == "zero2" else DDPStrategy(), max_steps=200).fit(
        warm, DataLoader(RandomWindows(4, warm.model.block, dist.get_rank()), batch_size=None))
    sampler = Sampler(every=50)
    module = LitGPT()
    chosen = ZeroStrategy(stage=2) if strategy == "zero2" else DDPStrategy()
    fit = trainer(chosen, max_steps=steps, callbacks=[sampler])
    fit.fit(module, DataLoader(RandomWindows(4, module.model.block, dist.get_rank()), batch_size=None))
    return {"slope": _slope(sampler.rss), "rss": sampler.rss, "tensor_bytes": sampler.tensor_bytes,
            "live_tensors": sampler.live_tensors}


def test_long_run_does_not_grow(pools) -> None:
    """1,000 optimizer steps of the README's example under zero2, and under ddp for the noise floor."""
    ddp_slopes = [r["slope"] for r in pools(2).run(long_run, 1000, "ddp")]
    for rank, result in enumerate(pools(2).run(long_run, 1000)):
        first, last = result["rss"][0][1], result["rss"][-1][1]
        print(f"rank {rank}: RSS {first / 2**20:.2f} -> {last / 2**20:.2f} MiB over 1000 steps, slope "
              f"{result['slope']:.0f} bytes/step (ddp: {ddp_slopes[rank]:.0f}); model-state bytes "
              f"{sorted(set(result['tensor_bytes']))}; live tensors {sorted(set(result['live_tensors']))}")
        # Exact: the same model-state bytes and the same number of live tensors at every sample.
        assert len(set(result["tensor_bytes"])) == 1 and len(set(result["live_tensors"])) == 1
        # RSS moves by a few KB per step under ddp too (the allocator); a leaked bucket, gradient or
        # activation per step would be 100 KB/step or more.
        assert result["slope"] < 16384


def _hook_count(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    count = sum(len(p._post_accumulate_grad_hooks or {}) + len(p._backward_hooks or {}) for p in module.parameters())
    count += sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks)
                 for m in module.modules())
    if optimizer is not None:
        count += len(optimizer._optimizer_step_pre_hooks)
    return count


def repeated_fits(stage: int, fits: int) -> dict[str, Any]:
    from lightning_zero.sharding.init import pending_chunks

    module = LitTiny("adamw")
    before = _hook_count(module, None)
    hooks, rss = [], []
    for _ in range(fits):
        fit = trainer(ZeroStrategy(stage=stage, bucket_numel=150), max_steps=20, max_epochs=5)
        fit.fit(module, loader(8, 1))
        hooks.append(_hook_count(module, fit.optimizers[0]))
        rss.append(_rss())
    return {"before": before, "hooks": hooks, "rss": rss, "pending": len(pending_chunks)}


@pytest.mark.parametrize("stage", [2, 3])
def test_repeated_fits_leak_no_hooks_or_memory(pools, stage: int) -> None:
    for result in pools(2).run(repeated_fits, stage, 6):
        growth = (result["rss"][-1] - result["rss"][1]) / 2**20
        print(f"stage {stage}: hooks {result['before']} -> {result['hooks']}; RSS after fits 2..6 grew "
              f"{growth:.2f} MiB")
        assert result["hooks"] == [result["before"]] * len(result["hooks"]) and result["pending"] == 0
        assert growth < 8


def test_timeout_reaches_the_process_group() -> None:
    strategy = ZeroStrategy(timeout=timedelta(seconds=7))
    assert strategy._timeout == timedelta(seconds=7)


def nonfinite_detection() -> dict[str, Any]:
    """The step's flag exchange: large finite gradients whose sum overflows are finite; one NaN in rank 1's
    shard and a non-finite loss on rank 0 are named by rank."""
    from tests.helpers import build_model, loss_of, train_zero

    model = build_model()
    engine, _ = train_zero(model, "sgd", 1, ZeroConfig(stage=2, bucket_numel=150))
    found = []
    for step, (nan_on_rank, loss_on_rank) in enumerate([(None, None), (1, 0)], start=1):
        loss_of(model, step, 0, 1).backward()  # shards are reduced; the flags are not exchanged yet
        shard = engine.trainable_buckets[0].grad_shard
        shard.fill_(3e38)  # finite, but two of them sum to inf
        if dist.get_rank() == nan_on_rank:
            shard[-1] = float("nan")
        if dist.get_rank() == loss_on_rank:
            engine.loss_nonfinite = torch.tensor(True)
        found.append(engine.nonfinite_ranks())
        engine.skip_step()
    engine.close()
    return {"large": found[0], "nan": found[1]}


def test_nonfinite_check_is_exact(pools) -> None:
    for result in pools(2).run(nonfinite_detection):
        assert result["large"] == ([], [])
        assert result["nan"] == ([0], [1])
