"""The GPU check: ZeRO stages against Lightning ``ddp`` on every visible CUDA device, through the Trainer.

    python benchmarks/gpu_check.py            # about 3 minutes on one H200; writes benchmarks/results/
    python benchmarks/gpu_check.py --out DIR  # gpu_check.json and gpu_check.md into DIR instead
    python benchmarks/gpu_check.py --quick    # a smaller GPT, fewer steps

This file owns the one command that measures the project on a GPU. Cases: ``ddp`` (the reference),
``zero1``, ``zero2``, ``zero3`` and ``zero2`` with optimizer offload in ``32-true``; ``ddp``, ``zero2`` and
``zero3`` in ``bf16-mixed``. Each trains the example GPT (``examples/gpt.py``, AdamW) for a fixed number
of steps on all visible GPUs (NCCL) and records: the median step time after warm-up (device synchronized
around each step) and its ratio to ``ddp`` of the same precision; ``torch.cuda.max_memory_allocated`` over
the fit (max over ranks) against ``estimate_memory``'s model state; and the final parameters' largest
relative difference from ``ddp``'s (same seed, same data per rank).

Each case runs in its own process (this script with ``--case``), so a crash or an NCCL hang costs that case
only: it is recorded with the end of its output and the rest go on. Lightning's subprocess launcher
re-invokes that same command line for ranks above 0. Writes ``gpu_check.json`` and ``gpu_check.md`` to
``--out`` and prints the table. Without CUDA it prints that it skipped and exits 0; ``--cpu-dry-run``
(hidden) runs the same machinery on one CPU rank with a tiny model, to test it without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

ROOT = Path(__file__).resolve().parent.parent
SKIP_MESSAGE = "no CUDA device: gpu_check skipped"
MIB = 2**20
LR = 1e-3
CORPUS = "corpus.pt"  # in the run's working directory: the parent writes it once, every case reads it
DATA_SEED = 1234  # rank r draws its batches with DATA_SEED + r, the same in every case
# A parent started under torchrun (or a test's rank) must not hand its rank to the case's own launcher.
_RANK_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE",
             "GROUP_RANK")
_GROUP_GRACE_S = 10.0  # how long ranks above 0 may outlive rank 0 of a finished case before being killed
_MIN_CASE_S = 20.0  # a case given less time than this by the budget is skipped rather than started


@dataclass(frozen=True)
class Case:
    """One run: a system ("ddp", "zero1".."zero3", "zero2_offload") in one Lightning precision."""

    system: str
    precision: str

    @property
    def name(self) -> str:
        return f"{self.system}-{self.precision}"

    @property
    def stage(self) -> int:
        """0 for ddp."""
        return 0 if self.system == "ddp" else int(self.system[len("zero")])

    @property
    def offload(self) -> str:
        return "optimizer" if self.system.endswith("_offload") else "none"


# The reference of each precision runs first. bf16 keeps the stages that change the storage dtype's path
# (2: sharded gradients, 3: gathered parameters); zero1 and offload in bf16 would add little for their time.
CASES = (
    Case("ddp", "32-true"), Case("zero1", "32-true"), Case("zero2", "32-true"), Case("zero3", "32-true"),
    Case("zero2_offload", "32-true"),
    Case("ddp", "bf16-mixed"), Case("zero2", "bf16-mixed"), Case("zero3", "bf16-mixed"),
)


@dataclass(frozen=True)
class Settings:
    """What every case of one run shares; passed to each case's process as JSON on its command line."""

    width: int
    depth: int
    heads: int
    block: int
    batch_size: int  # windows per rank per step
    warmup: int
    steps: int  # timed steps after the warm-up
    accelerator: str  # "gpu" or "cpu" (dry run)
    devices: int
    deterministic: bool = False  # Trainer(deterministic=True): tells kernel nondeterminism from real drift


