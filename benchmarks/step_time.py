"""Step time of ZeRO stages 1-3 against torch DDP, at world size 2 with each rank pinned to its own core.

    python benchmarks/step_time.py --repeats 5

Each repeat runs every system once, in turn (interleaved), on the example GPT with AdamW in fp32; the
table gives the median step time and the median over repeats of the ratio to DDP in the same repeat.
Writes benchmarks/results/step_time.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
from harness import parse_arguments, ratio_rows, run_pinned, time_gpt_steps  # noqa: E402

SYSTEMS = ("ddp", "zero1", "zero2", "zero3")


def _worker(rank: int, args: argparse.Namespace) -> tuple[int, dict]:
    from gpt import GPT

    medians: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    for _ in range(args.repeats):
        for name in SYSTEMS:
            times = time_gpt_steps(name, rank, (args.width, args.depth), args.batch_size, args.warmup, args.steps)
            medians[name].append(statistics.median(times))
    return sum(p.numel() for p in GPT(width=args.width, depth=args.depth).parameters()), medians


def main() -> None:
    args = parse_arguments(__doc__)
    psi, medians = run_pinned(_worker, args)
    lines = [f"GPT {psi:,} parameters, fp32 AdamW, accumulate 1, world size 2 (each rank pinned to a core), "
             f"{args.repeats} interleaved repeats, torch {torch.__version__}", "",
             "| system | median step (s) | ratio to DDP (median of per-repeat ratios) |", "|---|---|---|"]
    rows = ratio_rows(medians)
    lines += [f"| {row['system']} | {row['median_step_s']:.4f} | {row['ratio_to_ddp']:.3f} |" for row in rows]
    print("\n".join(lines))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "step_time.md").write_text("\n".join(lines) + "\n")
    (HERE / "results" / "step_time.json").write_text(json.dumps({"parameters": psi, "rows": rows,
                                                                 "repeats": args.repeats}, indent=2))


if __name__ == "__main__":
    main()
