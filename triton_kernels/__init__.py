"""Triton kernels of ampclip (installed as ``ampclip.triton_kernels``): the fused norm pass with its
deterministic finalize, and the scale pass, over any number of tensors in one launch per dtype.

Kernels sit below the op layer: nothing here imports the ampclip Python package.
"""

from .fused_norm import fused_norm_triton
from .fused_scale import fused_scale_triton
from .tensor_table import CHUNK, tensor_table

__all__ = ["CHUNK", "fused_norm_triton", "fused_scale_triton", "tensor_table"]
