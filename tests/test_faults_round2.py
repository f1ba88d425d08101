"""Faults, round two: no silent dtype change, no checkpoint destroyed by a tool, one writer per checkpoint
path, a full disk named as such."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import socket
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_zero import CheckpointError, ShardedCheckpoint, ZeroStrategy
from lightning_zero.__main__ import main as cli
from lightning_zero.checkpoint import _write_durably
from tests.lit_helpers import LitTiny, SettledDDPStrategy, loader, trainer


# ---------------------------------------------------------------------------------------------- dtypes
class WithDouble(LitTiny):
    """LitTiny with a float64 layer in front (its forward casts the input to the layer's dtype)."""

    def __init__(self) -> None:
        super().__init__("adamw")
        torch.manual_seed(1)
        self.wide = nn.Linear(7, 7).double()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, step = batch
        x = self.wide(x.to(self.wide.weight.dtype)).float()
        return nn.functional.mse_loss(self.net(x, use_branch=int(step) % 2 == 0), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def fit_with_double(kind: str, precision: str) -> dict[str, Any]:
    strategy: Any = SettledDDPStrategy(find_unused_parameters=True) if kind == "ddp" else ZeroStrategy(
        stage=int(kind[-1]), bucket_numel=150)
    module = WithDouble()
    trainer(strategy, max_steps=3, precision=precision).fit(module, loader(3, 1))
    return {"dtype": str(module.wide.weight.dtype), "weight": module.wide.weight.detach().clone(),
            "trained_in": str(module.wide.weight.dtype)}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_float64_layer_stays_float64(pools, precision: str) -> None:
    reference = pools(2).run(fit_with_double, "ddp", precision)[0]
    assert reference["dtype"] == "torch.float64"
    for kind in ("zero1", "zero2", "zero3"):
        got = pools(2).run(fit_with_double, kind, precision)[0]
        assert got["dtype"] == "torch.float64", (kind, got["dtype"])
        error = ((got["weight"] - reference["weight"]).norm() / reference["weight"].norm()).item()
        print(f"{kind} {precision}: float64 layer kept, {error:.1e} from ddp")
        assert error <= 1e-12, (kind, error)


# ---------------------------------------------------------------------------------------------- consolidate
def save_small(path: str) -> None:
    fit = trainer(ZeroStrategy(stage=2), max_steps=1)
    fit.fit(LitTiny("adamw"), loader(1, 1))
    fit.save_checkpoint(path)


def test_consolidate_never_destroys_a_checkpoint(pools, tmp_path, capsys) -> None:
    path = str(tmp_path / "run.ckpt")
    pools(2).run(save_small, path)
    before = sorted(os.listdir(path))
    for output in (path, path + os.sep, os.path.join(path, "inside.ckpt")):
        assert cli(["consolidate", path, output]) == 2
        assert "would destroy the sharded checkpoint" in capsys.readouterr().err
        assert sorted(os.listdir(path)) == before and ShardedCheckpoint(path).has_optimizer
    existing = tmp_path / "model.ckpt"
    existing.write_bytes(b"keep me")
    assert cli(["consolidate", path, str(existing)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and existing.read_bytes() == b"keep me"
    assert cli(["consolidate", path, str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert cli(["consolidate", path, str(existing), "--force"]) == 0
    assert "state_dict" in torch.load(existing, weights_only=True)


# ---------------------------------------------------------------------------------------------- writer lock
def _dead_pid() -> int:
    process = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    process.start()
    process.join()
    return process.pid


def save_while_locked(path: str, holder: dict[str, Any] | None) -> dict[str, Any]:
    """``holder``: the lock another writer holds (None: nobody). Save, and report what happened."""
    lock = path + ".lock"
    if dist.get_rank() == 0 and holder is not None:
        with open(lock, "w") as f:
            json.dump(holder, f)
    dist.barrier()
    fit = trainer(ZeroStrategy(stage=2), max_steps=2)
    fit.fit(LitTiny("adamw"), loader(2, 1))
    error = None
    try:
        fit.save_checkpoint(path)
    except CheckpointError as exc:
        error = str(exc)
    dist.barrier()
    return {"error": error, "lock_left": os.path.exists(lock),
            "version": ShardedCheckpoint(path).manifest["version"]}


def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_cleaned(pools, tmp_path) -> None:
    path = str(tmp_path / "shared.ckpt")
    pools(2).run(save_small, path)
    committed = ShardedCheckpoint(path).manifest["version"]
    live = {"host": socket.gethostname(), "pid": os.getpid(), "job": "4242", "started": time.time() - 30}
    results = pools(2).run(save_while_locked, path, live)
    for result in results:
        print(result["error"])
        assert result["error"] is not None and f"process {os.getpid()}" in result["error"], result
        assert "job 4242" in result["error"] and "another process is saving to" in result["error"]
        assert result["version"] == committed  # the first writer's checkpoint is intact
    assert os.path.exists(path + ".lock")  # still the live writer's
    os.remove(path + ".lock")
    dead = {**live, "pid": _dead_pid()}
    results = pools(2).run(save_while_locked, path, dead)
    for result in results:
        assert result["error"] is None and not result["lock_left"], result
        assert result["version"] != committed


def _take_slowly(path: str, start: Any, outcome: Any) -> None:
    """One writer of the race below: its lock record is written slowly (a loaded file server)."""
    from lightning_zero import checkpoint

    real_dump = json.dump

    def slow_dump(obj: Any, f: Any) -> None:
        time.sleep(0.3)
        real_dump(obj, f)

    checkpoint.json.dump = slow_dump  # type: ignore[attr-defined]
    start.wait()
    try:
        lock = checkpoint._WriterLock(path, f"v-{os.getpid():012x}")
    except CheckpointError as exc:
        outcome.put(("refused", str(exc)))
        return
    time.sleep(1.0)  # hold it while the others look
    outcome.put(("took", os.getpid()))
    lock.release()


def test_the_writer_lock_appears_whole_so_one_of_racing_writers_takes_it(tmp_path) -> None:
    context = multiprocessing.get_context("spawn")
    start, outcome = context.Barrier(3), context.Queue()
    racers = [context.Process(target=_take_slowly, args=(str(tmp_path / "race.ckpt"), start, outcome))
              for _ in range(3)]
    for racer in racers:
        racer.start()
    results = [outcome.get(timeout=60) for _ in racers]
    for racer in racers:
        racer.join()
    print(results)
    assert [kind for kind, _ in results].count("took") == 1, results
    assert all("another process is saving to" in text for kind, text in results if kind == "refused")
    assert not os.path.exists(tmp_path / "race.ckpt.lock")


def test_a_lock_from_another_host_is_stale_only_when_its_heartbeat_stopped(tmp_path, monkeypatch) -> None:
    from lightning_zero import checkpoint

    path = str(tmp_path / "remote.ckpt")
    lock = path + ".lock"
    other = {"host": "another-host", "pid": 1, "job": None, "started": time.time() - 7200}
    with open(lock, "w") as f:
        json.dump(other, f)  # touched just now: a writer on another host, alive
    with pytest.raises(CheckpointError, match="process 1 on another-host.*last heard 0s ago"):
        checkpoint._WriterLock(path, "v-000000000001")
    old = time.time() - checkpoint._STALE_LOCK_S - 5
    os.utime(lock, (old, old))  # its heartbeat stopped: a dead writer's leftover
    taken = checkpoint._WriterLock(path, "v-000000000002")
    assert checkpoint._read_lock(lock)["pid"] == os.getpid()
    # The holder's heartbeat keeps the lock fresh for as long as it saves.
    taken.release()
    monkeypatch.setattr(checkpoint, "_HEARTBEAT_S", 0.05)
    taken = checkpoint._WriterLock(path, "v-000000000003")
    os.utime(lock, (old, old))
    time.sleep(0.5)
    assert time.time() - os.stat(lock).st_mtime < 5
    taken.release()
    assert not os.path.exists(lock) and not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------- full disk
def test_a_full_disk_is_named(tmp_path, monkeypatch) -> None:
    def torch_zip_writer(f: Any) -> None:
        f.write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing "
                           "file data/0: unexpected pos 1000 vs 900")

    monkeypatch.setattr("shutil.disk_usage", lambda _: type("Usage", (), {"free": 0})())
    with pytest.raises(OSError, match="No space left on device") as caught:
        _write_durably(str(tmp_path / "file.pt"), torch_zip_writer)
    assert caught.value.errno == errno.ENOSPC and "unexpected pos" in str(caught.value)


def test_a_failed_write_with_free_space_names_a_quota(tmp_path, monkeypatch) -> None:
    """A quota (EDQUOT) fails torch's zip writer as a full disk does, but the disk shows free space."""
    def torch_zip_writer(f: Any) -> None:
        f.write(b"x" * 1000)
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr("shutil.disk_usage", lambda _: type("Usage", (), {"free": 10 * 2**30})())
    with pytest.raises(OSError, match="disk quota") as caught:
        _write_durably(str(tmp_path / "file.pt"), torch_zip_writer)
    assert "EDQUOT" in str(caught.value) and "file write failed" in str(caught.value)


# ---------------------------------------------------------------------------------------------- in-place casts
class CastsItsWeight(LitTiny):
    """A module that replaces its own weight after the forward, or casts it after backward."""

    def __init__(self, how: str) -> None:
        super().__init__("adamw")
        self.how = how

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.how == "replace":
            weight = next(self.net.parameters())
            weight.data = weight.data.clone()
        return loss

    def on_after_backward(self) -> None:
        if self.how == "cast" or (self.how == "cast on rank 1" and self.global_rank == 1):
            weight = next(self.net.parameters())
            weight.data = weight.data.double()


def fit_casting(stage: int, how: str) -> str:
    fit = trainer(ZeroStrategy(stage=stage, bucket_numel=150), max_steps=2)
    try:
        fit.fit(CastsItsWeight(how), loader(2, 1))
    except RuntimeError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_module_that_replaces_its_weight_is_named_on_the_first_step(pools, stage: int) -> None:
    name = next(n for n, _ in LitTiny("adamw").named_parameters())
    # Stage 3 points the parameters at its gathered buffers again before backward, which undoes a
    # replacement made during forward (harmless); a cast after backward reaches the step.
    # "cast on rank 1": every rank raises, naming rank 1 (none waits in the step's all-gather).
    for how in ("cast", "cast on rank 1") if stage == 3 else ("replace", "cast", "cast on rank 1"):
        errors = pools(2).run(fit_casting, stage, how)
        print(errors[0])
        assert all(f"{name} is no longer the tensor ZeRO trains" in e and "Cast the inputs" in e for e in errors)
        if how == "cast on rank 1":
            assert all("on rank 1" in e for e in errors)


def test_whereabouts_store_calls_wait_at_most_the_patience(monkeypatch) -> None:
    """A host that vanished without closing its connections must not hold the failure path for the store's
    own timeout (the process group's 30 minutes): every store call in it waits at most the patience."""
    from datetime import timedelta

    import torch.distributed as dist

    from lightning_zero.sharding import whereabouts

    seen: list[timedelta] = []

    class Store:
        timeout = timedelta(minutes=30)

        def set_timeout(self, timeout: timedelta) -> None:
            self.timeout = timeout

        def set(self, key: str, value: str) -> None:
            seen.append(self.timeout)

        def check(self, keys: list[str]) -> bool:
            seen.append(self.timeout)
            return False

    store = Store()
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_store", lambda: store)
    monkeypatch.setattr(dist, "get_rank", lambda *_: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda *_: 2)
    text = whereabouts.describe_ranks("a test", patience_s=0.2)
    assert seen and all(t == timedelta(seconds=0.2) for t in seen), seen
    assert store.timeout == timedelta(minutes=30)  # restored
    assert "rank 1 said nothing within 0s" in text or "rank 1 said nothing" in text