# full: about 38M parameters; 64 x 256 tokens per rank keeps a step above ~20 ms on an H200 even in bf16.
PROFILES: Mapping[str, Mapping[str, int]] = {
    "full": {"width": 512, "depth": 12, "heads": 8, "block": 256, "batch_size": 64, "warmup": 5, "steps": 20},
    "quick": {"width": 256, "depth": 4, "heads": 4, "block": 128, "batch_size": 16, "warmup": 3, "steps": 8},
    "dry": {"width": 32, "depth": 1, "heads": 2, "block": 16, "batch_size": 4, "warmup": 1, "steps": 2},
}


# ---------------------------------------------------------------------------------------------- one case
class Windows(IterableDataset):
    """Endless random windows of the corpus the parent saved, from a seeded generator: the same stream in
    every case (the example corpus is the package's own sources, which must not change between cases)."""

    def __init__(self, corpus_path: Path, batch_size: int, block: int, seed: int) -> None:
        self.corpus_path, self.batch_size, self.block, self.seed = corpus_path, batch_size, block, seed

    def __iter__(self):  # noqa: ANN204
        from gpt import sample_batch

        data = torch.load(self.corpus_path, weights_only=True)
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield sample_batch(data, self.batch_size, self.block, generator)


class LitGPT(pl.LightningModule):
    """The example GPT with AdamW; no logging, so no collective of its own inside a timed step."""

    def __init__(self, settings: Settings, corpus_path: Path) -> None:
        super().__init__()
        from gpt import GPT

        self.settings, self.corpus_path = settings, corpus_path
        self.model = GPT(width=settings.width, depth=settings.depth, heads=settings.heads, block=settings.block)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model.loss(*batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=LR)

    def train_dataloader(self) -> DataLoader:
        windows = Windows(self.corpus_path, self.settings.batch_size, self.settings.block,
                          DATA_SEED + self.global_rank)
        return DataLoader(windows, batch_size=None)


