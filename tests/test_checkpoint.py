"""Sharded checkpoints through the Trainer: resume parity with ddp, resharding across world sizes and
stages, export to one file, ModelCheckpoint rotation, killed saves and bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

import lightning_zero
from lightning_zero import CheckpointError, ShardedCheckpoint, ZeroPrecision, ZeroStrategy, consolidate_checkpoint
from lightning_zero.checkpoint import MANIFEST, named_optimizer_state, save_file_atomically
from lightning_zero.sharding.collectives import traffic
from tests.helpers import assert_same, relative_errors
from tests.lit_helpers import LitLoops, LitTiny, loader, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED, TOTAL = 4, 10  # optimizer steps before the save, and after the resume


def zero(stage: int, **kwargs: Any) -> ZeroStrategy:
    return ZeroStrategy(stage=stage, bucket_numel=150, **kwargs)


def ddp() -> DDPStrategy:
    return DDPStrategy(find_unused_parameters=True)


def _precision(precision: str) -> dict[str, Any]:
    # Lightning turns "16-mixed" into bf16 on CPU before a strategy sees it; the plugin keeps fp16.
    return {"plugins": [ZeroPrecision(precision)]} if precision == "16-mixed" else {"precision": precision}


def train_and_save(strategy: Any, path: str, steps: int = SAVED, precision: str = "32-true",
                   optimizer: str = "adamw", batches: int = 8, **kwargs: Any) -> dict[str, int]:
    fit = trainer(strategy, max_steps=steps, max_epochs=3, **_precision(precision), **kwargs)
    fit.fit(LitTiny(optimizer, schedule=True), loader(batches, 1))
    traffic.clear()
    fit.save_checkpoint(path)
    return dict(traffic)


def resume(strategy: Any, path: str | None, steps: int = TOTAL, precision: str = "32-true",
           module: LitTiny | None = None, batches: int = 8) -> torch.nn.Module:
    module = module or LitTiny("adamw", schedule=True)
    fit = trainer(strategy, max_steps=steps, max_epochs=3, **_precision(precision))
    fit.fit(module, loader(batches, 1), ckpt_path=path)
    assert fit.global_step == steps, fit.global_step
    return module.net


def resume_against_ddp(tmp: str) -> dict[str, Any]:
    """ddp saves at step 4 and resumes to 10; ZeRO does the same across stages; ddp also resumes from
    the consolidated ZeRO checkpoint. Parity of the final weights against the ddp resume."""
    ddp_path = os.path.join(tmp, "ddp.ckpt")
    train_and_save(ddp(), ddp_path)
    reference = resume(ddp(), ddp_path)
    errors, traffic_during_save = {}, {}
    for saved, resumed in ((2, 2), (1, 3), (3, 1)):
        path = os.path.join(tmp, f"zero{saved}.ckpt")
        traffic_during_save[saved] = train_and_save(zero(saved), path)
        assert os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))
        errors[f"zero{saved}->zero{resumed}"] = max(relative_errors(resume(zero(resumed), path), reference).values())
    exported = os.path.join(tmp, "exported.ckpt")
    if dist.get_rank() == 0:
        save_file_atomically(consolidate_checkpoint(os.path.join(tmp, "zero2.ckpt"), optimizer=True), exported)
    dist.barrier()
    errors["zero2 consolidated->ddp"] = max(relative_errors(resume(ddp(), exported), reference).values())
    # Plain ddp reads the sharded directory itself (weights and optimizer state): see [Note: Lightning's
    # loaders read sharded checkpoints].
    errors["zero3 directory->ddp"] = max(relative_errors(resume(ddp(), os.path.join(tmp, "zero3.ckpt")),
                                                         reference).values())
    return {"errors": errors, "traffic": traffic_during_save}


def test_resume_matches_ddp_across_stages(pools, tmp_path) -> None:
    results = pools(2).run(resume_against_ddp, str(tmp_path))
    for case, error in results[0]["errors"].items():
        print(f"resume {case} against ddp's resume, after {TOTAL - SAVED} more steps: {error:.2e}")
    assert all(error <= 1e-6 for r in results for error in r["errors"].values()), results[0]["errors"]
    # Each rank wrote only its own slices: no tensor was gathered for the save.
    assert all(not moved for r in results for moved in r["traffic"].values()), [r["traffic"] for r in results]


def straight_and_resumed(tmp: str, stage: int, precision: str) -> float:
    """A run straight to 10 steps that ModelCheckpoint saves at step 4 (an epoch's last batch), and the
    run resumed from that checkpoint: model, optimizer, LR schedule, loss scaler and loops come back."""
    callback = ModelCheckpoint(dirpath=tmp, every_n_train_steps=SAVED, save_top_k=-1, filename="{step}")
    straight = LitTiny("adamw", schedule=True)
    fit = trainer(zero(stage), max_steps=TOTAL, max_epochs=3, callbacks=[callback], enable_checkpointing=True,
                  **_precision(precision))
    fit.fit(straight, loader(SAVED, 1))
    module = LitTiny("adamw", schedule=True)
    resumed = resume(zero(stage), os.path.join(tmp, f"step={SAVED}.ckpt"), precision=precision, module=module,
                     batches=SAVED)
    assert module.counts["optimizer_step"] == TOTAL - SAVED
    if precision == "16-mixed":
        assert module.trainer.precision_plugin.scaler.state_dict() == fit.precision_plugin.scaler.state_dict()
    return max(relative_errors(resumed, straight.net).values())


@pytest.mark.parametrize(("stage", "precision"), [(2, "16-mixed"), (3, "bf16-mixed"), (3, "32-true")])
def test_resume_equals_the_straight_run_in_mixed_precision(pools, tmp_path, stage, precision) -> None:
    worst = max(pools(2).run(straight_and_resumed, str(tmp_path), stage, precision))
    print(f"zero{stage} {precision}: resumed vs straight {worst:.2e}")
    assert worst == 0.0


def reload_and_save(source: str, target: str, stage: int, shard_size: int | None = None) -> None:
    """Restore ``source`` on this world size, stage and ``shard_size`` without training further, then save
    again."""
    fit = trainer(zero(stage, shard_size=shard_size), max_steps=SAVED, max_epochs=3)
    fit.fit(LitTiny("adamw", schedule=True), loader(8, 1), ckpt_path=source)
    fit.save_checkpoint(target)


def test_reshard_across_world_sizes_and_stages(pools, tmp_path) -> None:
    """2 ranks (stage 1) -> 3 (stage 2) -> 4 (stage 3) -> 2 (stage 1): parameters and optimizer state
    come through every hop bit for bit (resharded, never reset)."""
    first = str(tmp_path / "n2.ckpt")
    pools(2).run(train_and_save, zero(1), first)
    original = consolidate_checkpoint(first, optimizer=True)
    previous = first
    for world_size, stage in ((3, 2), (4, 3), (2, 1)):
        path = str(tmp_path / f"n{world_size}-stage{stage}.ckpt")
        pools(world_size).run(reload_and_save, previous, path, stage)
        assert ShardedCheckpoint(path).world_size == world_size
        again = consolidate_checkpoint(path, optimizer=True)
        assert_same(original["state_dict"], again["state_dict"], path)
        assert_same(original["optimizer_states"], again["optimizer_states"], path)
        assert again["global_step"] == original["global_step"] == SAVED
        previous = path


def test_consolidated_checkpoint_loads_in_a_plain_process(pools, tmp_path) -> None:
    """``python -m lightning_zero consolidate`` and ``load_from_checkpoint`` without torch.distributed."""
    path = str(tmp_path / "z3.ckpt")
    pools(2).run(train_and_save, zero(3), path)
    out = str(tmp_path / "plain.ckpt")
    done = subprocess.run([sys.executable, "-m", "lightning_zero", "consolidate", path, out], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "weights only" in done.stdout
    restored = LitTiny.load_from_checkpoint(out)
    expected = consolidate_checkpoint(path)["state_dict"]
    for name, value in restored.state_dict().items():
        assert torch.equal(value, expected[name]), name
        assert value.dtype == torch.float32
    assert not dist.is_initialized()
    # Lightning's own loader reads the sharded directory, no consolidation step by the user.
    direct = LitTiny.load_from_checkpoint(path)
    for name, value in direct.state_dict().items():
        assert torch.equal(value, expected[name]), name
    bad = subprocess.run([sys.executable, "-m", "lightning_zero", "consolidate", str(tmp_path), out], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no CHECKPOINT.json" in bad.stderr


class LoggedLoops(LitLoops):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, sync_dist=True)
        return loss


def rotation_and_last(tmp: str) -> dict[str, Any]:
    callback = ModelCheckpoint(dirpath=tmp, monitor="train_loss", save_top_k=2, every_n_train_steps=1,
                               save_last=True, filename="{step}")
    fit = trainer(zero(2), max_steps=5, max_epochs=3, callbacks=[callback], enable_checkpointing=True)
    fit.fit(LoggedLoops("adamw"), loader(8, 1), loader(2, 1))
    listing = sorted(os.listdir(tmp))
    versions = sorted(n for n in os.listdir(os.path.join(tmp, "last.ckpt")) if n.startswith("v-"))
    best = callback.best_model_path
    resumed = trainer(zero(2), max_steps=7, max_epochs=3, callbacks=[ModelCheckpoint(dirpath=tmp)],
                      enable_checkpointing=True)
    resumed.fit(LoggedLoops("adamw"), loader(8, 1), loader(2, 1), ckpt_path="last")
    loss = trainer(zero(2)).validate(LoggedLoops("adamw"), loader(2, 1), ckpt_path=best, verbose=False)
    return {"listing": listing, "versions": versions, "best": best, "resumed_step": resumed.global_step,
            "val_loss": loss[0]["val_loss"]}


def test_model_checkpoint_rotation_last_and_best(pools, tmp_path) -> None:
    results = pools(2).run(rotation_and_last, str(tmp_path))
    result = results[0]
    print(f"ModelCheckpoint left {result['listing']}")
    assert len([n for n in result["listing"] if n.startswith("step=")]) == 2  # the rest were removed
    assert "last.ckpt" in result["listing"] and len(result["versions"]) == 1  # old versions collected
    assert all(ShardedCheckpoint(os.path.join(str(tmp_path), n)) for n in result["listing"] if n.endswith(".ckpt"))
    assert result["resumed_step"] == 7
    assert results[0]["val_loss"] == results[1]["val_loss"]


# ---------------------------------------------------------------------------------------------- faults
KILL_SCRIPT = os.path.join(ROOT, "tests", "kill_during_save.py")


def _run_script(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": ROOT}
    process = subprocess.Popen([sys.executable, KILL_SCRIPT, *args], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
        try:  # no rank may outlive the test
            os.killpg(process.pid, 9)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(process.args, process.returncode, out, None)


@pytest.mark.parametrize("moment", ["rank-file", "before-commit"])
def test_killed_save_leaves_the_previous_checkpoint(tmp_path, moment) -> None:
    """A 2-rank run saves at step 2; a second run trains to 4 and is killed while saving over the same
    path (rank 1 half-way through its file, or rank 0 just before the commit). The path still loads as
    the step-2 checkpoint, and the next save clears the leftovers."""
    path = str(tmp_path / "last.ckpt")
    good = _run_script("save", path, "2")
    assert good.returncode == 0, good.stdout[-3000:]
    before = consolidate_checkpoint(path)
    killed = _run_script("kill", path, "4", moment)
    assert killed.returncode != 0, killed.stdout[-3000:]
    leftovers = sorted(os.listdir(path))
    print(f"killed at {moment}: exit {killed.returncode}; the directory holds {leftovers}")
    after = consolidate_checkpoint(path)
    assert after["global_step"] == before["global_step"] == 2
    assert_same(before["state_dict"], after["state_dict"])
    assert len([n for n in leftovers if n.startswith("v-")]) == 2  # the committed one and the killed one
    again = _run_script("save", path, "3")
    assert again.returncode == 0, again.stdout[-3000:]
    assert consolidate_checkpoint(path)["global_step"] == 3
    assert len([n for n in os.listdir(path) if n.startswith("v-")]) == 1


def _saved_checkpoint(tmp: str) -> str:
    return os.path.join(tmp, "good.ckpt")


def _corrupt_copies(tmp: str) -> dict[str, tuple[str, str]]:
    """Broken copies of the good checkpoint: name -> (path, what the error must name)."""
    good = _saved_checkpoint(tmp)
    checkpoint = ShardedCheckpoint(good)
    rank1 = os.path.join(checkpoint.manifest["version"], checkpoint.manifest["ranks"][1]["file"])
    cases: dict[str, tuple[str, str]] = {}

    def copy(name: str) -> str:
        target = os.path.join(tmp, name)
        shutil.copytree(good, target)
        return target

    missing = copy("missing")
    os.remove(os.path.join(missing, rank1))
    cases["missing"] = (missing, "is missing")
    truncated = copy("truncated")
    with open(os.path.join(truncated, rank1), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(truncated, rank1)) // 2)
    cases["truncated"] = (truncated, "is truncated")
    corrupt = copy("corrupt")
    with open(os.path.join(corrupt, rank1), "r+b") as f:
        f.seek(os.path.getsize(os.path.join(corrupt, rank1)) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    cases["corrupt"] = (corrupt, "is corrupt")
    manifest = copy("manifest")
    with open(os.path.join(manifest, MANIFEST), "w") as f:
        f.write("{not json")
    cases["manifest"] = (manifest, "unreadable or corrupt")
    plain_dir = os.path.join(tmp, "plain_dir")
    os.makedirs(plain_dir)
    cases["not a checkpoint"] = (plain_dir, "no CHECKPOINT.json")
    return cases


def resume_from(path: str, optimizer: str = "adamw", module: LitTiny | None = None) -> str:
    try:
        resume(zero(2), path, module=module or LitTiny(optimizer, schedule=True))
    except CheckpointError as exc:
        return str(exc)
    return "no error"


class Wider(LitTiny):
    """Another model: a head with one more output."""

    def __init__(self) -> None:
        super().__init__("adamw", schedule=True)
        self.net.head = torch.nn.Linear(11, 4)


def test_bad_checkpoints_are_named_and_nothing_is_overwritten(pools, tmp_path) -> None:
    tmp = str(tmp_path)
    pools(2).run(train_and_save, zero(2), _saved_checkpoint(tmp))
    for name, (path, message) in _corrupt_copies(tmp).items():
        listing = {f: os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files}
        with pytest.raises(CheckpointError, match=message) as caught:  # one process, no torch.distributed
            consolidate_checkpoint(path)
        print(f"{name}: {caught.value}")
        errors = pools(2).run(resume_from, path)  # every rank raises, none waits
        assert all(message in error for error in errors), errors
        assert path in errors[0] or name == "not a checkpoint"
        after = {f: os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files}
        assert after == listing  # nothing written into it
    wrong_optimizer = pools(2).run(resume_from, _saved_checkpoint(tmp), "sgd")
    assert all("holds AdamW state; this run's optimizer is SGD" in e for e in wrong_optimizer), wrong_optimizer
    other_model = pools(2).run(resume_from, _saved_checkpoint(tmp), "adamw", Wider())
    assert all("does not match this model" in e and "net.head.weight" in e for e in other_model), other_model
    print(other_model[0])


def save_on_rank_zero_only(path: str) -> str:
    fit = trainer(zero(2, timeout=timedelta(seconds=5)), max_steps=1)
    fit.fit(LitTiny("sgd"), loader(2, 1))
    if dist.get_rank() != 0:
        return "skipped"
    try:
        fit.save_checkpoint(path)
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def test_save_on_one_rank_is_a_clear_error_not_a_hang(pools, tmp_path) -> None:
    pool = pools(2)
    try:
        results = pool.run(save_on_rank_zero_only, str(tmp_path / "one.ckpt"))
    finally:
        pool.restart()  # the failed barrier leaves the group unusable for later tests
    print(results[0])
    assert "call it on every rank" in results[0]
    assert not os.path.exists(tmp_path / "one.ckpt")


def test_package_exports_the_checkpoint_api() -> None:
    assert lightning_zero.consolidate_checkpoint is consolidate_checkpoint
    assert lightning_zero.is_sharded_checkpoint("/nonexistent") is False


class EditsOneWeight(LitTiny):
    """Replaces one saved weight in ``on_load_checkpoint``, as a user patching a checkpoint would."""

    def __init__(self, name: str, value: torch.Tensor) -> None:
        super().__init__("adamw", schedule=True)
        self.edit_name, self.edit_value = name, value

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"][self.edit_name] = self.edit_value


def resume_with_one_weight_edited(path: str, stage: int) -> dict[str, dict[str, torch.Tensor]]:
    fit = trainer(zero(stage), max_steps=SAVED, max_epochs=3)
    saved_module = LitTiny("adamw", schedule=True)
    fit.fit(saved_module, loader(8, 1))
    fit.save_checkpoint(path)
    saved = {k: v.detach().clone() for k, v in saved_module.state_dict().items()}
    name = next(k for k in saved if k.endswith("weight"))
    module = EditsOneWeight(name, torch.full_like(saved[name], 0.5))
    trainer(zero(stage), max_steps=SAVED, max_epochs=3).fit(module, loader(8, 1), ckpt_path=path)
    return {"saved": saved, "restored": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "edited": {name: module.edit_value}}


@pytest.mark.parametrize("stage", [2, 3])
def test_a_weight_edited_in_on_load_checkpoint_wins_over_its_shard_only(pools, tmp_path, stage: int) -> None:
    """Whole weights in the loaded state win tensor by tensor: the others come from the shards."""
    got = pools(2).run(resume_with_one_weight_edited, str(tmp_path / f"edit{stage}.ckpt"), stage)[0]
    (name, value), = got["edited"].items()
    assert torch.equal(got["restored"][name], value)
    others = [k for k in got["saved"] if k != name]
    assert others and all(torch.equal(got["restored"][k], got["saved"][k]) for k in others)


class SavesBothWays(LitTiny):
    """Saves "full" (one file from rank 0) and "sharded" inside fit, after optimizer step ``SAVED``, and
    records what this rank held for the "full" one."""

    def __init__(self, tmp: str) -> None:
        super().__init__("adamw", schedule=True)
        self.tmp = tmp
        self.held: dict[str, int] = {}

    def on_train_batch_end(self, *args: Any) -> None:
        if self.trainer.global_step != SAVED:
            return
        strategy = self.trainer.strategy
        self.trainer.save_checkpoint(f"{self.tmp}/full.ckpt")
        state = strategy.lightning_module_state_dict()
        optimizer = strategy.optimizer_state(strategy.optimizers[0])
        strategy.state_dict_type = "sharded"
        self.trainer.save_checkpoint(f"{self.tmp}/sharded.ckpt")
        strategy.state_dict_type = "full"
        names = {n for n, _ in self.named_parameters()}
        tensors = [t for entry in optimizer["state"].values() for t in entry.values() if torch.is_tensor(t) and t.dim()]
        self.held = {"masters": sum(state[n].numel() for n in names if state[n].dtype == torch.float32),
                     "optimizer": len(tensors)}


def full_and_sharded(tmp: str, stage: int, precision: str) -> dict[str, int]:
    module = SavesBothWays(tmp)
    trainer(zero(stage, state_dict_type="full"), max_steps=SAVED + 1, max_epochs=3, **_precision(precision)).fit(
        module, loader(8, 1))
    return module.held


@pytest.mark.parametrize(("stage", "precision"), [(2, "bf16-mixed"), (3, "32-true")])
def test_a_full_save_gathers_on_rank_zero_only_and_equals_the_sharded_one(pools, tmp_path, stage, precision) -> None:
    results = pools(2).run(full_and_sharded, str(tmp_path), stage, precision)
    whole = sum(p.numel() for p in LitTiny("adamw").parameters())
    print(f"stage {stage} {precision}: fp32 weights and optimizer tensors held for a full save: {results}")
    assert results[0]["masters"] == whole and results[0]["optimizer"] > 0
    assert results[1]["optimizer"] == 0  # rank 1 kept no whole optimizer state
    # nor the sharded fp32 masters: only what its module holds whole anyway (stage 2: the frozen and
    # non-16-bit parameters; stage 3: the persistent ones)
    assert results[1]["masters"] < whole / 2, results[1]
    full = torch.load(tmp_path / "full.ckpt", weights_only=False)
    one = consolidate_checkpoint(str(tmp_path / "sharded.ckpt"), optimizer=True)
    assert_same(full["state_dict"], one["state_dict"])
    saved = full["optimizer_states"][0]
    names = [group["params"] for group in saved["param_groups"]]
    assert_same(saved["state"], named_optimizer_state(one["optimizer_states"][0], names)["state"])
