"""lightning-zero: ZeRO for PyTorch Lightning on plain torch.distributed.

Importing the package registers the strategy names ("zero1", "zero2", "zero3", "zero2_spawn", "zero2_offload", ...) with
Lightning's and Fabric's strategy registries, so ``Trainer(strategy="zero2")`` and ``Fabric(strategy="zero2")``
work after ``import lightning_zero``, and
lets Lightning's checkpoint loaders (``LitModel.load_from_checkpoint``, plain ``ddp``) read sharded checkpoints.
"""

from lightning.fabric.strategies import STRATEGY_REGISTRY as FABRIC_STRATEGY_REGISTRY
from lightning.pytorch.strategies import StrategyRegistry

from lightning_zero.checkpoint import (
    CheckpointError,
    ShardedCheckpoint,
    consolidate_checkpoint,
    install_loaders,
    is_sharded_checkpoint,
)
from lightning_zero.config import PrecisionPolicy, ZeroConfig
from lightning_zero.fabric import ZeroFabricPrecision, ZeroFabricStrategy
from lightning_zero.loss_scaler import DynamicLossScaler, LossScaleAtMinimumError
from lightning_zero.memory import HostBytes, ModelStateBytes, model_state_bytes
from lightning_zero.precision import ZeroPrecision
from lightning_zero.report import MemoryEstimate, ZeroMeasurement, ZeroReport, estimate_memory
from lightning_zero.sharding import ByModule, BySize, DtypeSlots, ZeroEngine, check_elementwise, needs_whole_params
from lightning_zero.strategy import ZeroStrategy

__version__ = "0.1.0"

if "zero2" not in StrategyRegistry:
    ZeroStrategy.register_strategies(StrategyRegistry)
if "zero2" not in FABRIC_STRATEGY_REGISTRY:  # Fabric(strategy="zero2"): the same names, options and engine
    ZeroFabricStrategy.register_strategies(FABRIC_STRATEGY_REGISTRY)
install_loaders()  # LitModel.load_from_checkpoint(sharded_dir) and plain ddp read sharded checkpoints

__all__ = [
    "ByModule",
    "BySize",
    "CheckpointError",
    "DtypeSlots",
    "DynamicLossScaler",
    "HostBytes",
    "LossScaleAtMinimumError",
    "MemoryEstimate",
    "ModelStateBytes",
    "PrecisionPolicy",
    "ShardedCheckpoint",
    "ZeroConfig",
    "ZeroEngine",
    "ZeroFabricPrecision",
    "ZeroFabricStrategy",
    "ZeroMeasurement",
    "ZeroPrecision",
    "ZeroReport",
    "ZeroStrategy",
    "check_elementwise",
    "needs_whole_params",
    "consolidate_checkpoint",
    "estimate_memory",
    "is_sharded_checkpoint",
    "model_state_bytes",
]
