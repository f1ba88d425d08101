"""Sharded model state: each rank's own slices, keyed by parameter name and element range, so a set of
them can be consolidated into one whole state dict without ``torch.distributed`` and reloaded on any
world size or stage.

Loading goes through a *source*: anything that answers "elements [start, start + numel) of parameter
``fqn``, and the optimizer state of those elements". A whole state dict is one source (``FullSource``);
the saved slices of some other world size are another (``PieceSource``, which stitches the overlapping
slices together). The engine asks every source the same questions, so restoring from a whole dict, from
a sharded checkpoint of any world size, or consolidating one, is one code path.

Worked example: saved on 2 ranks, parameter ``w`` of 6 elements split as rank 0 [0, 4), rank 1 [4, 6);
loading on 3 ranks, rank 1 owns [2, 4) of ``w`` and reads it from saved rank 0 alone, rank 2 owns [4, 6)
and reads saved rank 1 alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = [
    "FORMAT",
    "FullSource",
    "Piece",
    "PieceSource",
    "StateSource",
    "consolidate",
    "to_full_state_dict",
]

FORMAT = "lightning_zero.local_state/1"


def _is_vector(value: Any) -> bool:
    """Element-wise optimizer state (sliced with its parameter) as opposed to a scalar such as ``step``."""
    return torch.is_tensor(value) and value.dim() > 0


class StateSource(Protocol):
    """Saved parameters and optimizer state, readable by element range of each flattened parameter."""

    shapes: Mapping[str, torch.Size]
    param_groups: list[dict[str, Any]] | None

    def param(self, fqn: str, start: int, numel: int) -> torch.Tensor:
        """Elements ``[start, start + numel)`` of the flattened parameter ``fqn`` (1-D, CPU)."""
        ...

    def optimizer_state(self, fqn: str, start: int, numel: int) -> dict[str, Any]:
        """The optimizer state of those elements: element-wise tensors sliced, scalars as saved; {} if none."""
        ...


class FullSource:
    """A ``ZeroEngine.full_state_dict()``-format dict (whole tensors keyed by FQN) as a source."""

    def __init__(self, state: Mapping[str, Any], shapes: Mapping[str, torch.Size] | None = None) -> None:
        """``shapes``: the parameters' shapes where ``state`` holds optimizer state only."""
        self.params: Mapping[str, torch.Tensor] = state.get("params", {})
        self.shapes = dict(shapes) if shapes is not None else {fqn: value.shape for fqn, value in self.params.items()}
        optimizer = state.get("optimizer") or {}
        self.optimizer: Mapping[str, Mapping[str, Any]] = optimizer.get("state", {})
        self.param_groups = optimizer.get("param_groups")

    def param(self, fqn: str, start: int, numel: int) -> torch.Tensor:
        return self.params[fqn].reshape(-1).narrow(0, start, numel)

    def optimizer_state(self, fqn: str, start: int, numel: int) -> dict[str, Any]:
        values = self.optimizer.get(fqn) or {}
        if start == 0 and numel == self.shapes[fqn].numel():  # the whole parameter: every value as saved
            return dict(values)
        return {key: _slice(value, fqn, key, numel_of=self.shapes[fqn].numel(), at=start, count=numel)
                if _is_vector(value) else value for key, value in values.items()}


@dataclass(frozen=True)
class Piece:
    """One saved slice: elements ``[start, start + numel)`` of a flattened parameter; ``read()`` returns
    ``{"param": 1-D tensor, "optimizer": {key: tensor or scalar}}`` (from memory or a file)."""

    start: int
    numel: int
    read: Callable[[], Mapping[str, Any]]