class Probe(pl.Callback):
    """Step times, peak device memory, model-state bytes and the last loss of one rank.

    A step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, optimizer
    step) with the device synchronized at both ends. The peak counter is reset in ``setup``, before the
    model reaches the device, and read in ``on_train_end``, before teardown gathers stage 3's parameters.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self.peak_bytes: int | None = None
        self.state_bytes: int | None = None
        self.loss: float | None = None
        self._start = 0.0

    @staticmethod
    def _cuda(trainer: pl.Trainer) -> torch.device | None:
        device = trainer.strategy.root_device
        return device if device.type == "cuda" else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if (device := self._cuda(trainer)) is not None:
            torch.cuda.reset_peak_memory_stats(device)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if (device := self._cuda(trainer)) is not None:
            torch.cuda.synchronize(device)  # the previous step's kernels are not this step's
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (device := self._cuda(trainer)) is not None:
            torch.cuda.synchronize(device)
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)
        self.loss = float(outputs["loss"])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (device := self._cuda(trainer)) is not None:
            # A collective (every rank gets here); the report takes the highest rank's peak.
            peak = torch.tensor([float(torch.cuda.max_memory_allocated(device))], device=device)
            self.peak_bytes = int(trainer.strategy.all_gather(peak).max().item())
        engines = getattr(trainer.strategy, "engines", None)
        if engines:
            from lightning_zero import model_state_bytes

            self.state_bytes = model_state_bytes(engines[0]).device_total


def _strategy(case: Case, settings: Settings) -> pl.strategies.Strategy:
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_zero import ZeroStrategy

    backend = "nccl" if settings.accelerator == "gpu" else "gloo"
    if case.system == "ddp":
        return DDPStrategy(process_group_backend=backend)
    return ZeroStrategy(stage=case.stage, offload=case.offload, process_group_backend=backend)


def _estimate(case: Case, module: LitGPT, world_size: int) -> dict[str, int]:
    """Predicted device bytes of model state. ddp's is stage 0 in fp32 whatever the precision: Lightning's
    ``ddp`` keeps fp32 weights, gradients and AdamW state under ``bf16-mixed`` too (autocast only)."""
    from lightning_zero import estimate_memory

    precision = "32-true" if case.stage == 0 else case.precision
    estimate = estimate_memory(module.model, case.stage, world_size, precision, "adamw", offload=case.offload)
    return {"device_total": estimate.device_total, "host_total": estimate.host.total,
            "ddp_total": estimate.ddp_total}


def run_case(case: Case, settings: Settings, workdir: Path) -> None:
    """Train ``case`` on this process's rank. Rank 0 writes ``<case>.json`` and the final parameters
    ``<case>.pt`` (whole, master precision) into ``workdir``; the parent compares those with ddp's."""
    torch.manual_seed(0)  # the same initial weights in every case (and on every rank)
    module = LitGPT(settings, workdir / CORPUS)
    parameters = sum(p.numel() for p in module.parameters())  # the tied head counts once
    estimate = _estimate(case, module, settings.devices)
    probe = Probe(settings.warmup)
    trainer = pl.Trainer(
        accelerator=settings.accelerator, devices=settings.devices, strategy=_strategy(case, settings),
        precision=case.precision, max_steps=settings.warmup + settings.steps, callbacks=[probe], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, deterministic=settings.deterministic,
    )
    trainer.fit(module)
    if not trainer.is_global_zero:
        return
    # After fit the strategy has made the module whole again (ZeRO: fp32 masters under bf16-mixed).
    torch.save({k: v.detach().float().cpu() for k, v in module.state_dict().items()}, workdir / f"{case.name}.pt")
    result = {
        "case": case.name, "system": case.system, "precision": case.precision, "stage": case.stage,
        "offload": case.offload, "world_size": trainer.world_size, "parameters": parameters,
        "step_s": statistics.median(probe.times) if probe.times else None, "step_times_s": probe.times,
        "peak_bytes": probe.peak_bytes, "state_bytes": probe.state_bytes, "estimate": estimate,
        "final_loss": probe.loss,
    }
    (workdir / f"{case.name}.json").write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------------------------- the parent
