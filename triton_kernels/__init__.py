"""Triton kernels of ampclip (installed as ``ampclip.triton_kernels``): the fused norm pass with its
deterministic finalize, the scale pass, and the small ops (clip coefficient, loss-scale update, clip
statistics), over any list of gradients in one launch per kernel, whatever the number of tensors or dtypes.

Kernels sit below the op layer: nothing here imports the ampclip Python package. The launchers of the two
gradient passes take a tensor table, built and cached by their caller (``ampclip/backends/tensor_table.py``).
"""

from .fused_norm import fused_norm_triton
from .fused_scale import fused_scale_triton
from .small_ops import clip_finalize_triton, clip_stats_update_triton, scaler_update_triton

__all__ = ["clip_finalize_triton", "clip_stats_update_triton", "fused_norm_triton",
           "fused_scale_triton", "scaler_update_triton"]

# adaptive clipping: AGC's unit-wise passes and ZClip's step
from .unitwise import unit_clip_finalize_triton, unit_norm_triton, unit_scale_triton
from .zclip import zclip_update_triton

__all__ += ["unit_clip_finalize_triton", "unit_norm_triton", "unit_scale_triton", "zclip_update_triton"]
