"""qwantize_hf: MXFP4 weights with optimal block scales for Hugging Face Transformers.

Importing this package registers quant_method "qwantize_mxfp4" with
transformers (safe to import or reload more than once).
"""

from qwantize_hf.config import PACKAGE_VERSION, MXFP4Config
from qwantize_hf.linear import MXFP4Linear
from qwantize_hf.ops import dequantize_mxfp4, quantize_mxfp4
from qwantize_hf.quantizer import register as _register

_register()

__version__ = PACKAGE_VERSION

__all__ = ["MXFP4Config", "MXFP4Linear", "__version__", "dequantize_mxfp4", "quantize_mxfp4"]
