"""lightning-zero: ZeRO stages 1-2 on plain torch.distributed, headed for a native Lightning strategy."""

from lightning_zero.config import ZeroConfig
from lightning_zero.memory import ModelStateBytes, model_state_bytes
from lightning_zero.sharding import ByModule, BySize, DtypeSlots, ZeroEngine, check_elementwise

__version__ = "0.1.0"

__all__ = [
    "ByModule",
    "BySize",
    "DtypeSlots",
    "ModelStateBytes",
    "ZeroConfig",
    "ZeroEngine",
    "check_elementwise",
    "model_state_bytes",
]
