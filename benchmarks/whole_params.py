"""Optimizers that read whole parameters under ZeRO: Adafactor, and Muon for the blocks' matrices with AdamW
for the rest, on the example GPT against torch DDP with the same optimizers, in the same processes.

    python benchmarks/whole_params.py --repeats 3

Per system and optimizer: the optimizer state each rank holds, counted tensor by tensor from the optimizer
objects (not RSS), against the formula for the parameters that rank owns; the balance (most and least
owned elements per rank); the median step time and its ratio to DDP. Systems run interleaved, each rank
pinned to its own core (``harness.run_pinned``). Writes benchmarks/results/whole_params.json and .md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
from harness import WORLD, common_arguments, run_pinned, time_loop, time_steps  # noqa: E402

SYSTEMS = ("ddp", "zero1", "zero2", "zero3")
DEEPSPEED = ("deepspeed1", "deepspeed2")  # DeepSpeed's Muon runs under ZeRO stages 1 and 2
OPTIMIZERS = ("adafactor", "muon+adamw")


def _optimizers(model: torch.nn.Module, kind: str) -> list[torch.optim.Optimizer]:
    if kind == "adafactor":
        return [torch.optim.Adafactor(model.parameters(), lr=1e-2)]
    matrices = [p for n, p in model.named_parameters() if _muon_rule(n, p)]
    rest = [p for n, p in model.named_parameters() if not _muon_rule(n, p)]
    return [torch.optim.Muon(matrices, lr=2e-2), torch.optim.AdamW(rest, lr=1e-3)]


def _muon_rule(name: str, param: torch.Tensor) -> bool:
    """DeepSpeed's rule for which parameters Muon steps (``deepspeed.set_optimizer_flags``): matrices whose
    name has neither "embed" nor "lm_head"; every system here splits the same way."""
    return param.dim() >= 2 and not any(key in name.lower() for key in ("embed", "lm_head"))


def expected_state_bytes(shape: torch.Size, kind: str) -> int:
    """The formula: Muon keeps one momentum buffer (4 bytes an element), AdamW two and a step counter,
    Adafactor one row and one column factor for a matrix (a full variance for a vector) and a step counter,
    all fp32."""
    numel = shape.numel()
    if kind == "muon":
        return 4 * numel
    if kind == "adamw":
        return 8 * numel + 4
    if len(shape) >= 2:
        return 4 * (shape[-2] + shape[-1]) + 4
    return 4 * numel + 4


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(value.numel() * value.element_size()
               for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value))


def worker(rank: int, args: argparse.Namespace) -> dict[str, Any]:
    from gpt import GPT

    from lightning_zero import ZeroConfig, ZeroEngine

    results: dict[str, Any] = {}
    for _ in range(args.repeats):
        for kind in OPTIMIZERS:
            for system in SYSTEMS + (DEEPSPEED if kind == "muon+adamw" and args.deepspeed else ()):
                if system.startswith("deepspeed"):
                    held, owned, times = _deepspeed_muon(rank, args, int(system[-1]))
                    per_rank = [None] * dist.get_world_size()
                    dist.all_gather_object(per_rank, (held, None, owned))
                    entry = results.setdefault(f"{kind} {system}", {"times": [], "per_rank": per_rank})
                    entry["times"].extend(times)
                    continue
                torch.manual_seed(0)
                model = GPT(args.width, args.depth, args.heads)
                shapes = {n: p.shape for n, p in model.named_parameters()}
                optimizers = _optimizers(model, kind)
                kinds = {id(p): ("adafactor" if kind == "adafactor" else "muon" if i == 0 else "adamw")
                         for i, opt in enumerate(optimizers) for g in opt.param_groups for p in g["params"]}
                kind_of = {n: kinds[id(p)] for n, p in model.named_parameters()}
                engine = None if system == "ddp" else ZeroEngine(model, optimizers, ZeroConfig(stage=int(system[-1])))
                times = time_steps(model, optimizers, engine, rank, args.batch_size, args.warmup, args.steps)
                held = sum(_state_bytes(opt) for opt in optimizers)
                if engine is None:  # every parameter, whole
                    pieces = list(shapes.items())
                else:  # whole parameters in their shapes; the flat layout's slices as 1-D pieces
                    pieces = [(engine.layout.params[e.piece.param].fqn, e.master.shape)
                              for b in engine.trainable_buckets for e in b.entries]
                    engine.close()
                owned = sum(shape.numel() for _, shape in pieces)
                formula = sum(expected_state_bytes(shape, kind_of[n]) for n, shape in pieces)
                per_rank = [None] * dist.get_world_size()
                dist.all_gather_object(per_rank, (held, formula, owned))
                entry = results.setdefault(f"{kind} {system}", {"times": [], "per_rank": per_rank})
                entry["times"].extend(times)
    return results


def _deepspeed_muon(rank: int, args: argparse.Namespace, stage: int) -> tuple[int, int, list[float]]:
    """DeepSpeed's own Muon as its users run it: ``"optimizer": {"type": "Muon"}`` in the config, parameters
    tagged by ``deepspeed.initialize``; its optimizer state bytes, owned elements and step times."""
    import logging

    import deepspeed
    from gpt import GPT

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.manual_seed(0)
    model = GPT(args.width, args.depth, args.heads)
    config = {
        "train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0, "zero_optimization": {"stage": stage},
        "optimizer": {"type": "Muon", "params": {"lr": 2e-2, "adam_lr": 1e-3}},
        "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

    def one_step(x: torch.Tensor, y: torch.Tensor) -> None:
        logits = engine(x)
        engine.backward(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
        engine.step()

    times = time_loop(one_step, model.block, rank, args.batch_size, args.warmup, args.steps)
    inner = engine.optimizer.optimizer  # the torch-style optimizer over DeepSpeed's flat partitions
    held = _state_bytes(inner)
    owned = sum(p.numel() for group in inner.param_groups for p in group["params"])
    engine.destroy()
    return held, owned, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--no-deepspeed", dest="deepspeed", action="store_false",
                        help="skip DeepSpeed's Muon (skipped anyway where deepspeed is not installed)")
    parser.set_defaults(width=384, depth=3, repeats=3)
    args = parser.parse_args()
    args.deepspeed = args.deepspeed and importlib.util.find_spec("deepspeed") is not None
    results = run_pinned(worker, args)
    rows = []
    for kind in OPTIMIZERS:
        ddp = statistics.median(results[f"{kind} ddp"]["times"])
        for system in SYSTEMS + DEEPSPEED:
            if f"{kind} {system}" not in results:
                continue
            entry = results[f"{kind} {system}"]
            median = statistics.median(entry["times"])
            held = [h for h, _, _ in entry["per_rank"]]
            formula = [f for _, f, _ in entry["per_rank"]]
            owned = [o for _, _, o in entry["per_rank"]]
            rows.append({"optimizer": kind, "system": system, "median_step_s": median, "vs_ddp": median / ddp,
                         "state_bytes_per_rank": held, "formula_bytes_per_rank": formula,
                         "owned_elements_per_rank": owned})
    out = HERE / "results" / "whole_params.json"
    out.write_text(json.dumps({"world_size": WORLD, "model": {"width": args.width, "depth": args.depth},
                               "steps": args.steps, "repeats": args.repeats, "rows": rows}, indent=2))
    lines = [f"# Whole-parameter optimizers, example GPT width {args.width} depth {args.depth}, {WORLD} CPU ranks "
             "(gloo, pinned), fp32",
             "",
             "| optimizer | system | optimizer state per rank (bytes) | formula "
             "| owned elements per rank (most / least) | median step | vs ddp |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        owned = row["owned_elements_per_rank"]
        held = ", ".join(f"{b:,}" for b in row["state_bytes_per_rank"])
        formula = ", ".join("—" if b is None else f"{b:,}" for b in row["formula_bytes_per_rank"])
        lines.append(f"| {row['optimizer']} | {row['system']} | {held} | {formula} | {max(owned):,} / {min(owned):,} "
                     f"| {row['median_step_s'] * 1000:.1f} ms | {row['vs_ddp']:.2f}x |")
    (HERE / "results" / "whole_params.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
