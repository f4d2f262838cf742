"""A typed layer over Apache DataSketches quantile sketches.

The only importer of ``datasketches`` in the project; never imports ``streamagg``.
"""

from .errors import CorruptSketchError, SketchError, SketchKindError, SketchKindMismatch
from .quantiles import Kind, Sketch, percentile_cont, sniff_kind

__all__ = [
    "CorruptSketchError",
    "Kind",
    "Sketch",
    "SketchError",
    "SketchKindError",
    "SketchKindMismatch",
    "percentile_cont",
    "sniff_kind",
]
