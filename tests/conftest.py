from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.dist_pool import RankPool

_POOLS: dict[int, RankPool] = {}


def _pool(world_size: int) -> RankPool:
    if world_size not in _POOLS:
        _POOLS[world_size] = RankPool(world_size)
    return _POOLS[world_size]


@pytest.fixture(scope="session")
def pools() -> Iterator[object]:
    """``pools(n)`` gives the shared pool of ``n`` gloo ranks (started on first use)."""
    yield _pool
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
