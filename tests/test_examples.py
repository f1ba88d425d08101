"""The README's commands, end to end: Lightning's subprocess launcher (fitting twice in one process) and
the bare engine under torchrun."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(key, None)
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "terminate called" not in output, output[-4000:]
    return output


def readme_main_command() -> list[str]:
    """The python part of the README's first command (after the installs)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    return shlex.split(block.strip().split("&&")[-1])


def test_readme_main_command() -> None:
    command = readme_main_command()
    assert command[:2] == ["python", "examples/train_gpt.py"], command
    output = _run(sys.executable, *command[1:])
    assert "step  30  loss" in output
    ratios = [float(r) for r in re.findall(r"vs ddp [\d.]+ MiB \(([\d.]+)x\)", output)]
    assert len(ratios) == 2 and all(r < 0.7 for r in ratios), output[-2000:]


def test_lightning_example_fits_twice_with_the_subprocess_launcher() -> None:
    output = _run(sys.executable, "tests/fit_twice.py")
    assert "fit 2 of 2" in output
    ratios = [float(r) for r in re.findall(r"vs ddp [\d.]+ MiB \(([\d.]+)x\)", output)]
    assert len(ratios) == 4 and all(r < 0.7 for r in ratios), output[-2000:]  # 2 ranks x 2 fits


def test_engine_example_under_torchrun() -> None:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    output = _run(torchrun, "--standalone", "--nproc_per_node=2", "examples/train_engine.py", "--steps", "3")
    assert re.search(r"step\s+2\s+loss", output) and output.count("zero2 holds") == 2


ZOO = ROOT / "tests" / ".zoo"


def test_fabric_litgpt_example_under_zero3() -> None:
    """A user's own Fabric loop training a litgpt model under zero3 (litgpt from the test zoo)."""
    import pytest

    if not (ZOO / "litgpt").is_dir():
        pytest.skip(f"litgpt is not installed in {ZOO}: run the README's test command")
    env_path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ZOO)]))
    output = _run("env", f"PYTHONPATH={env_path}", sys.executable, "examples/fabric_litgpt.py", "--strategy",
                  "zero3", "--steps", "12")
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", output).groups())
    assert last < first, output[-2000:]
    ratios = [float(r) for r in re.findall(r"vs ddp [\d.]+ MiB \(([\d.]+)x\)", output)]
    assert len(ratios) == 2 and all(r < 0.6 for r in ratios), output[-2000:]  # 9Ψ of 16Ψ under bf16-mixed
