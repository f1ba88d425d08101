"""Where lightning-zero's time goes inside an optimizer step, against torch DDP in the same processes.

    python benchmarks/hot_path.py --repeats 3

Every function of the engine's hot path (gradient hooks, bucket launches and completions, stage 3's gathers
and releases, the optimizer step and the all-gather after it) is wrapped with a timer; collectives' waits
are timed apart, and nested time is charged to the innermost wrapper only, so the parts add up. The 5.4M
GPT of ``peers.py``, fp32 AdamW, accumulate 1, 2 ranks each pinned to its own core; rank 0's numbers.
Writes benchmarks/results/hot_path.json and .md.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
from harness import run_pinned, time_gpt_steps  # noqa: E402

SYSTEMS = ("ddp", "zero1", "zero2", "zero3")
SIZE = (384, 3, 6)  # peers.py's 5M

#: (module, owner, attribute) -> label. ``wait_all`` is every wait for a collective on the CPU.
PARTS = {
    ("lightning_zero.sharding.bucket", "FlatBucket", "reduce"): "gradient bucket: copy in, launch",
    ("lightning_zero.sharding.bucket", "FlatBucket", "wait_reduce"): "gradient bucket: add to shard",
    ("lightning_zero.sharding.gradients", "GradientReducer", "_end_of_backward"): "end of backward",
    ("lightning_zero.sharding.bucket", "FlatBucket", "unshard"): "stage 3: allocate, launch gather",
    ("lightning_zero.sharding.bucket", "FlatBucket", "wait_unshard"): "stage 3: point parameters at buffer",
    ("lightning_zero.sharding.bucket", "FlatBucket", "reshard"): "stage 3: release",
    ("lightning_zero.sharding.optimizer", "ShardedOptimizer", "step"): "optimizer step (user's AdamW on slices)",
    ("lightning_zero.sharding.engine", "ZeroEngine", "reduce_gradients"): "flag exchange, divide gradients",
    ("lightning_zero.sharding.engine", "ZeroEngine", "_gather_params"): "copy back, launch all-gather",
    ("lightning_zero.sharding.engine", "ZeroEngine", "zero_grad"): "zero gradients",
    ("lightning_zero.sharding.collectives", None, "wait_all"): "waiting for collectives",
}

spent: Counter[str] = Counter()
calls: Counter[str] = Counter()
_stack: list[list[float]] = []  # per open wrapper: [time spent in nested wrappers]


def _timed(label: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _stack.append([0.0])
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            nested = _stack.pop()[0]
            spent[label] += elapsed - nested
            calls[label] += 1
            if _stack:
                _stack[-1][0] += elapsed

    return wrapper


def _install() -> None:
    import importlib

    for (module_name, owner, attribute), label in PARTS.items():
        module = importlib.import_module(module_name)
        target = getattr(module, owner) if owner else module
        setattr(target, attribute, _timed(label, getattr(target, attribute)))
    # the modules that imported ``wait_all`` by name (``Handle.wait`` looks it up in ``collectives``)
    from lightning_zero.sharding import collectives, engine

    engine.wait_all = collectives.wait_all  # type: ignore[attr-defined]


def _worker(rank: int, args: argparse.Namespace) -> dict[str, Any]:
    from gpt import GPT

    _install()
    steps: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    parts: dict[str, list[dict[str, float]]] = {name: [] for name in SYSTEMS}
    counts: dict[str, dict[str, float]] = {}

    def restart() -> None:
        spent.clear()
        calls.clear()

    for _ in range(args.repeats):
        for name in SYSTEMS:
            times = time_gpt_steps(name, rank, SIZE, 8, args.warmup, args.steps, on_warm=restart)
            steps[name].append(statistics.median(times))
            parts[name].append({label: seconds / args.steps for label, seconds in spent.items()})
            counts[name] = {label: n / args.steps for label, n in calls.items()}
    return {"steps": steps, "parts": parts, "calls": counts,
            "parameters": sum(p.numel() for p in GPT(*SIZE).parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    result = run_pinned(_worker, args)
    ddp = result["steps"]["ddp"]
    lines = [f"GPT {result['parameters']:,} parameters, fp32 AdamW, accumulate 1, 2 pinned ranks, "
             f"{args.repeats} interleaved repeats of {args.steps} steps, torch {torch.__version__}; rank 0, "
             "ms per optimizer step (median over repeats); calls per step in brackets", ""]
    header = ["part"] + list(SYSTEMS[1:])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows: dict[str, dict[str, Any]] = {}
    labels = list(dict.fromkeys(PARTS.values()))
    for name in SYSTEMS[1:]:
        rows[name] = {
            "median_step_s": statistics.median(result["steps"][name]),
            "ratio_to_ddp": statistics.median(a / b for a, b in zip(result["steps"][name], ddp)),
            "parts_ms": {label: 1e3 * statistics.median(p.get(label, 0.0) for p in result["parts"][name])
                         for label in labels},
            "calls_per_step": result["calls"][name],
        }
    for label in labels:
        cells = []
        for name in SYSTEMS[1:]:
            ms, count = rows[name]["parts_ms"][label], rows[name]["calls_per_step"].get(label, 0)
            cells.append(f"{ms:.1f} ({count:g})" if count else "—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| **engine total** | " + " | ".join(
        f"**{sum(rows[n]['parts_ms'].values()):.1f}**" for n in SYSTEMS[1:]) + " |")
    lines.append("| step (ms), torch DDP " + f"{1e3 * statistics.median(ddp):.1f} | " + " | ".join(
        f"{1e3 * rows[n]['median_step_s']:.1f} ({rows[n]['ratio_to_ddp']:.3f}x)" for n in SYSTEMS[1:]) + " |")
    print("\n".join(lines))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "hot_path.md").write_text("\n".join(lines) + "\n")
    (HERE / "results" / "hot_path.json").write_text(json.dumps(
        {"parameters": result["parameters"], "ddp_median_step_s": statistics.median(ddp), "systems": rows,
         "repeats": args.repeats, "steps": args.steps}, indent=2))


if __name__ == "__main__":
    main()
