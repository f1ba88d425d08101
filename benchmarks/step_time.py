"""Step time of ZeRO stages 1-3 against torch DDP, at world size 2 with each rank pinned to its own core.

    python benchmarks/step_time.py --repeats 5

Each repeat runs every system once, in turn (interleaved), on the example GPT with AdamW in fp32; the
table gives the median step time and the median over repeats of the ratio to DDP in the same repeat.
Writes benchmarks/results/step_time.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
SYSTEMS = ("ddp", "zero1", "zero2", "zero3")


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: mp.Queue) -> None:
    from gpt import GPT, corpus, sample_batch
    from torch.nn.parallel import DistributedDataParallel

    from lightning_zero import ZeroConfig, ZeroEngine

    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= world:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank]})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    data = corpus()
    medians: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    for _ in range(args.repeats):
        for name in SYSTEMS:
            torch.manual_seed(0)
            model = GPT(width=args.width, depth=args.depth)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            if name == "ddp":
                net, engine = DistributedDataParallel(model), None
            else:
                net, engine = model, ZeroEngine(model, optimizer, ZeroConfig(stage=int(name[-1])))
            generator = torch.Generator().manual_seed(rank)
            times = []
            for step in range(args.warmup + args.steps):
                x, y = sample_batch(data, args.batch_size, model.block, generator)
                dist.barrier()
                start = time.perf_counter()
                logits = net(x)
                torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
                if engine is None:
                    optimizer.step()
                    optimizer.zero_grad()
                else:
                    engine.step()
                if step >= args.warmup:
                    times.append(time.perf_counter() - start)
            if engine is not None:
                engine.close()
            medians[name].append(statistics.median(times))
    if rank == 0:
        out.put((sum(p.numel() for p in GPT(width=args.width, depth=args.depth).parameters()), medians))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, args, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    psi, medians = out.get()
    for proc in procs:
        proc.join()
    lines = [f"GPT {psi:,} parameters, fp32 AdamW, accumulate 1, world size 2 (each rank pinned to a core), "
             f"{args.repeats} interleaved repeats, torch {torch.__version__}", "",
             "| system | median step (s) | ratio to DDP (median of per-repeat ratios) |", "|---|---|---|"]
    rows = []
    for name in SYSTEMS:
        ratio = statistics.median(a / b for a, b in zip(medians[name], medians["ddp"]))
        rows.append({"system": name, "median_step_s": statistics.median(medians[name]), "ratio_to_ddp": ratio})
        lines.append(f"| {name} | {rows[-1]['median_step_s']:.4f} | {ratio:.3f} |")
    print("\n".join(lines))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "step_time.md").write_text("\n".join(lines) + "\n")
    (HERE / "results" / "step_time.json").write_text(json.dumps({"parameters": psi, "rows": rows,
                                                                 "repeats": args.repeats}, indent=2))


if __name__ == "__main__":
    main()
