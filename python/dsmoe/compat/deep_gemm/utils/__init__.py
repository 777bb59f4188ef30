"""``deep_gemm.utils``: quantization helpers (``math``) and scale-factor layout helpers (``layout``)."""
from . import layout, math  # noqa: F401
from .layout import *  # noqa: F401,F403
from .math import *  # noqa: F401,F403

__all__ = [*math.__all__, *layout.__all__]
