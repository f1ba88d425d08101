"""LightningCLI end to end: registered names, class paths in a script that never imports lightning_zero,
the shipped YAML configs, validation of every option against its type, and the help listing."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_zero import ZeroPrecision, ZeroStrategy

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
QUICK = ["--trainer.max_steps=3", "--trainer.callbacks=[]"]


def _run(*args: str, ok: bool = True) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert (done.returncode == 0) == ok, output[-4000:]
    return output


def test_registered_name_with_a_precision_flag() -> None:
    output = _run("examples/train_gpt.py", "fit", "--trainer.strategy=zero3", "--trainer.precision=bf16-mixed",
                  "--trainer.max_steps=4")
    assert "step   4  loss" in output and output.count("vs ddp") == 2


def test_class_path_in_a_script_that_does_not_import_lightning_zero() -> None:
    output = _run("tests/cli_without_import.py", "fit", "--trainer.strategy=lightning_zero.ZeroStrategy",
                  "--trainer.strategy.stage=2", "--trainer.strategy.reduce_policy=boundary",
                  "--trainer.strategy.bucket_numel=4096", "--trainer.strategy.nonfinite=skip",
                  "--trainer.plugins=lightning_zero.ZeroPrecision", "--trainer.plugins.precision=bf16-mixed",
                  "--trainer.plugins.reduce_dtype=bfloat16", "--trainer.max_steps=3")
    assert ("strategy lightning_zero.strategy.ZeroStrategy config ZeroConfig(stage=2, bucket_numel=4096, "
            "reduce_policy='boundary'") in output
    assert "precision ZeroPrecision(bf16-mixed) steps 3" in output


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_each_shipped_config_resolves(config: Path) -> None:
    printed = yaml.safe_load(_run("examples/train_gpt.py", "fit", "--config", str(config), "--print_config"))
    stage = int(config.stem[4])
    strategy = printed["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning_zero.ZeroStrategy" and strategy["init_args"]["stage"] == stage
    assert printed["trainer"]["precision"] == ("bf16-mixed" if "bf16" in config.stem else "32-true")
    assert "block" not in printed["data"]  # linked to model.block, not set twice


def test_a_config_trains() -> None:
    output = _run("examples/train_gpt.py", "fit", "--config", str(ROOT / "examples/configs/zero3_bf16.yaml"),
                  "--trainer.max_steps=3")
    assert output.count("vs ddp") == 2


@pytest.mark.parametrize(("flag", "expected"), [
    ("--trainer.strategy.stage=4", "Expected a typing.Literal[1, 2, 3]"),
    ("--trainer.strategy.reduce_policy=sometimes", "Expected a typing.Literal['auto', 'boundary'"),
    ("--trainer.strategy.bucket_numel=many", "Expected a <class 'int'>"),
    ("--trainer.strategy.state_dict_type=dcp", "Expected a typing.Literal['sharded', 'full']"),
])
def test_bad_values_are_refused_by_the_parser(flag: str, expected: str) -> None:
    output = _run("examples/train_gpt.py", "fit", "--trainer.strategy=lightning_zero.ZeroStrategy", flag, *QUICK,
                  ok=False)
    assert expected in output, output[-2000:]


@pytest.mark.parametrize(("flag", "cls"), [("--trainer.strategy.help", ZeroStrategy),
                                           ("--trainer.plugins.help", ZeroPrecision)])
def test_help_lists_every_option(flag: str, cls: type) -> None:
    output = _run("examples/train_gpt.py", "fit", flag, f"lightning_zero.{cls.__name__}")
    prefix = flag.removesuffix(".help")
    options = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    missing = [name for name in options if f"{prefix}.{name}" not in output]
    assert not missing, missing
    undocumented = [name for name in options if f"{prefix}.{name}" in output and
                    "(type: " in output.split(f"{prefix}.{name}", 2)[-1][:40]]
    assert not undocumented, f"options without a description in --help: {undocumented}"