def launch_case(case: Case, settings: Settings, workdir: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``case`` in a fresh process group and return its result, or a failure naming the end of its
    output. The group goes down with rank 0: a hung rank above 0 must not hold the GPUs for the next case."""
    command = [sys.executable, str(Path(__file__).resolve()), "--case", case.name, "--workdir", str(workdir),
               "--settings", json.dumps(asdict(settings))]
    env = {key: value for key, value in os.environ.items() if key not in _RANK_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    log_path = workdir / f"{case.name}.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        _end_group(proc, grace_s=_GROUP_GRACE_S if code is not None else 0.0)
    wall = time.monotonic() - started
    result_path = workdir / f"{case.name}.json"
    if code == 0 and result_path.exists():
        return {**json.loads(result_path.read_text()), "status": "ok", "wall_s": wall}
    if result_path.exists():  # measured, then failed on the way out (NCCL teardown): keep the numbers
        return {**json.loads(result_path.read_text()), "status": f"exit {code} after its results",
                "error": _tail(log_path), "wall_s": wall}
    status = f"timeout after {timeout_s:.0f} s" if code is None else f"failed (exit {code})"
    return {**_identity(case), "status": status, "error": _tail(log_path), "wall_s": wall}


def _identity(case: Case) -> dict[str, Any]:
    return {"case": case.name, "system": case.system, "precision": case.precision, "stage": case.stage,
            "offload": case.offload}


def _end_group(proc: subprocess.Popen, grace_s: float) -> None:
    """Let the case's process group (rank 0 and the ranks it launched) exit for ``grace_s``, then kill it."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)  # raises once no process of the group is left
        except ProcessLookupError:
            break
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(path: Path, lines: int = 30, width: int = 400) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(line[:width] for line in text[-lines:])


def run_cases(cases: Sequence[Case], settings: Settings, workdir: Path, timeout_s: float,
              budget_s: float) -> list[dict[str, Any]]:
    """Each case in turn within ``budget_s`` in all; a case the budget cannot fit is recorded as skipped."""
    started = time.monotonic()
    results = []
    for index, case in enumerate(cases, 1):
        left = budget_s - (time.monotonic() - started)
        if left < _MIN_CASE_S:
            results.append({**_identity(case), "status": "skipped (time budget)"})
        else:
            results.append(launch_case(case, settings, workdir, min(timeout_s, left)))
        wall = results[-1].get("wall_s")
        took = f" in {wall:.0f} s" if wall is not None else ""
        print(f"[gpu_check] {index}/{len(cases)} {case.name}: {results[-1]['status']}{took}", file=sys.stderr,
              flush=True)
    return results


def parameter_differences(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]
                          ) -> dict[str, Any]:
    """How far ``other``'s tensors are from ``reference``'s, in float64: ``max``, the largest
    ||other - reference|| / ||reference|| over tensors (||other - reference|| where the reference is zero),
    ``worst``, that tensor's name, and ``global``, the same ratio over all tensors at once (a bias that
    started at zero has a small norm after a few steps, so its ratio can dominate ``max``). A non-finite
    value makes both ratios inf."""
    if reference.keys() != other.keys():
        raise ValueError(f"parameter names differ: {sorted(set(reference) ^ set(other))[:5]}")
    worst, worst_name, delta_sq, scale_sq = 0.0, None, 0.0, 0.0
    for name, ref in reference.items():
        got = other[name]
        if got.shape != ref.shape:
            raise ValueError(f"{name}: shape {tuple(got.shape)} against the reference's {tuple(ref.shape)}")
        if not ref.is_floating_point():
            continue
        delta = torch.linalg.vector_norm(got.double() - ref.double()).item()
        scale = torch.linalg.vector_norm(ref.double()).item()
        value = delta / scale if scale else delta
        if not math.isfinite(value):
            return {"max": math.inf, "worst": name, "global": math.inf}
        if value > worst or worst_name is None:
            worst, worst_name = value, name
        delta_sq, scale_sq = delta_sq + delta**2, scale_sq + scale**2
    return {"max": worst, "worst": worst_name, "global": math.sqrt(delta_sq / scale_sq) if scale_sq else 0.0}


def add_parity(results: list[dict[str, Any]], workdir: Path) -> None:
    """Set ``parity_vs_ddp`` on each finished ZeRO case from the ``.pt`` files its process and ddp's wrote."""
    references: dict[str, dict[str, torch.Tensor]] = {}
    for result in results:
        path, reference_path = workdir / f"{result['case']}.pt", workdir / f"ddp-{result['precision']}.pt"
        if result["system"] == "ddp" or not path.exists() or not reference_path.exists():
            continue  # failed before its parameters were saved, or ddp of this precision did (its row says so)
        if result["precision"] not in references:
            references[result["precision"]] = torch.load(reference_path, weights_only=True)
        parameters = torch.load(path, weights_only=True)
        try:
            differences = parameter_differences(references[result["precision"]], parameters)
        except ValueError as exc:
            result["parity_error"] = str(exc)
            continue
        result.update(parity_vs_ddp=differences["max"], parity_worst_tensor=differences["worst"],
                      parity_global=differences["global"])


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None where either is missing or the denominator is zero."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def add_comparisons(results: list[dict[str, Any]]) -> None:
    """Step-time ratio to ddp of the same precision, peak and measured model state against the estimate."""
    ddp_step = {r["precision"]: r.get("step_s") for r in results if r["system"] == "ddp"}
    for result in results:
        estimated = (result.get("estimate") or {}).get("device_total")
        result["ratio_to_ddp"] = ratio(result.get("step_s"), ddp_step.get(result["precision"]))
        result["peak_over_estimate"] = ratio(result.get("peak_bytes"), estimated)
        result["state_over_estimate"] = ratio(result.get("state_bytes"), estimated)


