"""The README's "choosing a stage" figure: model-state memory per rank by stage and world size (from
``estimate_memory``, which the tests hold to within 16 bytes of the engine's exact accounting) and step time
relative to DDP (from ``benchmarks/results/step_time.json``, measured on 2 pinned ranks).

    python benchmarks/plot.py      # needs matplotlib: pip install -e ".[bench]"

Writes benchmarks/results/choosing_a_stage.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lightning_zero import estimate_memory  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WORLD_SIZES = (2, 4, 8)


def main() -> None:
    timing = json.loads((RESULTS / "step_time.json").read_text())
    params = timing["parameters"]
    fig, (memory, speed) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(WORLD_SIZES)
    for i, world in enumerate(WORLD_SIZES):
        mib = [estimate_memory(params, stage, world, "32-true", "adamw").total / 2**20 for stage in range(4)]
        memory.bar([s + (i - 1) * width for s in range(4)], mib, width, label=f"{world} ranks")
    memory.set_xticks(range(4), ["DDP", "zero1", "zero2", "zero3"])
    memory.set_ylabel("model state per rank (MiB)")
    memory.set_title(f"{params / 1e6:.1f}M-parameter GPT, AdamW, fp32")
    memory.legend()
    rows = timing["rows"]
    speed.bar([r["system"].replace("ddp", "DDP") for r in rows], [r["ratio_to_ddp"] for r in rows],
              color="tab:gray")
    speed.axhline(1.0, color="black", linewidth=0.8)
    speed.set_ylabel("step time / DDP step time")
    speed.set_title(f"2 ranks on gloo, one pinned core each ({timing['repeats']} repeats)")
    for x, r in enumerate(rows):
        speed.text(x, r["ratio_to_ddp"] + 0.01, f"{r['ratio_to_ddp']:.2f}x", ha="center")
    speed.set_ylim(0, max(r["ratio_to_ddp"] for r in rows) * 1.15)
    fig.tight_layout()
    fig.savefig(RESULTS / "choosing_a_stage.png", dpi=110)
    print(f"wrote {RESULTS / 'choosing_a_stage.png'}")


if __name__ == "__main__":
    main()
