"""Where lightning-zero's time goes inside an optimizer step, against torch DDP in the same processes.

    python benchmarks/hot_path.py --repeats 3                          # 5M, accumulate 1
    python benchmarks/hot_path.py --size 20M --accumulate 4 --name hot_path_20m_acc4

Every function of the engine's hot path (gradient hooks, bucket launches and completions, stage 3's gathers
and releases, the optimizer step and the all-gather after it) is wrapped with a timer, and so are the
model's forward, autograd's backward and AdamW's own step; collectives' waits are timed apart, and nested
time is charged to the innermost wrapper only, so the parts add up ("other" is the rest of the step: the
loop, the loss, DDP's own hooks). The GPT sizes of ``peers.py``, fp32 AdamW, 2 ranks each pinned to its own
core, micro-batches before the last inside ``no_sync()``; rank 0's numbers. Writes
benchmarks/results/NAME.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
from harness import gpt_step, run_pinned, time_interleaved  # noqa: E402

SYSTEMS = ("ddp", "zero1", "zero2", "zero3")
SIZES: dict[str, tuple[int, int, int]] = {"5M": (384, 3, 6), "20M": (512, 6, 8), "80M": (1152, 5, 18)}  # peers.py's

#: (module, owner, attribute) -> label. ``wait_all`` is every wait for a collective on the CPU.
PARTS = {
    ("gpt", "GPT", "forward"): "forward (stage 3's gathers apart)",
    ("torch", "Tensor", "backward"): "backward (the engine's hooks apart)",
    ("torch.optim", "AdamW", "step"): "AdamW's own step",
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
OTHER = "other (loop, loss, DDP's hooks)"

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
    size = SIZES[args.size]
    steps, closers = {}, []
    for name in args.systems:
        config = {} if name == "ddp" else {"reduce_policy": args.reduce_policy} | (
            {"bucket_numel": args.bucket_numel} if args.bucket_numel else {})
        steps[name], close = gpt_step(name, size, args.accumulate, **config)
        closers.append(close)
    parts: dict[str, list[dict[str, float]]] = {name: [] for name in args.systems}
    counts: dict[str, Counter[str]] = {name: Counter() for name in args.systems}

    @contextlib.contextmanager
    def around(name: str, timed: bool) -> Iterator[None]:
        spent.clear()
        calls.clear()
        start = time.perf_counter()
        yield
        if timed:
            step = dict(spent)
            step[OTHER] = time.perf_counter() - start - sum(spent.values())
            parts[name].append(step)
            counts[name].update(calls)

    times = time_interleaved(steps, rank, args.batch_size * args.accumulate, args.warmup,
                             args.repeats * args.steps, around)
    for close in closers:
        close()
    rounds = args.repeats * args.steps
    return {"steps": times, "parts": parts, "calls": {n: {k: v / rounds for k, v in c.items()}
                                                      for n, c in counts.items()},
            "parameters": sum(p.numel() for p in GPT(*size).parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--size", choices=list(SIZES), default="5M")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="micro-batch, sequences of 64 tokens")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--reduce-policy", default="auto", choices=("auto", "boundary", "every_micro_batch"))
    parser.add_argument("--bucket-numel", type=int, default=0, help="ZeroConfig.bucket_numel (0: its default)")
    parser.add_argument("--name", default="hot_path", help="results go to benchmarks/results/NAME.json, .md")
    args = parser.parse_args()
    args.systems = ["ddp", *(s for s in args.systems if s != "ddp")]  # every ratio is taken against it
    result = run_pinned(_worker, args)
    ddp = result["steps"]["ddp"]
    lines = [f"GPT {result['parameters']:,} parameters, fp32 AdamW, accumulate {args.accumulate}, 2 pinned ranks, "
             f"{args.repeats * args.steps} rounds of one step of each system in turn after {args.warmup} warm-up, "
             f"torch {torch.__version__}; rank 0, ms per optimizer step (median over rounds; the step's ratio to "
             "DDP is the median of each round's ratio); calls per step in brackets", ""]
    header = ["part"] + args.systems
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows: dict[str, dict[str, Any]] = {}
    labels = [*dict.fromkeys(PARTS.values()), OTHER]
    for name in args.systems:
        rows[name] = {
            "median_step_s": statistics.median(result["steps"][name]),
            "ratio_to_ddp": statistics.median(a / b for a, b in zip(result["steps"][name], ddp)),
            "parts_ms": {label: 1e3 * statistics.median(p.get(label, 0.0) for p in result["parts"][name])
                         for label in labels},
            "calls_per_step": result["calls"][name],
        }
    for label in labels:
        cells = []
        for name in args.systems:
            ms, count = rows[name]["parts_ms"][label], rows[name]["calls_per_step"].get(label, 0)
            cells.append(f"{ms:.1f} ({count:g})" if count or label == OTHER else "—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| **step (ms)** | " + " | ".join(
        f"**{1e3 * rows[n]['median_step_s']:.1f}** ({rows[n]['ratio_to_ddp']:.3f}x)" for n in args.systems) + " |")
    print("\n".join(lines))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (HERE / "results" / f"{args.name}.json").write_text(json.dumps(
        {"parameters": result["parameters"], "ddp_median_step_s": statistics.median(ddp), "systems": rows,
         "repeats": args.repeats, "steps": args.steps, "accumulate": args.accumulate, "size": args.size},
        indent=2))


if __name__ == "__main__":
    main()
