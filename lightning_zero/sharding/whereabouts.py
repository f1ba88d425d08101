"""Where each rank is in the job (phase, optimizer step, batch), told to the others when a collective fails.

[Note: whereabouts]
A timeout by itself says only that this rank waited. Each rank keeps its current phase in a module-level
record (no communication on the hot path: a few attribute writes per batch). When a collective fails,
the rank publishes its record in the job's key-value store (the TCPStore behind the default process
group) and reads the other ranks' for a few seconds: a rank waiting on this one fails at about the same
moment and publishes too, while a rank that died publishes nothing. A rank stuck where it cannot fail
(a file write that stalls during a save) publishes nothing either, so the slow phases (save, load, end of
run) are also told on entry, one store write each, and a silent rank is reported where it last said it
was. The error then says which rank stopped where and what this rank was waiting for, and names uneven
batch counts (a rank that finished its epoch while another is still training) as the cause when they are.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

__all__ = ["Whereabouts", "describe_ranks", "mark", "publish", "start_fit", "whereabouts"]

_KEY = "lightning_zero/whereabouts/{}/{}"  # per fit (every rank counts its fits alike) and rank
_ENTERED = "lightning_zero/entered/{}/{}"  # the last slow phase a rank entered, told as it enters it
_TOLD_ON_ENTRY = ("save", "load", "end of run")  # rare and slow: one store write each costs nothing
_TRAINING = ("forward", "backward", "optimizer step")
_FINISHED = ("end of run",)


@dataclass
class Whereabouts:
    """One rank's position: ``phase`` ("setup", "forward", "backward", "optimizer step", "validation",
    "test", "save", "end of run"), the optimizer step and the training batch index."""

    phase: str = "setup"
    step: int = 0
    batch: int = -1
    batches: int = 0  # training batches started in this fit
    error: str = ""  # what this rank raised, once it has

    def describe(self) -> str:
        where = self._position()
        return f"{where}, where it raised {self.error}" if self.error else where

    def _position(self) -> str:
        if self.phase in _TRAINING:
            return f"in the {self.phase} of training batch {self.batch} (optimizer step {self.step})"
        if self.phase in _FINISHED:
            return f"at the end of the run after {self.batches} training batches (optimizer step {self.step})"
        return f"in {self.phase} (optimizer step {self.step}, {self.batches} training batches so far)"


#: This process's position, updated by the strategy and the precision plugin.
whereabouts = Whereabouts()
_fits = 0


def mark(phase: str, step: int | None = None, batch: int | None = None) -> None:
    """Record that this rank entered ``phase`` (with the optimizer step and training batch, when known)."""
    whereabouts.phase = phase
    if step is not None:
        whereabouts.step = step
    if batch is not None and phase == "forward" and batch != whereabouts.batch:
        whereabouts.batches += 1
        whereabouts.batch = batch
    if phase in _TOLD_ON_ENTRY:
        # A rank stuck in a slow phase (a stalled file write) can tell nothing when the others fail:
        # what it said on entry is what they can report.
        _tell(_ENTERED)


def _tell(key: str, patience: timedelta | None = timedelta(seconds=3)) -> None:
    """Write this rank's record under ``key``, waiting at most ``patience`` (None: the store's timeout as set)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        with _store_timeout(store, patience) if patience is not None else contextlib.nullcontext():
            store.set(key.format(_fits, dist.get_rank()), json.dumps({**asdict(whereabouts), "time": time.time()}))
    except (RuntimeError, ValueError, AttributeError, OSError):
        pass  # no process group, or its store is gone: nothing to tell


def start_fit() -> None:
    """A new fit: counts start again."""
    global _fits
    _fits += 1
    whereabouts.phase, whereabouts.step, whereabouts.batch, whereabouts.batches = "setup", 0, -1, 0
    whereabouts.error = ""


def publish(error: BaseException | None = None) -> None:
    """Tell the other ranks where this rank is (and what it raised): the strategy calls it when a run
    fails here, so a rank still waiting on this one can say why."""
    if error is not None:
        whereabouts.error = f"{type(error).__name__}: {str(error)[:300]}"
    _tell(_KEY)


@contextlib.contextmanager
def _store_timeout(store: Any, timeout: timedelta) -> Iterator[None]:
    """``store``'s operations time out after ``timeout`` inside the block (its own timeout after)."""
    try:
        previous = store.timeout
        store.set_timeout(timeout)
    except (AttributeError, RuntimeError):  # a store without a settable timeout: its own applies
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(AttributeError, RuntimeError):
            store.set_timeout(previous)


def describe_ranks(waiting: str, patience_s: float = 3.0) -> str:
    """What every rank was doing when this rank's wait for ``waiting`` failed: this rank's position, each
    other rank's as it published it within ``patience_s`` seconds, and the likely cause. Empty when there
    is no process group or store to ask."""
    try:
        store = dist.distributed_c10d._get_default_store()
        rank, world = dist.get_rank(), dist.get_world_size()
    except (RuntimeError, ValueError, AttributeError):
        return ""
    heard: dict[int, dict] = {}
    entered: dict[int, dict] = {}  # what the silent ranks said when they entered their last slow phase
    # Each store call waits at most the patience: a host that vanished without closing its connections
    # would otherwise hold this rank for the store's own timeout (the process group's, 30 minutes).
    with _store_timeout(store, timedelta(seconds=patience_s)):
        _tell(_KEY, patience=None)
        try:
            deadline = time.monotonic() + patience_s
            while len(heard) < world - 1 and time.monotonic() < deadline:
                for other in range(world):
                    key = _KEY.format(_fits, other)
                    if other == rank or other in heard or not store.check([key]):
                        continue
                    heard[other] = json.loads(store.get(key))
                time.sleep(0.05)
            for other in range(world):
                key = _ENTERED.format(_fits, other)
                if other != rank and other not in heard and store.check([key]):
                    entered[other] = json.loads(store.get(key))
        except (RuntimeError, ValueError, OSError):  # the store went away with rank 0: say what is known
            pass
    lines = [f"rank {rank} (this one) was {whereabouts.describe()}, waiting for {waiting}"]
    positions = {rank: whereabouts}
    for other in range(world):
        if other == rank:
            continue
        if other in heard:
            entry = heard[other]
            positions[other] = Whereabouts(entry["phase"], entry["step"], entry["batch"], entry["batches"],
                                           entry.get("error", ""))
            lines.append(f"rank {other} was {positions[other].describe()}")
        elif other in entered:
            entry = entered[other]
            since = Whereabouts(entry["phase"], entry["step"], entry["batch"], entry["batches"])
            stalled = " (a stalled file write or a hung filesystem)" if since.phase in ("save", "load") else ""
            lines.append(
                f"rank {other} said nothing within {patience_s:.0f}s; {time.time() - entry['time']:.0f}s earlier it "
                f"told it was {since.describe()}, and it is most likely stuck there{stalled}, or died there"
            )
        else:
            lines.append(f"rank {other} said nothing within {patience_s:.0f}s (it died, or is still busy)")
    finished = [r for r, w in positions.items() if w.phase in _FINISHED]
    training = [r for r, w in positions.items() if w.phase in _TRAINING]
    if finished and training:
        counts = ", ".join(f"rank {r}: {positions[r].batches}" for r in sorted(positions))
        lines.append(
            f"cause: the ranks ran different numbers of training batches ({counts}); every rank must run the same "
            "number: keep Lightning's DistributedSampler (use_distributed_sampler=True), make an IterableDataset "
            "yield as many batches on each rank, or set limit_train_batches"
        )
    return "; ".join(lines)
