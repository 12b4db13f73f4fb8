"""ampclip: fused, sync-free gradient unscale, inf/NaN check, norm and clip for PyTorch mixed precision.

Drop-in replacements for ``torch.nn.utils.clip_grad_norm_`` and friends::

    import ampclip
    total_norm = ampclip.clip_grad_norm_(model.parameters(), max_norm=1.0)
"""

from . import ops, reference, strategies
from .adaptive import ZClip, adaptive_clip_grad_
from .clipper import ClipStats, FusedClipper
from .clipping import (
    RECOMMENDED_CLIPPING_THRESHOLDS,
    ClippingStrategy,
    GradientClipper,
    create_gradient_clipper,
    get_recommended_threshold,
)
from .config import AMPConfig, create_default_amp_config
from .functional import (
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    compute_gradient_norm,
    get_total_norm,
    is_patched,
    patch_torch,
    unpatch_torch,
)
from .metrics import MetricsLogger, TensorBoardSink
from .nan import NaNDetector, NaNRecoveryManager, NaNReport, SpikeDetector
from .ops import backend
from .overlap import Overlap
from .scaler import DynamicLossScaler
from .trainer import AMPTrainer, create_amp_trainer, run_training_epoch

__version__ = "0.1.0"

__all__ = [
    "AMPConfig",
    "AMPTrainer",
    "ClippingStrategy",
    "GradientClipper",
    "MetricsLogger",
    "RECOMMENDED_CLIPPING_THRESHOLDS",
    "TensorBoardSink",
    "ZClip",
    "adaptive_clip_grad_",
    "create_amp_trainer",
    "create_default_amp_config",
    "create_gradient_clipper",
    "get_recommended_threshold",
    "ClipStats",
    "DynamicLossScaler",
    "FusedClipper",
    "NaNDetector",
    "NaNRecoveryManager",
    "NaNReport",
    "Overlap",
    "SpikeDetector",
    "backend",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "compute_gradient_norm",
    "get_total_norm",
    "is_patched",
    "ops",
    "patch_torch",
    "reference",
    "run_training_epoch",
    "strategies",
    "unpatch_torch",
]
