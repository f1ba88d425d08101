"""Reduction policy under accumulation: step time and gradient bytes of "boundary" against
"every_micro_batch", per stage, at world size 2 with each rank pinned to its own core.

    python benchmarks/reduce_policy.py --accumulate 4 --repeats 5

Runs are interleaved (policy A, policy B, A, B, ...) and the median of per-repeat ratios is reported.
Writes benchmarks/results/reduce_policy.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
from harness import common_arguments, run_pinned  # noqa: E402


def _worker(rank: int, args: argparse.Namespace) -> tuple[int, dict]:
    from gpt import GPT, corpus, sample_batch

    from lightning_zero import ZeroConfig, ZeroEngine, model_state_bytes

    data = corpus()
    results: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.repeats):
        for stage in args.stages:
            for policy in ("boundary", "every_micro_batch"):
                torch.manual_seed(0)
                model = GPT(width=args.width, depth=args.depth)
                engine = ZeroEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                                    ZeroConfig(stage=stage, reduce_policy=policy, bucket_numel=2**20))
                generator = torch.Generator().manual_seed(rank)
                times, grad_bytes = [], 0
                for step in range(args.warmup + args.steps):
                    dist.barrier()
                    start = time.perf_counter()
                    for micro in range(args.accumulate):
                        x, y = sample_batch(data, args.batch_size, model.block, generator)
                        last = micro == args.accumulate - 1
                        with contextlib.nullcontext() if last else engine.no_sync():
                            (model.loss(x, y) / args.accumulate).backward()
                        if micro == args.accumulate - 2:
                            grad_bytes = max(grad_bytes, model_state_bytes(engine).gradients)
                    engine.step()
                    if step >= args.warmup:
                        times.append(time.perf_counter() - start)
                engine.close()
                entry = results.setdefault(f"zero{stage}/{policy}", {"median_s": [], "grad_bytes": []})
                entry["median_s"].append(statistics.median(times))
                entry["grad_bytes"].append(grad_bytes)
    return sum(p.numel() for p in GPT(width=args.width, depth=args.depth).parameters()), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser)
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    psi, results = run_pinned(_worker, args)
    rows = []
    print(f"GPT {psi:,} parameters, fp32 AdamW, world size 2 (pinned), accumulate {args.accumulate}, "
          f"{args.repeats} interleaved repeats\n")
    print("| stage | policy | median step (s) | ratio to every_micro_batch | gradient bytes mid-window |")
    print("|---|---|---|---|---|")
    for stage in args.stages:
        base = results[f"zero{stage}/every_micro_batch"]["median_s"]
        for policy in ("boundary", "every_micro_batch"):
            entry = results[f"zero{stage}/{policy}"]
            ratio = statistics.median(a / b for a, b in zip(entry["median_s"], base))
            row = {"stage": stage, "policy": policy, "median_step_s": statistics.median(entry["median_s"]),
                   "ratio_to_every_micro_batch": ratio, "grad_bytes_mid_window": max(entry["grad_bytes"])}
            rows.append(row)
            print(f"| {stage} | {policy} | {row['median_step_s']:.4f} | {ratio:.3f} | "
                  f"{row['grad_bytes_mid_window']:,} |")
    (HERE / "results").mkdir(exist_ok=True)
    payload = {"parameters": psi, "accumulate": args.accumulate, "repeats": args.repeats,
               "torch": torch.__version__, "rows": rows}
    (HERE / "results" / "reduce_policy.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
