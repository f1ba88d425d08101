"""The sharding engine: layout, collectives, gradient reduction and the sharded optimizer.
Knows nothing of Lightning and runs on plain ``torch.distributed``."""

from lightning_zero.sharding.engine import ZeroEngine
from lightning_zero.sharding.layout import ByModule, BySize, DtypeSlots, Layout, plan_layout
from lightning_zero.sharding.optimizer import ELEMENTWISE_OPTIMIZERS, ShardedOptimizer, check_elementwise

__all__ = [
    "ELEMENTWISE_OPTIMIZERS",
    "ByModule",
    "BySize",
    "DtypeSlots",
    "Layout",
    "ShardedOptimizer",
    "ZeroEngine",
    "check_elementwise",
    "plan_layout",
]
