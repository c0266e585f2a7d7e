"""qwantize_hf: MXFP4 weights with optimal block scales for Hugging Face Transformers."""

from qwantize_hf.ops import dequantize_mxfp4, quantize_mxfp4

__version__ = "0.1.0"

__all__ = ["__version__", "dequantize_mxfp4", "quantize_mxfp4"]
