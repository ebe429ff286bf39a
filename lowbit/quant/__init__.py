"""Quantizers (pure tensor functions), the packed `QuantLinear` layer, and the model-level driver.

Layering: ``packing``/``qweight`` → one file per algorithm (``rtn``, ``gptq``, ``magr``, ``nf``) → ``qlinear``
→ ``model`` (calibration loop, save/load) and ``export`` (GPTQ checkpoint layout). Lower layers never import
higher ones, and nothing here imports transformers at import time.
"""

from .gptq import gptq_quantize, output_error
from .magr import magr
from .nf import nf_quantize
from .packing import pack, unpack
from .qlinear import QuantLinear
from .qweight import QuantizedWeight
from .rtn import rtn_quantize

__all__ = [
    "QuantizedWeight", "QuantLinear", "rtn_quantize", "gptq_quantize", "magr", "nf_quantize", "pack", "unpack",
    "output_error",
]
