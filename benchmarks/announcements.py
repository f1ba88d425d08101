"""What stage 3's unit announcements cost (see [Note: unit announcements] in lightning_zero/sharding/parameters.py).

    python benchmarks/announcements.py --repeats 5

Each repeat runs, in turn (interleaved), torch DDP and zero3 three ways on the example GPT (fp32 AdamW,
accumulate 1, 2 ranks each pinned to its own core): "off" with the announcements switched off by patching
(what stage 3 did before them: unsafe, a rank-dependent module then aborts inside gloo), the default, and
``check_gathers=True``. The table gives median step times, the median per-repeat ratio to DDP, and the
announcements made per step. Writes benchmarks/results/announcements_w{width}_d{depth}.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
from harness import parse_arguments, ratio_rows, run_pinned, time_steps  # noqa: E402

SYSTEMS = ("ddp", "zero3 off", "zero3", "zero3 check_gathers")


def _run(system: str, rank: int, args: argparse.Namespace) -> tuple[float, float]:
    """Median step time of ``system`` and its announcements per step."""
    from gpt import GPT

    from lightning_zero import ZeroConfig, ZeroEngine

    torch.manual_seed(0)
    model = GPT(args.width, args.depth)
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-3)]
    engine = None if system == "ddp" else ZeroEngine(
        model, optimizers, ZeroConfig(stage=3, check_gathers=system.endswith("check_gathers")))
    if system == "zero3 off":
        assert engine is not None and engine.sharder is not None
        engine.sharder._announce = lambda code: None  # type: ignore[method-assign]
        engine.sharder._verify = lambda: None  # type: ignore[method-assign]
    times = time_steps(model, optimizers, engine, rank, args.batch_size, args.warmup, args.steps)
    per_step = 0.0
    if engine is not None:
        assert engine.sharder is not None
        per_step = engine.sharder.announcements / (args.warmup + args.steps)
        engine.close()
    return statistics.median(times), per_step


def _worker(rank: int, args: argparse.Namespace) -> dict[str, Any]:
    from gpt import GPT

    medians: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    counts: dict[str, float] = {}
    for _ in range(args.repeats):
        for name in SYSTEMS:
            median, counts[name] = _run(name, rank, args)
            medians[name].append(median)
    psi = sum(p.numel() for p in GPT(args.width, args.depth).parameters())
    return {"parameters": psi, "medians": medians, "announcements_per_step": counts}


def main() -> None:
    args = parse_arguments(__doc__)
    result = run_pinned(_worker, args)
    lines = [f"GPT {result['parameters']:,} parameters, fp32 AdamW, accumulate 1, world size 2 (each rank pinned to "
             f"a core, gloo), {args.repeats} interleaved repeats, torch {torch.__version__}", "",
             "| system | median step (s) | ratio to DDP | announcements per step |", "|---|---|---|---|"]
    rows = ratio_rows(result["medians"])
    for row in rows:
        row["announcements_per_step"] = result["announcements_per_step"][row["system"]]
        lines.append(f"| {row['system']} | {row['median_step_s']:.4f} | {row['ratio_to_ddp']:.3f} | "
                     f"{row['announcements_per_step']:.0f} |")
    print("\n".join(lines))
    (HERE / "results").mkdir(exist_ok=True)
    name = f"announcements_w{args.width}_d{args.depth}"
    (HERE / "results" / f"{name}.md").write_text("\n".join(lines) + "\n")
    (HERE / "results" / f"{name}.json").write_text(json.dumps(
        {"parameters": result["parameters"], "repeats": args.repeats, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
