"""The layout alone: pure bookkeeping, no processes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_zero import ByModule, BySize, DtypeSlots
from lightning_zero.sharding.layout import plan_layout


def _named(*shapes: tuple[int, ...], dtype: torch.dtype = torch.float32) -> list[tuple[str, nn.Parameter]]:
    return [(f"p{i}", nn.Parameter(torch.zeros(shape, dtype=dtype))) for i, shape in enumerate(shapes)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_every_element_owned_exactly_once(world_size: int) -> None:
    named = _named((3,), (4, 5), (1,), (7, 3), (2, 2, 2))
    layout = plan_layout(named, world_size, BySize(30))
    seen = {record.index: torch.zeros(record.numel, dtype=torch.int64) for record in layout.params}
    for bucket in layout.buckets:
        assert bucket.padded_numel == bucket.shard_numel * world_size
        assert bucket.numel <= bucket.padded_numel < bucket.numel + world_size or bucket.numel < world_size
        for rank in range(world_size):
            lo, hi = bucket.shard_range(rank)
            for piece in layout.shard_slices(bucket, rank):
                record = layout.params[piece.param]
                assert lo <= record.offset + piece.start and record.offset + piece.start + piece.numel <= hi
                assert piece.shard_offset == record.offset + piece.start - lo
                seen[piece.param][piece.start : piece.start + piece.numel] += 1
    for counts in seen.values():
        assert torch.equal(counts, torch.ones_like(counts))


def test_worked_example_from_the_docstring() -> None:
    layout = plan_layout(_named((3,), (4,)), 2, ByModule(()))
    (bucket,) = layout.buckets
    assert (bucket.numel, bucket.padded_numel, bucket.shard_numel) == (7, 8, 4)
    assert [(s.param, s.start, s.numel, s.shard_offset) for s in layout.shard_slices(bucket, 0)] == [
        (0, 0, 3, 0), (1, 0, 1, 3)]
    assert [(s.param, s.start, s.numel, s.shard_offset) for s in layout.shard_slices(bucket, 1)] == [(1, 1, 3, 0)]


def test_by_size_caps_buckets_and_follows_backward_order() -> None:
    named = _named((10,), (10,), (25,), (5,), (5,))
    layout = plan_layout(named, 2, BySize(20))
    sizes = [b.numel for b in layout.buckets]
    assert all(size <= 20 for size in sizes if size != 25) and 25 in sizes
    # reverse registration: the last parameters land in the first bucket
    assert layout.buckets[0].params == (4, 3)
    assert [i for b in layout.buckets for i in b.params] == [4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="positive"):
        BySize(0)


def test_keys_never_mix_groups_dtypes_or_trainability() -> None:
    named = _named((4,), (4,), (4,), (4,))
    named[1][1].requires_grad_(False)
    named.append(("half", nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))))
    group_of = {named[0][1]: 0, named[1][1]: 0, named[2][1]: 1, named[4][1]: 0}
    layout = plan_layout(named, 2, BySize(1000), group_of)
    keys = {b.key: b.params for b in layout.buckets}
    assert len(keys) == len(layout.buckets) == 5  # p3 is in no group: its own key
    for bucket in layout.buckets:
        members = [named[i][1] for i in bucket.params]
        assert len({(p.dtype, p.requires_grad, group_of.get(p)) for p in members}) == 1
    trainable = [b for b in layout.buckets if b.trainable]
    assert sorted(i for b in trainable for i in b.params) == [0, 2, 4]


def test_dtype_slots_apply_to_trainable_float_buckets() -> None:
    named = _named((4,), (4,))
    named[1][1].requires_grad_(False)
    mixed = DtypeSlots(torch.bfloat16, torch.float32, torch.float32, torch.float32)
    layout = plan_layout(named, 2, BySize(100), {named[0][1]: 0}, mixed)
    by_param = {b.params[0]: b.dtypes for b in layout.buckets}
    assert by_param[0] == mixed and by_param[0].separate_master
    assert by_param[1] == DtypeSlots.uniform(torch.float32) and not by_param[1].separate_master


def test_by_module_groups_by_longest_unit_in_forward_order() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 2))
    layout = plan_layout(list(model.named_parameters()), 2, ByModule(("1", "1.1", "0")))
    units = [(b.unit, [layout.params[i].fqn for i in b.params]) for b in layout.buckets]
    assert units == [
        ("0", ["0.weight", "0.bias"]),
        ("1", ["1.0.weight", "1.0.bias"]),
        ("1.1", ["1.1.weight", "1.1.bias"]),
        ("", ["2.weight", "2.bias"]),
    ]


def test_tied_weights_keep_their_aliases() -> None:
    embed = nn.Embedding(5, 3)
    model = nn.ModuleDict({"embed": embed, "out": nn.Linear(3, 5, bias=False)})
    model["out"].weight = embed.weight
    named = list(model.named_parameters())
    assert len(named) == 1
    layout = plan_layout(named, 2, BySize(100), aliases={"embed.weight": ["out.weight"]})
    assert layout.param("out.weight") is layout.param("embed.weight")
    assert layout.params[0].aliases == ("out.weight",)


def test_fingerprint_tells_models_apart() -> None:
    a = plan_layout(_named((3,), (4,)), 2, BySize(100))
    b = plan_layout(_named((3,), (4,)), 2, BySize(100))
    c = plan_layout(_named((3,), (5,)), 2, BySize(100))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
