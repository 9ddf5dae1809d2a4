"""Low-memory optimizers whose step is fused into the backward: LoMo and AdaLomo."""

from .lomo import AdaLomo, GradientPeak, LoMo

__all__ = ["LoMo", "AdaLomo", "GradientPeak"]
