"""The exceptions ampclip raises for gradients it cannot take, at every layer (Python checks and the compiled
entries alike).

torch raises ``RuntimeError`` where a gradient cannot be measured or written (an integer dtype in
``vector_norm``, an in-place write through an expanded tensor), so code written for torch catches
``RuntimeError``. ampclip's errors are that type too, and also the more precise built-in type, so both
``except RuntimeError`` and ``except TypeError`` / ``except ValueError`` catch them. Imports nothing: the
compiled extension looks these classes up when it raises.
"""

from __future__ import annotations

__all__ = ["GradientTypeError", "GradientValueError"]


class GradientTypeError(TypeError, RuntimeError):
    """A tensor of a kind ampclip does not take: a layout other than dense (sparse, nested), a dtype other than
    float16, bfloat16, float32 or float64, a non-tensor where a tensor belongs."""


class GradientValueError(ValueError, RuntimeError):
    """A tensor ampclip takes in general but not here: on another device than the call's, with elements that
    share memory where it is written in place, of the wrong size."""
