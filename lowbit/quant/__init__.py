"""Quantization: pure tensor quantizers, the packed `QuantLinear` layer, and the model-level driver.

Layering: ``packing``/``qweight`` → ``config`` (``QuantConfig`` + the quantizer registry) → one file per algorithm
(``rtn``, ``gptq``, ``magr``, ``nf``; each registers itself) → ``qlinear`` → ``arch``/``calibrate`` (architecture
table, calibration-pass mechanics) → ``model`` (``quantize_model``), ``serialization`` (save/load) and ``export``
(GPTQ checkpoint layout). Nothing here imports transformers at import time, nor anything above ``lowbit.quant``.
"""

# Importing the algorithm files below registers the built-in quantizers.
from .config import QUANTIZERS, QuantConfig, register_quantizer
from .gptq import gptq_quantize, output_error
from .magr import magr
from .model import dequantize_model, quantize_linear, quantize_model, quantized_modules
from .nf import nf_quantize
from .packing import pack, unpack
from .qlinear import QuantLinear
from .qweight import QuantizedWeight
from .rtn import rtn_quantize
from .serialization import holds_packed_weights, load_quantized, read_quant_meta, save_quantized, verify_quantized

__all__ = [
    "QuantizedWeight", "QuantLinear", "QuantConfig", "QUANTIZERS", "register_quantizer", "quantize_model",
    "quantize_linear", "quantized_modules", "dequantize_model", "save_quantized", "load_quantized",
    "read_quant_meta", "verify_quantized", "holds_packed_weights", "rtn_quantize", "gptq_quantize", "magr",
    "nf_quantize", "pack", "unpack", "output_error",
]
