"""The sharding engine: layout, collectives, gradient reduction and the sharded optimizer.
Knows nothing of Lightning and runs on plain ``torch.distributed``."""

from lightning_zero.sharding.bucket import FlatBucket, GradState, ParamState
from lightning_zero.sharding.collectives import Comm
from lightning_zero.sharding.engine import ZeroEngine
from lightning_zero.sharding.layout import ByModule, BySize, DtypeSlots, Layout, plan_layout
from lightning_zero.sharding.optimizer import (
    ELEMENTWISE_OPTIMIZERS,
    ShardedOptimizer,
    check_elementwise,
    needs_whole_params,
)

__all__ = [
    "ELEMENTWISE_OPTIMIZERS",
    "ByModule",
    "BySize",
    "Comm",
    "DtypeSlots",
    "FlatBucket",
    "GradState",
    "Layout",
    "ParamState",
    "ShardedOptimizer",
    "ZeroEngine",
    "check_elementwise",
    "needs_whole_params",
    "plan_layout",
]
