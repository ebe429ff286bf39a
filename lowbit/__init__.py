"""lowbit: quantize LLaMA-class models to packed low-bit layers and fine-tune adapters on the frozen base.

Importing ``lowbit`` is cheap: no transformers import and no CUDA initialisation; subpackages load what they need.
"""

__version__ = "0.1.0"
