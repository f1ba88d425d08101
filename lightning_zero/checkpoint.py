"""Sharded checkpoints: one directory in which every rank writes its own slices, committed atomically.

[Note: sharded checkpoint layout and commit]
A checkpoint ``PATH`` is a directory::

    PATH/CHECKPOINT.json                      the manifest, and the commit marker: written last
    PATH/v-<id>/meta.pt                       rank 0: Lightning's checkpoint dict (loops, callbacks, LR
                                              schedulers, precision, hyper-parameters, buffers)
    PATH/v-<id>/rank-00000-of-00002.pt        each rank: its parameter slices and their optimizer state

Saving writes a fresh ``v-<id>`` next to whatever is there. After every rank has written, fsynced and
reported its file's size and CRC-32, rank 0 writes ``meta.pt``, then the manifest to a temporary name and
``os.replace``s it over ``CHECKPOINT.json`` (atomic on POSIX), then deletes the old version. So a save
killed at any moment leaves ``CHECKPOINT.json`` pointing at one complete version, old or new, and
overwriting ``last.ckpt`` never mixes old metadata with new shards. Leftovers of a killed save are
removed by the next save to that path. Loading checks every listed file's size and CRC-32 first and names
the file that is missing, truncated or corrupt.

Why not ``torch.distributed.checkpoint`` (DCP): DCP describes a saved chunk as a box in a tensor's shape,
but a flat ZeRO shard cuts parameters at arbitrary element offsets (see [Note: flat contiguous shards]),
so every slice would have to be re-keyed as its own flattened tensor and the overlap planning for
resharding done here anyway, leaving DCP as a file writer; the commit protocol above sits outside it too,
and consolidation must run in one process without ``torch.distributed`` and name a broken file. The files
here are plain ``torch.save`` zip archives, read back with ``mmap=True`` so a rank touches only the slices
it needs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from functools import cached_property
from typing import IO, TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from torch.distributed import ProcessGroup

from lightning_zero.sharding.collectives import all_gather_objects
from lightning_zero.sharding.state import FullSource, Piece, PieceSource, StateSource, to_full_state_dict

if TYPE_CHECKING:
    from lightning_zero.sharding.engine import ZeroEngine

__all__ = [
    "CheckpointError",
    "agree",
    "as_trainer_checkpoint",
    "engine_shards",
    "layout_names",
    "restore_module",
    "restore_optimizer",
    "open_sharded",
    "saved_entries",
    "ShardedCheckpoint",
    "consolidate_checkpoint",
    "is_sharded_checkpoint",
    "save_sharded",
]

FORMAT = "lightning-zero/sharded-checkpoint/1"
MANIFEST = "CHECKPOINT.json"
META = "meta.pt"
_VERSION = re.compile(r"^v-[0-9a-f]{12}$")
_TEMPORARY = re.compile(r"^\.CHECKPOINT\.json\.v-[0-9a-f]{12}\.tmp$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit: the message names the file and the mismatch."""


