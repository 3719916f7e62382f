"""What the pipeline raises and warns: exceptions for inputs and outputs it cannot use, warnings for the
fallbacks that keep a clip running (each with the option that turns it off or chooses for itself).

Warnings are :class:`RuntimeWarning` subclasses, so ``warnings.filterwarnings`` can single one out.
"""

from __future__ import annotations

__all__ = ["NonFiniteInputError", "NonFiniteOutputError", "PrecisionFallbackWarning", "TilingFallbackWarning",
           "CompileFallbackWarning", "SlowPrecisionWarning"]


class NonFiniteInputError(ValueError):
    """The input frame holds NaN or infinite values."""


class NonFiniteOutputError(RuntimeError):
    """A frame came out NaN/Inf even when recomputed in float32: the weights (or the noise) are broken."""


class PrecisionFallbackWarning(RuntimeWarning):
    """A half-precision frame produced NaN/Inf and was recomputed in float32."""


class TilingFallbackWarning(RuntimeWarning):
    """A frame ran out of GPU memory and was recomputed in tiles."""


class CompileFallbackWarning(RuntimeWarning):
    """``torch.compile`` failed for a part of the pipeline, which runs eagerly from then on (same numbers)."""


class SlowPrecisionWarning(RuntimeWarning):
    """float16 was asked for on the CPU, where torch's float16 convolutions are far slower than float32's."""
