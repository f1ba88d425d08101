"""How much gradient precision bf16 reduction and bf16 accumulation lose, to choose ZeroPrecision's
default reduce and accumulate dtypes.

    python benchmarks/precision_dtypes.py

Real gradients of the example GPT (bf16 parameters under bf16 autocast) for N ranks x k micro-batches
are combined four ways: reduced in bf16 or fp32 (a ring sums one rank at a time, rounding after each
add), accumulated across micro-batches in bf16 or fp32. Error is ||g - g64|| / ||g64|| against the same
gradients combined in fp64. Also prints the bytes each choice costs per parameter.
Writes benchmarks/results/precision_dtypes.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))


def main() -> None:
    from gpt import GPT, corpus, sample_batch

    torch.manual_seed(0)
    model = GPT(width=128, depth=2).to(torch.bfloat16)
    data = corpus()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for ranks, micro in ((2, 1), (4, 1), (8, 1), (2, 4), (2, 8), (8, 8)):
        grads = []  # grads[r][m]: flat bf16 gradient of rank r, micro-batch m
        for _ in range(ranks):
            per_rank = []
            for _ in range(micro):
                model.zero_grad(set_to_none=True)
                x, y = sample_batch(data, 4, model.block, generator)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model.loss(x, y) / micro
                loss.backward()
                per_rank.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
            grads.append(per_rank)
        truth = sum(g.double() for per_rank in grads for g in per_rank) / ranks
        for reduce_dtype in (torch.bfloat16, torch.float32):
            for accumulate_dtype in (torch.bfloat16, torch.float32):
                accumulated = torch.zeros_like(truth, dtype=accumulate_dtype)
                for m in range(micro):
                    reduced = torch.zeros_like(truth, dtype=reduce_dtype)
                    for r in range(ranks):  # ring order: one add at a time, rounded to reduce_dtype
                        reduced = (reduced + grads[r][m].to(reduce_dtype)).to(reduce_dtype)
                    accumulated = (accumulated + reduced.to(accumulate_dtype)).to(accumulate_dtype)
                result = accumulated.double() / ranks
                error = ((result - truth).norm() / truth.norm()).item()
                rows.append({"ranks": ranks, "micro_batches": micro, "reduce": str(reduce_dtype),
                             "accumulate": str(accumulate_dtype), "relative_error": error})
    print("| ranks | micro-batches | reduce | accumulate | ||g - g64|| / ||g64|| |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['ranks']} | {row['micro_batches']} | {row['reduce'][6:]} | {row['accumulate'][6:]} | "
              f"{row['relative_error']:.2e} |")
    print("\nbytes per parameter: reduce buffer bf16 2 / fp32 4 (transient, per bucket in flight); "
          "gradient shard bf16 2/N / fp32 4/N (held)")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "precision_dtypes.json").write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
