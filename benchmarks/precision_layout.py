"""What keeping norms, vectors and embeddings in fp32 under bf16-mixed costs, against storing every
trainable parameter in bf16 (the layout before), at world size 2 with each rank pinned to its own core.

    python benchmarks/precision_layout.py --repeats 5

The example GPT with AdamW under bf16-mixed autocast, engine level, stages 1-3. Each repeat runs both
layouts in turn (interleaved); the table gives the median step time, the median over repeats of the ratio
of the fp32-kept layout to the all-bf16 one, and each layout's exact model-state bytes per rank after a step
(``model_state_bytes``). Writes benchmarks/results/precision_layout.json and .md.
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
from harness import common_arguments, run_pinned, time_loop  # noqa: E402

LAYOUTS = ("fp32 kept", "all bf16")


def _steps(stage: int, layout: str, args: argparse.Namespace, rank: int) -> tuple[list[float], int, int]:
    from gpt import GPT

    import lightning_zero.sharding.engine as engine_module
    from lightning_zero import PrecisionPolicy, ZeroConfig, ZeroEngine, model_state_bytes
    from lightning_zero.sharding.layout import full_precision_params

    engine_module.full_precision_params = full_precision_params if layout == "fp32 kept" else (lambda *_: set())
    torch.manual_seed(0)
    model = GPT(width=args.width, depth=args.depth)
    engine = ZeroEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), ZeroConfig(stage=stage),
                        dtypes=PrecisionPolicy.from_precision("bf16-mixed").slots())
    kept = sum(b.numel for b in engine.layout.buckets if b.key.own_dtype)

    def one_step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
        engine.step()

    times = time_loop(one_step, model.block, rank, args.batch_size, args.warmup, args.steps)
    held = model_state_bytes(engine).total
    engine.close()
    return times, held, kept


def _worker(rank: int, args: argparse.Namespace) -> dict:
    from gpt import GPT

    out: dict = {"params": sum(p.numel() for p in GPT(width=args.width, depth=args.depth).parameters())}
    for stage in (1, 2, 3):
        rows = {layout: {"medians": [], "bytes": 0, "kept": 0} for layout in LAYOUTS}
        for _ in range(args.repeats):
            for layout in LAYOUTS:
                times, held, kept = _steps(stage, layout, args, rank)
                rows[layout]["medians"].append(statistics.median(times))
                rows[layout]["bytes"], rows[layout]["kept"] = held, kept
        out[stage] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser)
    args = parser.parse_args()
    result = run_pinned(_worker, args)
    lines = [f"Example GPT ({result['params']:,} parameters), bf16-mixed, AdamW, 2 ranks pinned, "
             f"{args.repeats} interleaved repeats of {args.steps} timed steps", "",
             "| stage | layout | fp32 elements | median step (ms) | ratio to all-bf16 | model state per rank (bytes) |",
             "|---|---|---|---|---|---|"]
    table = {}
    for stage in (1, 2, 3):
        rows = result[stage]
        ratios = [a / b for a, b in zip(rows["fp32 kept"]["medians"], rows["all bf16"]["medians"])]
        for layout in LAYOUTS:
            row = rows[layout]
            median = statistics.median(row["medians"]) * 1e3
            ratio = statistics.median(ratios) if layout == "fp32 kept" else 1.0
            lines.append(f"| {stage} | {layout} | {row['kept']:,} | {median:.1f} | {ratio:.2f}x | {row['bytes']:,} |")
            table[f"stage{stage} {layout}"] = {"median_ms": median, "ratio": ratio, "bytes": row["bytes"],
                                               "fp32_elements": row["kept"]}
    text = "\n".join(lines)
    print(text)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "precision_layout.md").write_text(text + "\n")
    (results / "precision_layout.json").write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
