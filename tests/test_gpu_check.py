"""benchmarks/gpu_check.py on a machine without a GPU: it skips with one line and exit 0, its pure helpers
(parameter differences, ratios, the JSON document, the markdown table) hold, and its per-case machinery
(a process per case, parity against ddp, JSON and table) runs end to end on one CPU rank (two cases)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _load() -> ModuleType:
    # benchmarks/ is no package; registered first so its dataclasses can resolve their own module.
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def _run(*args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in gpu_check._RANK_ENV}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=timeout)


def test_without_cuda_it_skips_with_one_line_and_exit_0(tmp_path: Path) -> None:
    done = _run("--out", str(tmp_path / "out"), timeout=60, CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == gpu_check.SKIP_MESSAGE
    assert not (tmp_path / "out").exists()


def test_parameter_differences() -> None:
    reference = {"w": torch.tensor([3.0, 4.0]), "b": torch.zeros(2), "steps": torch.tensor(7)}
    same = {k: v.clone() for k, v in reference.items()}
    assert gpu_check.parameter_differences(reference, same) == {"max": 0.0, "worst": "w", "global": 0.0}
    moved = {**same, "w": torch.tensor([3.0, 4.5]), "b": torch.tensor([0.0, 1e-3])}
    got = gpu_check.parameter_differences(reference, moved)
    assert got["worst"] == "w" and got["max"] == pytest.approx(0.1)  # 0.5 / 5; b's reference norm is zero
    assert got["global"] == pytest.approx(math.sqrt(0.5**2 + 1e-6) / 5)
    assert gpu_check.parameter_differences(reference, {**same, "b": torch.tensor([0.0, math.nan])})["max"] == math.inf
    with pytest.raises(ValueError, match="names differ"):
        gpu_check.parameter_differences(reference, {"w": same["w"]})
    with pytest.raises(ValueError, match="shape"):
        gpu_check.parameter_differences(reference, {**same, "w": torch.zeros(3)})


def _result(system: str, precision: str, step_s: float, peak_mib: int | None, state_mib: float | None,
            estimate_mib: float) -> dict[str, Any]:
    case = gpu_check.Case(system, precision)
    return {**gpu_check._identity(case), "status": "ok", "parameters": 1000, "step_s": step_s,
            "peak_bytes": None if peak_mib is None else peak_mib * gpu_check.MIB,
            "state_bytes": None if state_mib is None else int(state_mib * gpu_check.MIB),
            "estimate": {"device_total": int(estimate_mib * gpu_check.MIB)}, "final_loss": 2.5}


def test_comparisons_json_and_table(tmp_path: Path) -> None:
    results = [
        _result("ddp", "32-true", 0.100, 400, None, 160),
        _result("zero2", "32-true", 0.110, 300, 70, 70),
        {**gpu_check._identity(gpu_check.Case("zero3", "32-true")), "status": "failed (exit 1)",
         "error": "Traceback ...\nRuntimeError: boom"},
        _result("zero2", "bf16-mixed", 0.050, 200, 50, 50),  # no ddp of its precision ran
    ]
    results[1].update(parity_vs_ddp=2e-7, parity_global=1e-7, parity_worst_tensor="w")
    settings = gpu_check.Settings(**gpu_check.PROFILES["dry"], accelerator="cpu", devices=1)
    meta = {**gpu_check._meta(settings, dry_run=True, wall_s=1.0), "device": "Test GPU"}
    report = gpu_check.assemble(meta, results)
    zero2 = report["cases"][1]
    assert zero2["ratio_to_ddp"] == pytest.approx(1.1) and report["cases"][0]["ratio_to_ddp"] == 1.0
    assert zero2["peak_over_estimate"] == pytest.approx(300 / 70) and zero2["state_over_estimate"] == 1.0
    assert report["cases"][3]["ratio_to_ddp"] is None and report["cases"][2]["ratio_to_ddp"] is None
    assert report["parameters"] == 1000 and report["world_size"] == 1

    table = gpu_check.format_table(report)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(results)
    assert all(row.count("|") == rows[0].count("|") for row in rows)
    assert "# gpu_check: Test GPU x 1" in table and "needs >= 2 GPUs" in table
    assert "| zero2 | 32-true | 110.0 | 1.10x | 300.0 | 70.0 | 4.29 | 230.0 | 1.000 | 2.0e-07 / 1.0e-07 |" in table
    assert "| ddp | 32-true | 100.0 | 1.00x |" in table and "| ref. |" in table
    assert "failed (exit 1)" in table and "RuntimeError: boom" in table

    json_path, md_path = gpu_check.write_outputs(report, table, tmp_path / "out")
    assert json.loads(json_path.read_text())["cases"][1]["ratio_to_ddp"] == pytest.approx(1.1)
    assert md_path.read_text() == table


def test_case_names_and_selection() -> None:
    names = [case.name for case in gpu_check.CASES]
    assert names[0] == "ddp-32-true" and "ddp-bf16-mixed" in names and len(set(names)) == len(names)
    offload = gpu_check.Case("zero2_offload", "32-true")
    assert (offload.stage, offload.offload) == (2, "optimizer")
    assert [c.name for c in gpu_check.select_cases("zero2-32-true, ddp-32-true")] == ["ddp-32-true", "zero2-32-true"]
    with pytest.raises(SystemExit, match="unknown case"):
        gpu_check.select_cases("zero4-32-true")
    dry = gpu_check.settings_for(gpu_check.parse_args(["--cpu-dry-run", "--steps", "5", "--devices", "2"]))
    assert (dry.steps, dry.warmup, dry.devices, dry.accelerator) == (5, 1, 2, "cpu")


def test_cpu_dry_run_of_two_cases_end_to_end(tmp_path: Path) -> None:
    done = _run("--cpu-dry-run", "--cases", "ddp-32-true,zero2-32-true", "--out", str(tmp_path), timeout=240)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"] == "cpu (dry run)" and report["world_size"] == 1
    ddp, zero2 = report["cases"]
    assert ddp["status"] == zero2["status"] == "ok"
    assert len(zero2["step_times_s"]) == report["settings"]["steps"] and zero2["peak_bytes"] is None
    assert zero2["parity_vs_ddp"] <= 1e-5 and zero2["ratio_to_ddp"] > 0
    assert zero2["state_over_estimate"] == pytest.approx(1.0, abs=0.05)
    assert (tmp_path / "gpu_check.md").read_text() in done.stdout
