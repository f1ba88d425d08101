"""Sharded model state: each rank's own slices, keyed by parameter name and element range, so a set of
them can be consolidated into one whole state dict without ``torch.distributed`` and reloaded on any
world size or stage. The groundwork for sharded checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lightning_zero.sharding.engine import ZeroEngine

__all__ = ["FORMAT", "consolidate", "local_state_dict"]

FORMAT = "lightning_zero.local_state/1"


def local_state_dict(engine: ZeroEngine) -> dict[str, Any]:
    """This rank's part of the state, on CPU, with no collective: every slice of a flattened parameter it
    owns (at master precision) with that slice's optimizer state, and, on the group's first rank, the
    parameters that are not sharded."""
    pieces = []
    optimizer = engine.optimizer
    states = {id(master): optimizer.optimizer.state.get(master, {}) for entries in optimizer.entries.values()
              for _, master, _ in entries}
    masters = {(bucket, piece.param): master for bucket, entries in optimizer.entries.items()
               for piece, master, _ in entries}
    for bucket in engine.layout.buckets:
        if not engine._is_flat(bucket):
            continue
        source = engine.masters.get(bucket.index)
        if source is None:
            source = engine.param_shards[bucket.index]
        for piece in engine.layout.shard_slices(bucket, engine.rank):
            record = engine.layout.params[piece.param]
            master = masters.get((bucket.index, piece.param))
            state = states.get(id(master), {}) if master is not None else {}
            pieces.append({
                "fqn": record.fqn,
                "start": piece.start,
                "numel": piece.numel,
                "param": source.narrow(0, piece.shard_offset, piece.numel).to("cpu", copy=True),
                "optimizer": {key: value.to("cpu", copy=True) if torch.is_tensor(value) else value
                              for key, value in state.items()},
            })
    whole = {}
    if engine.rank == 0:
        for bucket in engine.layout.buckets:
            if not engine._is_flat(bucket):
                for index in bucket.params:
                    whole[engine.layout.params[index].fqn] = engine.params[index].detach().to("cpu", copy=True)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(names)}
              for g, names in zip(optimizer.optimizer.param_groups, optimizer.param_fqns)]
    return {
        "format": FORMAT,
        "rank": engine.rank,
        "world_size": engine.world_size,
        "stage": engine.config.stage,
        "shapes": {r.fqn: tuple(r.shape) for r in engine.layout.params},
        "aliases": {r.fqn: list(r.aliases) for r in engine.layout.params if r.aliases},
        "pieces": pieces,
        "whole": whole,
        "param_groups": groups,
    }


def consolidate(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One whole state dict (the ``ZeroEngine.full_state_dict()`` format) from every rank's
    ``local_state_dict()``, in one process, without ``torch.distributed``."""
    if not states or any(s.get("format") != FORMAT for s in states):
        raise ValueError(f"expected a list of {FORMAT} dicts, one per rank")
    world = states[0]["world_size"]
    ranks = sorted(s["rank"] for s in states)
    if ranks != list(range(world)):
        raise ValueError(f"need the state of every rank 0..{world - 1}, got ranks {ranks}")
    shapes = {fqn: torch.Size(shape) for fqn, shape in states[0]["shapes"].items()}
    params: dict[str, torch.Tensor] = {}
    optimizer_state: dict[str, dict[str, Any]] = {}
    filled: dict[str, int] = {}
    for state in states:
        params.update(state["whole"])
        for piece in state["pieces"]:
            fqn, start, numel = piece["fqn"], piece["start"], piece["numel"]
            flat = params.setdefault(fqn, torch.empty(shapes[fqn], dtype=piece["param"].dtype)).view(-1)
            flat.narrow(0, start, numel).copy_(piece["param"])
            filled[fqn] = filled.get(fqn, 0) + numel
            for key, value in piece["optimizer"].items():
                slot = optimizer_state.setdefault(fqn, {})
                if torch.is_tensor(value) and value.dim() > 0:
                    whole = slot.setdefault(key, torch.zeros(shapes[fqn], dtype=value.dtype)).view(-1)
                    whole.narrow(0, start, numel).copy_(value)
                else:
                    slot[key] = value
    incomplete = [fqn for fqn, count in filled.items() if count != shapes[fqn].numel()]
    missing = [fqn for fqn in shapes if fqn not in params]
    if incomplete or missing:
        raise ValueError(f"the rank states do not cover every parameter: incomplete {incomplete[:3]}, "
                         f"missing {missing[:3]}")
    for fqn, aliases in states[0]["aliases"].items():
        for alias in aliases:
            params[alias] = params[fqn]
    return {"params": params, "optimizer": {"state": optimizer_state, "param_groups": states[0]["param_groups"]}}
