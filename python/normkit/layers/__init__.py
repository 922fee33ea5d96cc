"""The stateful layers, one family per file."""
from .base import NormLayer
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .extended import ExtendedBatchNorm2d
from .frozen import FrozenBatchNorm2d
from .ghost import GhostBatchNorm2d
from .groupnorm import GroupNorm
from .instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layernorm import LayerNorm, RMSNorm
from .modality import ModalityBatchNorm2d
from .renorm import BatchRenorm2d, renorm_schedule

__all__ = ["NormLayer", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d",
           "InstanceNorm2d", "InstanceNorm3d", "GroupNorm", "LayerNorm", "RMSNorm",
           "ExtendedBatchNorm2d", "ModalityBatchNorm2d", "GhostBatchNorm2d", "BatchRenorm2d",
           "FrozenBatchNorm2d", "renorm_schedule"]
