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
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: mp.Queue) -> None:
    from gpt import GPT, corpus, sample_batch

    from lightning_zero import ZeroConfig, ZeroEngine, model_state_bytes

    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= world:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank]})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
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
    if rank == 0:
        out.put((sum(p.numel() for p in GPT(width=args.width, depth=args.depth).parameters()), results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, args, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    psi, results = out.get()
    for proc in procs:
        proc.join()
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