def assemble(meta: Mapping[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON document: the run's context, then every case with its comparisons."""
    add_comparisons(results)
    parameters = next((r["parameters"] for r in results if r.get("parameters")), None)
    return {**meta, "parameters": parameters, "cases": results}


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else format(value, spec) + suffix


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / MIB:,.1f}"


def format_table(report: Mapping[str, Any]) -> str:
    """The markdown report: context, one row per case, what the columns mean, then each failure's output."""
    settings = report["settings"]
    world = report["world_size"]
    parameters = f"{report['parameters']:,}" if report.get("parameters") else "?"
    lines = [
        f"# gpu_check: {report['device']} x {world}",
        "",
        f"torch {report['torch']}, lightning {report['lightning']}, python {report['python']}; GPT of "
        f"{parameters} parameters (width {settings['width']}, depth {settings['depth']}, context "
        f"{settings['block']}), AdamW, {settings['batch_size']} windows per rank per step, {settings['warmup']} "
        f"warm-up + {settings['steps']} timed steps; fp32 matmul precision '{report['float32_matmul_precision']}'.",
        "",
        "| case | precision | step (ms) | vs ddp | peak alloc (MiB) | state est. (MiB) | peak / est. | "
        "peak − est. (MiB) | state measured / est. | params vs ddp (max / all) | final loss | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["cases"]:
        estimated = (r.get("estimate") or {}).get("device_total")
        rest = r["peak_bytes"] - estimated if r.get("peak_bytes") is not None and estimated is not None else None
        parity = "ref." if r["system"] == "ddp" and r.get("step_s") is not None else (
            f"{_fmt(r.get('parity_vs_ddp'), '.1e')} / {_fmt(r.get('parity_global'), '.1e')}")
        step_ms = r["step_s"] * 1e3 if r.get("step_s") is not None else None
        lines.append(
            f"| {r['system']} | {r['precision']} | {_fmt(step_ms, '.1f')} | {_fmt(r.get('ratio_to_ddp'), '.2f', 'x')} "
            f"| {_mib(r.get('peak_bytes'))} | {_mib(estimated)} | {_fmt(r.get('peak_over_estimate'), '.2f')} "
            f"| {_mib(rest)} | {_fmt(r.get('state_over_estimate'), '.3f')} | {parity} "
            f"| {_fmt(r.get('final_loss'), '.4f')} | {r['status']} |"
        )
    lines += ["", *(f"- {note}" for note in notes(world))]
    for r in report["cases"]:
        if r.get("error") or r.get("parity_error"):
            lines += ["", f"## {r['case']}: {r['status']}", "", "```", r.get("error") or r["parity_error"], "```"]
    return "\n".join(lines) + "\n"


def notes(world_size: int) -> list[str]:
    """What the columns mean and what they cannot show."""
    out = [
        "step: median over the timed steps of rank 0, from on_train_batch_start to on_train_batch_end (forward, "
        "backward, optimizer step) with the device synchronized at both ends; vs ddp: against ddp of the same "
        "precision.",
        "peak alloc: torch.cuda.max_memory_allocated over the fit, highest rank; it includes activations, "
        "temporaries and communication buffers, which the estimate leaves out, so peak / est. > 1 and "
        "peak − est. is roughly the activations' share (ddp's also holds its bucket copies of the gradients).",
        "state est.: estimate_memory's device bytes of model state per rank (ZeRO: this stage, precision and "
        "offload; ddp: stage 0 in fp32, as Lightning's ddp keeps fp32 weights, gradients and AdamW state under "
        "bf16-mixed too). state measured: model_state_bytes(engine).device_total after the last step.",
        "params vs ddp: max over tensors of ||Δ||/||ref|| between the final parameters and ddp's of the same "
        "precision (same seed, same data per rank), then the same ratio over all parameters at once (biases "
        "start at zero, so after few steps theirs can dominate the max; the JSON names the worst tensor). "
        "The CPU tests hold 32-true at <= 1e-5; in bf16-mixed ZeRO stores parameters in bf16 (fp32 masters) "
        "where ddp keeps fp32 parameters under autocast, so expect a bf16-sized difference there.",
    ]
    if world_size < 2:
        out.append("world size 1: parity checks the engine's CUDA stream/event ordering and flat-buffer math "
                   "against plain training; cross-rank parity (reduce-scatter and all-gather against ddp's "
                   "all-reduce) needs >= 2 GPUs.")
    return out


def write_outputs(report: Mapping[str, Any], markdown: str, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "gpu_check.json", out_dir / "gpu_check.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def _meta(settings: Settings, dry_run: bool, wall_s: float) -> dict[str, Any]:
    # Asked only after the cases ran, so this process never holds a CUDA context while they measure.
    device = "cpu (dry run)" if dry_run else torch.cuda.get_device_name(0)
    return {"device": device, "world_size": settings.devices, "torch": torch.__version__,
            "lightning": lightning.__version__, "python": platform.python_version(),
            "cuda": None if dry_run else torch.version.cuda,
            "float32_matmul_precision": torch.get_float32_matmul_precision(), "settings": asdict(settings),
            "wall_s": wall_s, "notes": notes(settings.devices)}


# ---------------------------------------------------------------------------------------------- command line
def _add_paths() -> None:
    # Run from a checkout without installing: the package from the repo root, ``gpt`` from examples/.
    for path in (ROOT / "examples", ROOT):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


def select_cases(names: str | None) -> list[Case]:
    """The cases named in a comma-separated list (all when None), in the run's order."""
    if not names:
        return list(CASES)
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    known = {case.name: case for case in CASES}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(known)}")
    return [case for case in CASES if case.name in wanted]


def settings_for(args: argparse.Namespace) -> Settings:
    profile = dict(PROFILES["dry" if args.cpu_dry_run else "quick" if args.quick else "full"])
    for key in ("steps", "warmup"):
        if getattr(args, key) is not None:
            profile[key] = getattr(args, key)
    if args.cpu_dry_run:
        return Settings(**profile, accelerator="cpu", devices=args.devices or 1, deterministic=args.deterministic)
    return Settings(**profile, accelerator="gpu", devices=args.devices or torch.cuda.device_count(),
                    deterministic=args.deterministic)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--quick", action="store_true", help="a smaller GPT and fewer steps")
    parser.add_argument("--cases", help=f"comma-separated subset of: {', '.join(c.name for c in CASES)}")
    parser.add_argument("--devices", type=int, help="GPUs to use (default: all visible)")
    parser.add_argument("--steps", type=int, help="timed steps (default: 20, --quick 8)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 5, --quick 3)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic kernels in every case (parity without CUDA's atomics-order noise)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one case may take")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds all cases may take")
    parser.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    # One case's process (and, through Lightning's launcher, its other ranks): set by the parent.
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _add_paths()
    if args.case:
        run_case(select_cases(args.case)[0], Settings(**json.loads(args.settings)), args.workdir)
        return 0
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(SKIP_MESSAGE)
        return 0
    settings = settings_for(args)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        from gpt import corpus

        torch.save(corpus(), Path(tmp) / CORPUS)
        results = run_cases(select_cases(args.cases), settings, Path(tmp), args.timeout, args.budget)
        add_parity(results, Path(tmp))
    report = assemble(_meta(settings, args.cpu_dry_run, time.monotonic() - started), results)
    markdown = format_table(report)
    print(markdown, end="")
    json_path, md_path = write_outputs(report, markdown, args.out)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0 if all(r["status"] == "ok" and not r.get("parity_error") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
