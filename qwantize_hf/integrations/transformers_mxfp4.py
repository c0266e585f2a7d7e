"""Import transformers' own MXFP4 checkpoints (``quant_method "mxfp4"``: GPT-OSS) as qwantize_hf checkpoints.

GPT-OSS is published with its experts in MXFP4 and everything else in bf16. Its checkpoint holds, for
each experts module ``<m>`` and projection ``<p>`` (``gate_up_proj``, ``down_proj``),

    <m>.<p>_blocks  uint8 [E, N, K/32, 16]   E2M1 codes, element 2i in the low nibble
    <m>.<p>_scales  uint8 [E, N, K/32]       E8M0 bytes, value 2**(e - 127)
    <m>.<p>_bias    float [E, N]

with N the product's outputs and K its reduction (transformers' ``convert_moe_packed_tensors`` reads them
so, and transposes the result to the module's ``[E, K, N]``). That is our fused-experts layout byte for
byte: ``<m>.<p>`` uint8 ``[E, N, K/2]`` (the blocks' last two dimensions merged) and ``<m>.<p>_scale``.
Importing is a rename, a reshape and a config rewrite; no weight passes through a float, and the
scales OpenAI chose are kept. transformers' own path runs these checkpoints on Hopper with kernels it
fetches from the Hub at run time; imported, they load offline with qwantize_hf and run on its kernels.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from qwantize_hf.config import MXFP4Config
from qwantize_hf.constants import F4_CODES_PER_BYTE
from qwantize_hf.experts import PROJECTIONS, SCALE_SUFFIX
from qwantize_hf.format import check_scale_method
from qwantize_hf.integrations.checkpoint_folder import (
    U8,
    TensorHeader,
    linear_module_names,
    load_config,
    read_headers,
    weight_files,
    write_import,
)

logger = logging.getLogger(__name__)

TRANSFORMERS_MXFP4 = "mxfp4"  # transformers' quant_method for these checkpoints
BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"
BLOCK_SIZE = 32  # the only block size of the format (16 bytes of codes per scale)
SCALES_FROM = "the source checkpoint (transformers MXFP4, as GPT-OSS is published)"  # config.json's record


def _quantized_tensors(headers: Mapping[str, TensorHeader], where: str) -> list[str]:
    """The ``<m>.<p>`` of every blocks/scales pair, checked: uint8, matching shapes, blocks of 32."""
    pairs = sorted(name[: -len(BLOCKS_SUFFIX)] for name in headers if name.endswith(BLOCKS_SUFFIX))
    orphans = sorted(
        name for name in headers if name.endswith(SCALES_SUFFIX) and name[: -len(SCALES_SUFFIX)] not in pairs
    )
    if orphans:
        raise ValueError(f"{where}: {orphans[0]} has no {BLOCKS_SUFFIX} tensor beside it; the checkpoint is incomplete")
    if not pairs:
        raise ValueError(f"{where} holds no {BLOCKS_SUFFIX} tensor: nothing in it is MXFP4")
    for pair in pairs:
        blocks, scales = headers[pair + BLOCKS_SUFFIX], headers.get(pair + SCALES_SUFFIX)
        if scales is None:
            raise ValueError(f"{where}: {pair}{BLOCKS_SUFFIX} has no {SCALES_SUFFIX} tensor beside it")
        (blocks_dtype, blocks_shape), (scales_dtype, scales_shape) = blocks, scales
        if pair.rsplit(".", 1)[-1] not in PROJECTIONS or ".experts." not in pair + ".":
            raise ValueError(
                f"{where}: {pair}{BLOCKS_SUFFIX} is not an experts projection ({', '.join(PROJECTIONS)}); "
                "only GPT-OSS-style MXFP4 experts can be imported"
            )
        expected = tuple(blocks_shape[:-1])
        if (
            blocks_dtype != U8 or scales_dtype != U8 or len(blocks_shape) != 4
            or blocks_shape[-1] * F4_CODES_PER_BYTE != BLOCK_SIZE or tuple(scales_shape) != expected
        ):  # fmt: skip
            raise ValueError(
                f"{where}: {pair} has blocks {blocks_dtype} {list(blocks_shape)} and scales {scales_dtype} "
                f"{list(scales_shape)}; the format needs uint8 blocks [E, N, K/32, 16] and uint8 scales [E, N, K/32]"
            )
    return pairs


def _check_source(qconfig: Any, where: str) -> None:
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else None
    if method != TRANSFORMERS_MXFP4:
        raise ValueError(
            f"{where}: config.json's quantization_config has quant_method {method!r}, not {TRANSFORMERS_MXFP4!r} "
            "(transformers' MXFP4, as GPT-OSS is published); for a compressed-tensors checkpoint use "
            "from-compressed-tensors"
        )


def from_transformers_mxfp4(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    scale_method: str = "mse",
    overwrite: bool = False,
) -> Path:
    """Write a transformers MXFP4 checkpoint (GPT-OSS) as a qwantize_hf checkpoint, bytes unchanged.

    Each ``<p>_blocks`` becomes ``<p>`` (uint8 ``[E, N, K/2]``) and each ``<p>_scales`` ``<p>_scale``; every
    other tensor (attention, router, embeddings, biases, sinks) is copied as it is, and every Linear stays
    float (``modules_to_not_convert``), as in the source. config.json says the scales are the source's
    (``scales_from``); ``scale_method`` is only how new weights would be quantized. Side files (tokenizer, generation
    config, chat template) are copied.
    """
    check_scale_method(scale_method)
    src, out = Path(src_dir), Path(out_dir)
    config = load_config(src)
    where = str(src)
    _check_source(config.get("quantization_config"), where)
    files, index = weight_files(src)
    pairs = set(_quantized_tensors(read_headers(src, files), where))
    linears = linear_module_names(config)

    def pair_of(name: str, suffix: str) -> str | None:
        """The ``<m>.<p>`` whose ``suffix`` tensor ``name`` is, or None."""
        pair = name[: -len(suffix)] if name.endswith(suffix) else None
        return pair if pair in pairs else None

    def rename(name: str) -> str:
        if (pair := pair_of(name, BLOCKS_SUFFIX)) is not None:
            return pair
        if (pair := pair_of(name, SCALES_SUFFIX)) is not None:
            return pair + SCALE_SUFFIX
        return name

    def convert(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if pair_of(name, BLOCKS_SUFFIX) is not None:
            return tensor.reshape(*tensor.shape[:-2], -1)  # [E, N, K/32, 16] -> [E, N, K/2], same bytes
        return tensor

    config = dict(config)
    config["quantization_config"] = MXFP4Config(
        block_size=BLOCK_SIZE, scale_method=scale_method, modules_to_not_convert=linears, calibration=None,
        scales_from=SCALES_FROM,
    ).to_dict()  # fmt: skip
    write_import(src, out, files, index, rename, config, overwrite=overwrite, convert=convert)
    logger.info("wrote %d MXFP4 expert projections of %s as qwantize_hf to %s", len(pairs), src, out)
    return out


__all__ = ["from_transformers_mxfp4"]