def rank_file(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.pt"


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a committed lightning-zero sharded checkpoint directory."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def _write_durably(path: str, write: Callable[[IO[bytes]], None]) -> dict[str, int]:
    """Write a file and flush it to disk; its size and CRC-32 for the manifest. A full disk is named as such
    (torch's zip writer reports it as "unexpected pos" or "file write failed"), and a failed write with free
    space left names a quota as the likely cause."""
    try:
        with open(path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise
        free = shutil.disk_usage(os.path.dirname(path) or ".").free
        written = os.path.getsize(path) if os.path.exists(path) else 0
        if free < max(written, 1 << 20):
            raise OSError(errno.ENOSPC, f"No space left on device writing {path}: {free:,} bytes free after "
                                        f"{written:,} written; free space or save elsewhere ({exc})") from exc
        if isinstance(exc, RuntimeError):  # torch's zip writer hides the errno; the disk is not full
            raise OSError(errno.EIO, f"writing {path} failed after {written:,} bytes with {free:,} bytes free on the "
                                     "disk: a disk quota (EDQUOT: `quota -s` shows yours) or an I/O error; free "
                                     f"quota or save elsewhere ({exc})") from exc
        raise
    return {"bytes": os.path.getsize(path), "crc32": _crc32(path)}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _arrive(group: ProcessGroup | None, timeout: timedelta, what: str) -> None:
    """Every rank must call ``what``: a clear error naming the missing ranks instead of a hang."""
    try:
        dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=True)
    except RuntimeError as exc:
        raise RuntimeError(
            f"{what} is a collective under ZeroStrategy: call it on every rank, not only under "
            f"`if trainer.is_global_zero` ({exc})"
        ) from exc


def agree(error: str | None, group: ProcessGroup | None) -> None:
    """Raise on every rank the first error any rank met, so no rank goes on to wait for the others."""
    errors = [e for e in all_gather_objects(error, group) if e]
    if errors:
        raise CheckpointError(errors[0])


# [Note: one writer per checkpoint path]
# Two jobs saving to one path (a job launched again while the old one still runs) would each collect the
# other's staging directory as garbage. Rank 0 therefore holds ``PATH.lock`` beside the checkpoint while it
# saves: its host, process id, job id and start time. The lock appears whole or not at all: the record is
# written to a private file first and hard-linked to the lock's name, which fails if the name exists (atomic
# on local filesystems and NFS alike, unlike O_EXCL on old NFS). While the save runs, a thread touches the
# lock every ``_HEARTBEAT_S``. A second writer finds the lock and fails on every rank naming the first; the
# first commits intact. A lock is a leftover of a killed save, removed before the save goes on, when its job
# id is this job's (a requeued SLURM job), its writer is this process or no longer runs on this host, or
# its heartbeat stopped ``_STALE_LOCK_S`` ago (a writer on another host, whose processes this one cannot
# see). Ages are read against the filesystem's own clock (the private file's mtime), so hosts whose clocks
# disagree still agree on staleness.
_HEARTBEAT_S = 10.0
_STALE_LOCK_S = 180.0  # many missed heartbeats, beyond NFS attribute caching (at most 60 s by default)


def _lock_path(path: str) -> str:
    return f"{path.rstrip(os.sep)}.lock"


class _WriterLock:
    """Rank 0's hold on ``path``'s writer lock, kept fresh by a heartbeat until ``release``."""

    def __init__(self, path: str, version: str) -> None:
        self.lock = _lock_path(path)
        self._stop = threading.Event()
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "version": version, "started": time.time(),
                 "job": _job_id()}
        os.makedirs(os.path.dirname(self.lock) or ".", exist_ok=True)
        private = f"{self.lock}.{version}.tmp"
        with open(private, "w") as f:
            json.dump(owner, f)
        try:
            self._take(path, private)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(private)
        self._beat = threading.Thread(target=self._heartbeat, name="lightning_zero checkpoint lock", daemon=True)
        self._beat.start()

    def _take(self, path: str, private: str) -> None:
        for _ in range(3):
            try:
                os.link(private, self.lock)
                return
            except FileExistsError:
                pass
            now = os.stat(private).st_mtime  # the filesystem's clock, not this host's
            try:
                age = now - os.stat(self.lock).st_mtime
            except FileNotFoundError:
                continue  # released meanwhile
            holder = _read_lock(self.lock)
            if not _is_stale(holder, age):
                assert holder is not None
                job = f", job {holder['job']}" if holder.get("job") else ""
                raise CheckpointError(
                    f"another process is saving to {path}: process {holder.get('pid')} on {holder.get('host')}"
                    f"{job}, for {time.time() - float(holder.get('started', 0)):.0f}s, last heard {age:.0f}s ago "
                    f"(lock {self.lock}). Two jobs writing one checkpoint path would destroy each other's files: "
                    "stop the other job, or save this one elsewhere (e.g. another dirpath)"
                )
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.lock)  # a dead writer's leftover
        raise CheckpointError(f"could not take the writer lock {self.lock}: another process keeps creating it")

    def _heartbeat(self) -> None:
        while not self._stop.wait(_HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.lock)

    def release(self) -> None:
        self._stop.set()
        self._beat.join()
        holder = _read_lock(self.lock)
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.lock)


