"""MXFP4Config: what a user asks for and what config.json records, validated.

This file holds the configuration and nothing else: no module replacement, no
tensor math, no registration (quantizer.py registers it with transformers).
Every field here is written to ``config.json`` under ``quantization_config``
and read back from it, so a checkpoint says how it was made.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from qwantize_hf.constants import BITS_PER_WEIGHT, BLOCK_SIZES, DEFAULT_BLOCK_SIZE, DEFAULT_SCALE_METHOD, SCALE_METHODS

logger = logging.getLogger(__name__)

QUANT_METHOD = "qwantize_mxfp4"  # the built-in "mxfp4" belongs to GPT-OSS
# Version of the on-disk layout: `<module>.weight` uint8 [N, K/2] (element 2i in
# the low nibble), `<module>.weight_scale` uint8 [N, K/block_size] (UE8M0),
# `<module>.bias` unchanged. Bump it whenever that layout changes meaning.
FORMAT_VERSION = 1


class MXFP4Config(QuantizationConfigMixin):
    """Quantize every eligible ``nn.Linear`` to MXFP4 (4-bit E2M1 codes, one UE8M0 scale per block).

    Args:
        block_size: elements per scale along the input dimension, 32 (4.25 bits/weight) or 16 (4.5).
        scale_method: ``"mse"`` (least squared error, default), ``"naive"`` (OCP MX) or ``"even"``.
        modules_to_not_convert: module names (or dotted suffixes of them) to keep unquantized;
            ``None`` means ``lm_head`` plus the model's ``_keep_in_fp32_modules``.
        dequantize: at load time, turn a quantized checkpoint back into a plain model of
            ``nn.Linear`` layers holding ``dequantize(quantize(W))``.
        base_model: the Hub id the weights were quantized from (filled in on load when known).
        calibration: reserved for activation-weighted scale search; ``None`` for now.
        format_version: the checkpoint layout version; a checkpoint from a newer layout is refused.
    """

    def __init__(
        self,
        block_size: int = DEFAULT_BLOCK_SIZE,
        scale_method: str = DEFAULT_SCALE_METHOD,
        modules_to_not_convert: list[str] | None = None,
        dequantize: bool = False,
        base_model: str | None = None,
        calibration: dict[str, Any] | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(
                f"MXFP4Config is for quant_method {QUANT_METHOD!r}, got {quant_method!r}; "
                "load that checkpoint with the quantization config of its own method"
            )
        if kwargs:
            # A newer qwantize_hf may write fields this version does not know. They
            # cannot change the bytes (format_version guards that), so they are dropped.
            logger.warning("MXFP4Config: ignoring unknown fields %s (written by a newer qwantize_hf?)", sorted(kwargs))
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.block_size = block_size
        self.scale_method = scale_method
        if isinstance(modules_to_not_convert, str):
            raise TypeError(
                f"modules_to_not_convert must be a list of module names, got the string {modules_to_not_convert!r}; "
                f"write [{modules_to_not_convert!r}]"
            )
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        self.dequantize = dequantize
        self.base_model = base_model
        self.calibration = calibration
        self.post_init()

    def post_init(self) -> None:
        """Raise ValueError/TypeError naming the bad field and the accepted values."""
        if not isinstance(self.format_version, int) or isinstance(self.format_version, bool):
            raise TypeError(f"format_version must be an int, got {self.format_version!r}")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint uses qwantize_mxfp4 format_version {self.format_version}, but this "
                f"qwantize_hf reads up to {FORMAT_VERSION}; upgrade qwantize_hf (pip install -U qwantize_hf)"
            )
        if self.format_version < 1:
            raise ValueError(f"format_version must be >= 1, got {self.format_version}")
        if isinstance(self.block_size, bool) or self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size!r}")
        if self.scale_method not in SCALE_METHODS:
            raise ValueError(f"scale_method must be one of {SCALE_METHODS}, got {self.scale_method!r}")
        if self.modules_to_not_convert is not None and not all(
            isinstance(name, str) and name for name in self.modules_to_not_convert
        ):
            raise TypeError(
                "modules_to_not_convert must be a list of module names such as ['lm_head'], "
                f"got {self.modules_to_not_convert!r}"
            )
        if not isinstance(self.dequantize, bool):
            raise TypeError(f"dequantize must be True or False, got {self.dequantize!r}")
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise TypeError(f"base_model must be a Hub id string or None, got {self.base_model!r}")
        if self.calibration is not None and not isinstance(self.calibration, dict):
            raise TypeError(f"calibration must be a dict or None, got {type(self.calibration).__name__}")

    @property
    def bits_per_weight(self) -> float:
        """4 bits of code plus one 8-bit scale per block: 4.25 for block 32, 4.5 for block 16."""
        return BITS_PER_WEIGHT[self.block_size]

    def get_loading_attributes(self) -> dict[str, Any]:
        """Fields a user may change when loading an already quantized checkpoint."""
        return {"dequantize": self.dequantize}

    def to_dict(self) -> dict[str, Any]:
        config = super().to_dict()
        # `dequantize` is a request for this load, not a property of the stored bytes.
        config.pop("dequantize", None)
        return config