class PieceSource:
    """Slices saved on some world size, stitched into whatever ranges the loading rank owns."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], pieces: Mapping[str, list[Piece]],
                 param_groups: list[dict[str, Any]] | None, origin: str = "the saved state") -> None:
        self.shapes = {fqn: torch.Size(shape) for fqn, shape in shapes.items()}
        self.pieces = {fqn: sorted(found, key=lambda p: p.start) for fqn, found in pieces.items()}
        self.param_groups = param_groups
        self.origin = origin
        for fqn, shape in self.shapes.items():
            covered = 0
            for piece in self.pieces.get(fqn, []):
                if piece.start != covered:
                    break
                covered += piece.numel
            if covered != shape.numel():
                raise ValueError(f"{origin} does not cover parameter {fqn!r}: elements from {covered} of "
                                 f"{shape.numel()} are in no saved slice")

    def _overlaps(self, fqn: str, start: int, numel: int) -> list[tuple[Mapping[str, Any], int, int, int]]:
        """(saved piece, offset in it, offset in the request, count) for each piece overlapping the range."""
        found = []
        for piece in self.pieces[fqn]:
            lo, hi = max(start, piece.start), min(start + numel, piece.start + piece.numel)
            if lo < hi:
                found.append((piece.read(), lo - piece.start, lo - start, hi - lo))
        return found

    def param(self, fqn: str, start: int, numel: int) -> torch.Tensor:
        parts = self._overlaps(fqn, start, numel)
        out = torch.empty(numel, dtype=parts[0][0]["param"].dtype)
        for saved, at, to, count in parts:
            out.narrow(0, to, count).copy_(saved["param"].narrow(0, at, count))
        return out

    def optimizer_state(self, fqn: str, start: int, numel: int) -> dict[str, Any]:
        overlaps = self._overlaps(fqn, start, numel)
        if len(overlaps) == 1 and overlaps[0][1:] == (0, 0, numel):
            saved = overlaps[0][0]
            if _piece_numel(saved) == numel:  # exactly one saved piece: every value as saved
                return dict(saved["optimizer"])
        state: dict[str, Any] = {}
        for saved, at, to, count in overlaps:
            for key, value in saved["optimizer"].items():
                if _is_vector(value):
                    part = _slice(value, fqn, key, numel_of=_piece_numel(saved), at=at, count=count)
                    state.setdefault(key, torch.empty(numel, dtype=value.dtype)).narrow(0, to, count).copy_(part)
                else:
                    state.setdefault(key, value)
        return state


def _piece_numel(saved: Mapping[str, Any]) -> int:
    return saved["param"].numel()


def _slice(value: torch.Tensor, fqn: str, key: str, numel_of: int, at: int, count: int) -> torch.Tensor:
    """Elements ``[at, at + count)`` of an element-wise state value saved for ``numel_of`` elements."""
    if value.numel() != numel_of:
        raise ValueError(
            f"optimizer state {key!r} of {fqn!r} (shape {tuple(value.shape)}) is not element-wise, so it "
            "cannot be cut into the slices of another layout: load it with an optimizer of the same kind, "
            "which gives every rank whole parameters (see [Note: whole parameters])"
        )
    return value.reshape(-1).narrow(0, at, count)


def pieces_of(state: Mapping[str, Any], read: Callable[[str, int | str], Mapping[str, Any]] | None = None,
              ) -> dict[str, list[Piece]]:
    """The ``Piece``s one ``ZeroEngine.local_state_dict()`` holds, keyed by FQN. ``read(fqn, position)`` fetches a
    piece lazily (position: index in ``pieces``, or "whole"); by default from ``state`` itself."""
    def reader(fqn: str, position: int | str) -> Callable[[], Mapping[str, Any]]:
        if read is not None:
            return lambda: read(fqn, position)
        if position == "whole":
            return lambda: {"param": state["whole"][fqn].reshape(-1), "optimizer": {}}
        return lambda: state["pieces"][position]

    found: dict[str, list[Piece]] = {}
    for position, piece in enumerate(state["pieces"]):
        found.setdefault(piece["fqn"], []).append(Piece(piece["start"], piece["numel"],
                                                        reader(piece["fqn"], position)))
    for fqn, value in state["whole"].items():
        found.setdefault(fqn, []).append(Piece(0, value.numel(), reader(fqn, "whole")))
    return found


def to_full_state_dict(source: StateSource, aliases: Mapping[str, Sequence[str]] | None = None,
                       optimizer: bool = True) -> dict[str, Any]:
    """The whole state (``ZeroEngine.full_state_dict()`` format) a source holds, on CPU."""
    params: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for fqn, shape in source.shapes.items():
        params[fqn] = source.param(fqn, 0, shape.numel()).reshape(shape).clone()
        if optimizer:
            values = source.optimizer_state(fqn, 0, shape.numel())
            if values:
                state[fqn] = {key: value.reshape(shape) if _is_vector(value) and value.numel() == shape.numel()
                              else value for key, value in values.items()}
    for fqn, names in (aliases or {}).items():
        for alias in names:
            params[alias] = params[fqn]
    full: dict[str, Any] = {"params": params}
    if optimizer:
        full["optimizer"] = {"state": state, "param_groups": source.param_groups}
    return full


def consolidate(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One whole state dict (the ``ZeroEngine.full_state_dict()`` format) from every rank's
    ``ZeroEngine.local_state_dict()``, in one process, without ``torch.distributed``."""
    if not states or any(s.get("format") != FORMAT for s in states):
        raise ValueError(f"expected a list of {FORMAT} dicts, one per rank")
    world = states[0]["world_size"]
    ranks = sorted(s["rank"] for s in states)
    if ranks != list(range(world)):
        raise ValueError(f"need the state of every rank 0..{world - 1}, got ranks {ranks}")
    pieces: dict[str, list[Piece]] = {}
    for state in states:
        for fqn, found in pieces_of(state).items():
            pieces.setdefault(fqn, []).extend(found)
    source = PieceSource(states[0]["shapes"], pieces, states[0]["param_groups"], "the rank states")
    return to_full_state_dict(source, states[0]["aliases"], optimizer=states[0]["param_groups"] is not None)
