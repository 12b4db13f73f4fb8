"""Triton kernels of ampclip (installed as ``ampclip.triton_kernels``): the fused norm pass with its
deterministic finalize, and the scale pass, over any list of gradients in one launch per kernel (three for
the norm pass, one for the scale pass), whatever the number of tensors or dtypes.

Kernels sit below the op layer: nothing here imports the ampclip Python package.
"""

from .fused_norm import fused_norm_triton
from .fused_scale import fused_scale_triton
from .tensor_table import CHUNK, cache_info, clear_cache, tensor_table

__all__ = ["CHUNK", "cache_info", "clear_cache", "fused_norm_triton", "fused_scale_triton", "tensor_table"]