def _read_lock(lock: str) -> dict[str, Any] | None:
    try:
        with open(lock) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # unreadable (written by hand, or a disk error): stale once its heartbeat is old


def _job_id() -> str | None:
    return next((os.environ[k] for k in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID") if k in os.environ), None)


def _is_stale(holder: Mapping[str, Any] | None, age: float) -> bool:
    """Whether a lock held by ``holder``, last touched ``age`` seconds ago, is a dead writer's leftover."""
    if age > _STALE_LOCK_S:
        return True  # no heartbeat for many periods: its writer is gone, wherever it ran
    if holder is None:
        return False
    job = _job_id()
    if job is not None and holder.get("job") == job:
        return True  # this job's own leftover (a requeued job keeps its id; it cannot run twice at once)
    if holder.get("host") != socket.gethostname():
        return False
    if holder.get("pid") == os.getpid():
        return True  # this process's own leftover (a restarted container reusing the pid, say)
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError, TypeError):
        return False
    return False


def _prepare_directory(path: str, version: str) -> None:
    """Rank 0: make ``path`` a checkpoint directory that can take a new version, without touching a
    committed one. Refuses a directory holding anything but checkpoint files."""
    if os.path.isfile(path):
        os.replace(path, f"{path}.replaced-{version}")  # a single-file checkpoint being overwritten
    os.makedirs(path, exist_ok=True)
    foreign = [name for name in os.listdir(path)
               if name != MANIFEST and not _VERSION.match(name) and not _TEMPORARY.match(name)]
    if foreign:
        raise CheckpointError(
            f"{path} exists and holds {sorted(foreign)[:3]}, which are not lightning-zero checkpoint files; "
            "refusing to write a checkpoint into it. Choose another path or remove it."
        )
    os.makedirs(os.path.join(path, version))


def _collect_garbage(path: str, keep: str) -> None:
    """Rank 0, after a commit: drop old versions and leftovers of killed saves."""
    for name in os.listdir(path):
        if name != keep and (_VERSION.match(name) or _TEMPORARY.match(name)):
            target = os.path.join(path, name)
            shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    for name in os.listdir(os.path.dirname(path) or "."):
        if name.startswith(os.path.basename(path) + ".replaced-"):
            os.remove(os.path.join(os.path.dirname(path), name))


def save_sharded(
    path: str | os.PathLike[str],
    local_state: Mapping[str, Any],
    meta: Mapping[str, Any] | None,
    group: ProcessGroup | None,
    timeout: timedelta,
    manifest: Mapping[str, Any],
) -> None:
    """Write one sharded checkpoint: every rank's ``local_state`` (``local_state_dict()``), rank 0's
    ``meta`` and ``manifest`` entries. A collective; atomic (see the note above); raises on every rank if
    any rank fails, leaving the previous checkpoint at ``path`` as it was."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    _arrive(group, timeout, "trainer.save_checkpoint()")
    path = os.path.abspath(os.fspath(path))
    agreed = all_gather_objects((path, f"v-{uuid.uuid4().hex[:12]}"), group)
    if len({p for p, _ in agreed}) != 1:
        raise CheckpointError(f"ranks save to different paths {sorted({p for p, _ in agreed})}; pass the same "
                              "path on every rank")
    version = agreed[0][1]
    held: list[_WriterLock] = []  # the writer lock, once rank 0 holds it
    try:
        _write_locked(path, version, rank, group, local_state, meta, manifest, world, held)
    finally:
        for lock in held:
            lock.release()


def _write_locked(path: str, version: str, rank: int, group: ProcessGroup | None, local_state: Mapping[str, Any],
                  meta: Mapping[str, Any] | None, manifest: Mapping[str, Any], world: int,
                  held: list[_WriterLock]) -> None:
    """``save_sharded`` once the ranks agree on the path: rank 0 takes the writer lock (into ``held``) and
    prepares the directory, every rank writes, rank 0 commits."""
    error = None
    if rank == 0:
        try:
            held.append(_WriterLock(path, version))
            _prepare_directory(path, version)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = str(exc) if isinstance(exc, CheckpointError) else f"cannot save checkpoint {path}: {exc}"
    agree(error, group)

    staging = os.path.join(path, version)
    entry, error = None, None
    try:
        name = rank_file(rank, world)
        written = _write_durably(os.path.join(staging, name), lambda f: torch.save(dict(local_state), f))
        entry = {"file": name, **written,
                 "pieces": [[p["fqn"], p["start"], p["numel"]] for p in local_state["pieces"]],
                 "whole": {fqn: value.numel() for fqn, value in local_state["whole"].items()}}
    except Exception as exc:  # noqa: BLE001 - reported on every rank below
        error = f"rank {rank} could not write its part of checkpoint {path}: {type(exc).__name__}: {exc}"
    entries = all_gather_objects(entry, group, what="every rank's report that its checkpoint file is written")
    if error is not None or any(e is None for e in entries):
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
    agree(error, group)

    if rank == 0:
        try:
            assert meta is not None
            written = _write_durably(os.path.join(staging, META), lambda f: torch.save(dict(meta), f))
            document = {"format": FORMAT, "version": version, "world_size": world, **manifest,
                        "meta": {"file": META, **written}, "ranks": entries}
            temporary = os.path.join(path, f".{MANIFEST}.{version}.tmp")
            _write_durably(temporary, lambda f: f.write(json.dumps(document, indent=1).encode()))
            _fsync_dir(staging)
            os.replace(temporary, os.path.join(path, MANIFEST))  # the commit
            _fsync_dir(path)
            _collect_garbage(path, keep=version)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = f"could not commit checkpoint {path}: {type(exc).__name__}: {exc}"
    agree(error, group)


class ShardedCheckpoint:
    """A committed sharded checkpoint, read lazily: manifest first, then only the files asked for."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.fspath(path))
        manifest = os.path.join(self.path, MANIFEST)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path} is not a lightning-zero sharded checkpoint (not a directory)")
        if not os.path.isfile(manifest):
            raise CheckpointError(
                f"{self.path} is not a lightning-zero sharded checkpoint: it has no {MANIFEST} (the commit "
                "marker). If a first save to it was interrupted, no checkpoint was ever committed there."
            )
        try:
            with open(manifest) as f:
                self.manifest: dict[str, Any] = json.load(f)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{manifest} is unreadable or corrupt: {exc}") from exc
        if self.manifest.get("format") != FORMAT:
            raise CheckpointError(f"{manifest} has format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.directory = os.path.join(self.path, self.manifest["version"])
        self.world_size: int = self.manifest["world_size"]
        self._ranks: dict[int, Mapping[str, Any]] = {}

    def _files(self) -> list[dict[str, Any]]:
        return [self.manifest["meta"], *self.manifest["ranks"]]

    def check(self, verify: Callable[[int], bool] = lambda _: True) -> None:
        """Raise naming the first listed file that is missing or truncated; for files where ``verify(i)``
        holds (i: position in meta, rank 0, rank 1, ...), also check the CRC-32 (reads the file)."""
        for position, entry in enumerate(self._files()):
            file = os.path.join(self.directory, entry["file"])
            if not os.path.isfile(file):
                raise CheckpointError(f"checkpoint {self.path} is missing {file}")
            size = os.path.getsize(file)
            if size != entry["bytes"]:
                raise CheckpointError(f"{file} is truncated or altered: {size} bytes, the manifest says "
                                      f"{entry['bytes']}")
            if verify(position) and _crc32(file) != entry["crc32"]:
                raise CheckpointError(f"{file} is corrupt: its CRC-32 differs from the manifest's")

    def _load(self, name: str, weights_only: bool) -> Any:
        file = os.path.join(self.directory, name)
        try:
            return torch.load(file, map_location="cpu", mmap=True, weights_only=weights_only)
        except Exception as exc:
            raise CheckpointError(f"cannot read {file}: {type(exc).__name__}: {exc}") from exc

    def load_meta(self, weights_only: bool = False) -> dict[str, Any]:
        """Lightning's checkpoint dict without the sharded parts. It holds arbitrary Python objects
        (hyper-parameters, callback state), so by default it is unpickled in full: load trusted files."""
        return self._load(META, weights_only=weights_only)

    def load_rank(self, rank: int) -> Mapping[str, Any]:
        if rank not in self._ranks:
            self._ranks[rank] = self._load(self.manifest["ranks"][rank]["file"], weights_only=True)
        return self._ranks[rank]

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {fqn: tuple(shape) for fqn, shape in self.manifest["shapes"].items()}

    @property
    def has_optimizer(self) -> bool:
        return bool(self.manifest.get("optimizer_state"))

    def whole_params(self) -> dict[str, torch.Tensor]:
        """Every parameter whole, by name (aliases included), at master precision, on the CPU."""
        return to_full_state_dict(self.source(optimizer=False), self.manifest.get("aliases"), optimizer=False)["params"]

    def source(self, optimizer: bool) -> PieceSource:
        """The saved slices as a ``StateSource``; files are opened when a range needs them."""
        pieces: dict[str, list[Piece]] = {}
        for rank, entry in enumerate(self.manifest["ranks"]):
            for position, (fqn, start, numel) in enumerate(entry["pieces"]):
                pieces.setdefault(fqn, []).append(
                    Piece(start, numel, lambda r=rank, i=position: self.load_rank(r)["pieces"][i]))
            for fqn, numel in entry["whole"].items():
                pieces.setdefault(fqn, []).append(Piece(0, numel, lambda r=rank, n=fqn: {
                    "param": self.load_rank(r)["whole"][n].reshape(-1), "optimizer": {}}))
        groups = self.load_rank(0)["param_groups"] if optimizer and self.has_optimizer else None
        return PieceSource(self.shapes, pieces, groups, origin=f"checkpoint {self.path}")


def torch_optimizer_state(full: Mapping[str, Any]) -> dict[str, Any]:
    """A whole optimizer state keyed by parameter name, in ``torch.optim.Optimizer.state_dict()`` form
    (parameters numbered across groups in order), as Lightning's ``ddp`` saves and loads it."""
    number: dict[str, int] = {}
    groups = []
    for group in full["param_groups"]:
        names = list(group["params"])
        for name in names:
            number.setdefault(name, len(number))
        groups.append({**group, "params": [number[name] for name in names]})
    return {"state": {number[name]: dict(values) for name, values in full["state"].items()}, "param_groups": groups}


def split_optimizers(full: Mapping[str, Any], counts: Sequence[int] | None) -> list[dict[str, Any]]:
    """Several optimizers' whole state (their param groups one optimizer after another, ``counts`` groups
    each) as one whole state per optimizer."""
    if not counts or len(counts) == 1:
        return [dict(full)]
    parts, first = [], 0
    for count in counts:
        groups = full["param_groups"][first : first + count]
        names = {name for group in groups for name in group["params"]}
        parts.append({"state": {n: v for n, v in full["state"].items() if n in names}, "param_groups": groups})
        first += count
    return parts


def named_optimizer_state(state: Mapping[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """The inverse of ``torch_optimizer_state``: a ``torch.optim`` state dict keyed by the parameter names
    of each group (``names``), as ``ShardedOptimizer.load_full_state_dict`` takes it."""
    flat = [name for group in names for name in group]
    numbers = [number for group in state["param_groups"] for number in group["params"]]
    if len(numbers) != len(flat):
        raise CheckpointError(f"the saved optimizer holds {len(numbers)} parameters, this one {len(flat)}")
    name_of = dict(zip(numbers, flat))
    groups = [{**group, "params": list(group_names)} for group, group_names in zip(state["param_groups"], names)]
    return {"state": {name_of[n]: dict(values) for n, values in state["state"].items()}, "param_groups": groups}


# [Note: one format for the Trainer and Fabric]
# The Trainer's checkpoint dict keeps the module's state under "state_dict" and the optimizer's under
# "optimizer_states" (a list); a Fabric checkpoint keeps them under the user's own keys ({"model": model,
# "optimizer": optimizer, "step": 3}). A sharded checkpoint saved by Fabric records those keys in its manifest
# ("entries"), so each loader finds the module's and the optimizer's entries whichever front end saved them:
# the Trainer renames them to its own keys (``as_trainer_checkpoint``), Fabric maps them onto the keys the user
# asks for, and ``consolidate_checkpoint`` fills the whole weights in under the key they were saved with.
TRAINER_ENTRIES = {"module": "state_dict", "optimizer": "optimizer_states"}


def saved_entries(manifest: Mapping[str, Any]) -> dict[str, str | None]:
    """The keys under which a checkpoint holds its module's state and its optimizer's (None: none)."""
    return dict(manifest.get("entries") or TRAINER_ENTRIES)


def optimizer_keys(entries: Mapping[str, Any]) -> list[str]:
    """The keys of the optimizers' entries (a Fabric save of several optimizers of one model lists them)."""
    keys = entries.get("optimizer")
    return [] if keys is None else [keys] if isinstance(keys, str) else list(keys)


def as_trainer_checkpoint(meta: dict[str, Any], manifest: Mapping[str, Any]) -> dict[str, Any]:
    """``meta`` with the module's and optimizer's entries under the Trainer's keys (a Fabric save renamed)."""
    entries = saved_entries(manifest)
    if entries == TRAINER_ENTRIES:
        return meta
    meta = dict(meta)
    module_key = entries["module"]
    if module_key is not None:
        meta["state_dict"] = meta.pop(module_key, {})
    keys = optimizer_keys(entries)
    if keys and all(key in meta for key in keys):
        meta["optimizer_states"] = [meta.pop(key) for key in keys]
    return meta


def fill_from_shards(meta: dict[str, Any], params: Mapping[str, torch.Tensor], key: str = "state_dict") -> None:
    """Put the shards' whole ``params`` where a plain checkpoint holds the module's weights (``key``). Whole
    tensors a callback already put there win (``EMAWeightAveraging`` saves its average there, and keeps the
    module's own state in ``current_model_state``, which then gets the shards' values)."""
    meta[key] = {**params, **meta.get(key, {})}
    if isinstance(meta.get("current_model_state"), Mapping):
        meta["current_model_state"] = {**params, **meta["current_model_state"]}


def engine_shards(engine: ZeroEngine | None, stage: int, optimizer: bool,
                  entries: Mapping[str, str | None] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """This rank's slices of ``engine`` (with its optimizer state when ``optimizer``) and the manifest entries
    that describe them, for ``save_sharded``. ``entries``: where the module's and optimizer's states sit in the
    checkpoint dict, when not the Trainer's keys."""
    local: dict[str, Any] = {"pieces": [], "whole": {}, "param_groups": None}
    manifest: dict[str, Any] = {"stage": stage, "optimizer_state": optimizer and engine is not None,
                                "optimizer": None, "shapes": {}, "aliases": {}}
    if entries is not None:
        manifest["entries"] = dict(entries)
    if engine is not None:
        local = engine.local_state_dict(optimizer=optimizer)
        names = [type(sharded.optimizer).__qualname__ for sharded in engine.optimizers]
        manifest.update(
            optimizer=names[0] if len(names) == 1 else names,
            optimizer_groups=[len(sharded.optimizer.param_groups) for sharded in engine.optimizers],
            shapes={r.fqn: list(r.shape) for r in engine.layout.params},
            aliases={r.fqn: list(r.aliases) for r in engine.layout.params if r.aliases},
        )
    return local, manifest


def open_sharded(path: str | os.PathLike[str], rank: int, world_size: int,
                 group: ProcessGroup | None) -> ShardedCheckpoint:
    """Open a sharded checkpoint on every rank: each checks the CRCs of a share of the files, and a failure
    anywhere raises on every rank (a collective when ``torch.distributed`` runs)."""
    error, checkpoint = None, None
    try:
        checkpoint = ShardedCheckpoint(path)
        checkpoint.check(verify=lambda position: position % world_size == rank)
    except CheckpointError as exc:
        error = str(exc)
    if dist.is_available() and dist.is_initialized():
        agree(error, group)
    elif error:
        raise CheckpointError(error)
    assert checkpoint is not None
    return checkpoint


def layout_names(engines: list[ZeroEngine]) -> set[str]:
    """The state-dict names (aliases included) of every parameter the engines hold."""
    return {name for engine in engines for r in engine.layout.params for name in (r.fqn, *r.aliases)}


def restore_module(module: torch.nn.Module, engine: ZeroEngine | None, state: Mapping[str, Any],
                   shards: ShardedCheckpoint | None, strict: bool, fill_whole: bool = True) -> None:
    """Load a module's saved ``state`` (whole tensors from a file; buffers only from a sharded checkpoint,
    whose ``shards`` hold the parameters) into ``module``, or into ``engine``'s slices when one shards it.
    Whole weights in ``state`` win over the shards, tensor by tensor (a callback or ``on_load_checkpoint`` put
    them there: EMA's average); without shards, ``strict=False`` parameters ``state`` lacks keep their values.
    ``fill_whole=False``: ``state`` already holds the shards' whole weights."""
    origin = shards.path if shards is not None else "the checkpoint"
    state = dict(state)
    if engine is None:  # nobody shards this module (before setup, or no optimizer): load it whole
        if shards is not None and fill_whole:
            state = {**shards.whole_params(), **state}
        try:
            module.load_state_dict(state, strict=strict)
        except RuntimeError as exc:
            raise CheckpointError(f"{origin} does not match this model: {exc}") from exc
        return
    names = layout_names([engine])
    if shards is not None:
        source: StateSource = shards.source(optimizer=False)
        try:
            engine.check_source(source, optimizer=False)
        except ValueError as exc:
            raise CheckpointError(f"{origin} does not match this model: {exc}") from exc
        engine.load_state(source, optimizer=False)
    # Whole weights in ``state`` (a file's, or a callback's average that wins over the shards) are written
    # through to the engine's slices by the module's own load_state_dict ([Note: load_state_dict writes
    # through]), tensor by tensor; with shards, weights ``state`` lacks keep the shards' values.
    try:
        missing, unexpected = module.load_state_dict(state, strict=strict and shards is None)
    except RuntimeError as exc:
        raise CheckpointError(f"{origin} does not match this model: {exc}") from exc
    missing = [k for k in missing if k not in names]
    if strict and (missing or unexpected):
        raise CheckpointError(f"{origin} does not match this model: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}")


def restore_optimizer(engine: ZeroEngine, state: Mapping[str, Any], shards: ShardedCheckpoint | None,
                      which: int = 0) -> None:
    """Load optimizer ``which``'s saved ``state`` into ``engine``'s slices: from the ``shards``, or from a whole
    state in torch's numbered form (``ddp``) or keyed by parameter name (a "full" ZeRO save)."""
    origin = shards.path if shards is not None else "the checkpoint"
    sharded = engine.optimizers[which]
    current = type(sharded.optimizer).__qualname__
    if shards is not None:
        saved = shards.manifest.get("optimizer")
        if isinstance(saved, list):  # several optimizers
            saved = saved[which] if which < len(saved) else f"{len(saved)} optimizers'"
        if saved != current:
            raise CheckpointError(f"{origin} holds {saved} state; this run's optimizer is {current}. "
                                  "Resume with the same optimizer, or load the weights only.")
        if not shards.has_optimizer:
            raise CheckpointError(f"{origin} was saved without optimizer state (weights only)")
        source: StateSource = shards.source(optimizer=True)
    else:
        groups = state.get("param_groups") or []
        if groups and groups[0]["params"] and isinstance(groups[0]["params"][0], int):
            state = named_optimizer_state(state, sharded.param_fqns)  # saved by ``ddp``
        source = FullSource({"optimizer": state}, shapes=sharded.shapes)
    try:
        sharded.load_state(source)
    except ValueError as exc:
        raise CheckpointError(f"{origin} holds another optimizer setup than {current}'s: {exc}") from exc


def consolidate_checkpoint(path: str | os.PathLike[str], optimizer: bool = False,
                           weights_only: bool = False) -> dict[str, Any]:
    """A plain checkpoint dict from a sharded one, in this process, without ``torch.distributed``: the
    module's entry (``state_dict`` for the Trainer, the user's key for Fabric) holds whole fp32 tensors
    (master precision), so ``MyModule.load_from_checkpoint``, plain ``ddp`` and ``torch.load`` users read it.
    ``optimizer=True`` also consolidates the optimizer state (torch's format); otherwise the optimizer's entry
    is dropped and the result is a weights-only checkpoint. ``weights_only`` unpickles the metadata as
    ``torch.load(weights_only=True)`` does."""
    checkpoint = ShardedCheckpoint(path)
    checkpoint.check()
    meta = checkpoint.load_meta(weights_only=weights_only)
    if optimizer and not checkpoint.has_optimizer:
        raise CheckpointError(f"checkpoint {checkpoint.path} was saved without optimizer state (weights only)")
    entries = saved_entries(checkpoint.manifest)
    full = to_full_state_dict(checkpoint.source(optimizer), checkpoint.manifest.get("aliases"), optimizer)
    fill_from_shards(meta, full["params"], entries["module"] or "state_dict")
    keys = optimizer_keys(entries)
    if optimizer and keys:
        states = [torch_optimizer_state(part) for part in split_optimizers(full["optimizer"],
                                                                           checkpoint.manifest.get("optimizer_groups"))]
        if keys == [TRAINER_ENTRIES["optimizer"]]:
            meta[keys[0]] = states
        else:  # Fabric: one entry per optimizer, under the user's keys
            meta.update(zip(keys, states))
    else:
        for key in keys:
            meta.pop(key, None)
        if entries == TRAINER_ENTRIES:
            meta.pop("lr_schedulers", None)
    return meta


# [Note: Lightning's loaders read sharded checkpoints]
# ``LitModel.load_from_checkpoint(path)`` and every strategy built on ``TorchCheckpointIO`` (``ddp``, and
# ``Trainer.validate/test(ckpt_path=...)`` under it) read a checkpoint with Lightning's ``pl_load``, a
# ``torch.load`` of one file, which fails on a directory with ``IsADirectoryError``. ``import lightning_zero``
# wraps the two module-level ``pl_load`` names those call: a committed sharded directory is consolidated in
# the calling process (whole fp32 tensors on the CPU, every file's size and CRC checked first), anything
# else goes to Lightning's loader unchanged. ``load_from_checkpoint`` gets the weights only;
# ``TorchCheckpointIO`` also gets the optimizer state in torch's format, so plain ``ddp`` resumes a ZeRO run.
def _sharded_aware(load: Callable[..., Any], optimizer: bool) -> Callable[..., Any]:
    def pl_load(path_or_url: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        if isinstance(path_or_url, (str, os.PathLike)) and is_sharded_checkpoint(path_or_url):
            loaded = consolidate_checkpoint(path_or_url, optimizer=optimizer and ShardedCheckpoint(
                path_or_url).has_optimizer, weights_only=bool(weights_only))
            if isinstance(map_location, (str, torch.device)):  # the device form; tensors are on the CPU
                loaded = apply_to_collection(loaded, torch.Tensor, lambda t: t.to(map_location))
            return loaded
        return load(path_or_url, map_location=map_location, weights_only=weights_only)

    pl_load.lightning_zero = True  # type: ignore[attr-defined]
    return pl_load


def install_loaders() -> None:
    """Let Lightning's own checkpoint loaders read sharded directories (see the note above); idempotent."""
    import lightning.fabric.plugins.io.torch_io as torch_io
    import lightning.pytorch.core.saving as saving

    for module, optimizer in ((saving, False), (torch_io, True)):
        if not getattr(module.pl_load, "lightning_zero", False):
            module.pl_load = _sharded_aware(module.pl_load, optimizer)


def save_file_atomically(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename over it: never half-written."""
    path = os.fspath(path)
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        _write_durably(temporary, lambda f: torch.save(obj, f))
        if os.path.isdir(path) and is_sharded_checkpoint(path):
            aside = f"{path}.replaced-{uuid.uuid4().hex[:12]}"
            os.replace(path, aside)
            os.replace(temporary, path)
            shutil.rmtree(aside)
        else:
            os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
