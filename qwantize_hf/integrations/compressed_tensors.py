"""Convert between qwantize_hf MXFP4 checkpoints and the compressed-tensors MXFP4 layout that vLLM serves.

compressed-tensors (what llm-compressor writes and vLLM loads) stores an MXFP4
W4A16 ``nn.Linear`` called ``<m>`` as

    <m>.weight_packed  uint8 [N, K/2]   E2M1 codes, element 2i in the low nibble
    <m>.weight_scale   uint8 [N, K/32]  E8M0 bytes, value 2**(e - 127)
    <m>.bias           unchanged

plus a ``quantization_config`` with ``quant_method "compressed-tensors"`` and
format ``"mxfp4-pack-quantized"``. That is our format at block_size 32, byte for
byte, with the codes under another name (ours: ``<m>.weight``). Converting is
therefore a rename and a config rewrite; the weights never pass through a float.

This module must never re-quantize: whatever scales a checkpoint holds (our
least-squared-error ones, or llm-compressor's) are carried over unchanged.
The layout was checked against compressed-tensors 0.20.0: its own writer, its
own decompressor and transformers' loading path (tests/test_compressed_tensors.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from qwantize_hf.config import FORMAT_VERSION, QUANT_METHOD, MXFP4Config
from qwantize_hf.constants import F4_CODES_PER_BYTE
from qwantize_hf.format import check_scale_method
from qwantize_hf.integrations.checkpoint_folder import (
    CONFIG_NAME,
    E8M0,
    U8,
    WEIGHTS_NAME,
    TensorHeader,
    copy_side_files,
    linear_like,
    linear_module_names,
    load_config,
    prepare_out_dir,
    read_headers,
    read_json,
    rewrite_weights,
    weight_files,
    write_import,
    write_json,
)

logger = logging.getLogger(__name__)

CT_QUANT_METHOD = "compressed-tensors"
CT_MXFP4_FORMAT = "mxfp4-pack-quantized"
# MXFP4 in compressed-tensors (and in vLLM's MXFP4 kernels) has blocks of 32 only.
CT_MXFP4_BLOCK_SIZE = 32
# The compressed-tensors release whose writer, decompressor and config this
# module was compared against; written as the config's "version".
CT_VERIFIED_VERSION = "0.20.0"
# compressed-tensors' MXFP4 checks: what its preset writes and vLLM's _is_mxfp4 tests.
_CT_MXFP4_WEIGHTS = {
    "dynamic": False,
    "group_size": CT_MXFP4_BLOCK_SIZE,
    "num_bits": 4,
    "scale_dtype": "torch.uint8",
    "strategy": "group",
    "symmetric": True,
    "type": "float",
}
# What each compressed-tensors format is, for refusal messages.
_CT_FORMAT_NAMES = {
    "dense": "unquantized (dense) weights",
    "int-quantized": "INT8 weights",
    "float-quantized": "FP8 weights",
    "naive-quantized": "integer weights, one per byte",
    "pack-quantized": "integer weights packed into int32 (W4A16/W8A16, GPTQ/AWQ-style)",
    "marlin-24": "2:4-sparse Marlin weights",
    "mixed-precision": "several schemes in one model",
    "nvfp4-pack-quantized": "NVFP4 (FP4 with FP8 scales per 16 and a global scale)",
    "mxfp4-pack-quantized": "MXFP4",
    "mxfp6-pack-quantized": "MXFP6",
    "mxfp8-quantized": "MXFP8",
}

OUR_CODES_SUFFIX = ".weight"
CT_CODES_SUFFIX = ".weight_packed"
SCALES_SUFFIX = ".weight_scale"
# Tensors that only another scheme than MXFP4 W4A16 would hold.
_FOREIGN_SUFFIXES = (".weight_global_scale", ".weight_zero_point", ".input_scale", ".input_global_scale")
# ---------------------------------------------------------------------------
# quantization_config: ours and compressed-tensors'


def ct_mxfp4_quantization_config(ignore: Iterable[str]) -> dict[str, Any]:
    """The ``quantization_config`` compressed-tensors writes for an MXFP4A16 model whose Linears are
    all quantized except ``ignore`` (same keys and values as its ``ModelCompressor.update_config``)."""
    return {
        "config_groups": {
            "group_0": {
                "format": CT_MXFP4_FORMAT,
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": dict(_CT_MXFP4_WEIGHTS),
            }
        },
        "format": CT_MXFP4_FORMAT,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": CT_QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERIFIED_VERSION,
    }


def _as_dict(quantization_config: Any) -> dict[str, Any] | None:
    if quantization_config is None or isinstance(quantization_config, dict):
        return quantization_config
    return quantization_config.to_dict()


def _check_ours(qconfig: Mapping[str, Any] | None, where: str) -> None:
    method = (qconfig or {}).get("quant_method")
    if method != QUANT_METHOD:
        hint = " (it is one: use from_compressed_tensors to import it)" if method == CT_QUANT_METHOD else ""
        raise ValueError(
            f"{where} is not a qwantize_hf MXFP4 checkpoint: its quantization_config has quant_method "
            f"{method!r}, expected {QUANT_METHOD!r}{hint}. Quantize the model with qwantize_hf.MXFP4Config"
        )
    version = qconfig.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{where} has qwantize_mxfp4 format_version {version}; this converter knows the layout of version "
            f"{FORMAT_VERSION} only. Use the qwantize_hf release that wrote it"
        )
    block_size = qconfig.get("block_size", CT_MXFP4_BLOCK_SIZE)
    if block_size != CT_MXFP4_BLOCK_SIZE:
        raise ValueError(
            f"{where} uses block_size {block_size}, but compressed-tensors' MXFP4 layout (and vLLM's MXFP4 kernels) "
            f"only have blocks of {CT_MXFP4_BLOCK_SIZE}. Re-quantize with MXFP4Config(block_size={CT_MXFP4_BLOCK_SIZE})"
        )


def _describe_ct_group(fmt: str | None, group: Mapping[str, Any]) -> str:
    weights = group.get("weights") or {}
    text = f"format {fmt!r} ({_CT_FORMAT_NAMES.get(fmt or '', 'unknown format')})"
    if weights:
        text += (
            f", weights {weights.get('type')} {weights.get('num_bits')}-bit, strategy {weights.get('strategy')!r}, "
            f"group_size {weights.get('group_size')}"
        )
    activations = group.get("input_activations")
    if activations:
        text += f", input activations {activations.get('type')} {activations.get('num_bits')}-bit"
    return text


def _check_ct_mxfp4(qconfig: Mapping[str, Any] | None, where: str) -> None:
    """Refuse every compressed-tensors checkpoint that is not MXFP4 W4A16 (dynamic activations allowed)."""
    method = (qconfig or {}).get("quant_method")
    if method != CT_QUANT_METHOD:
        raise ValueError(
            f"{where} is not a compressed-tensors checkpoint: its quantization_config has quant_method {method!r}, "
            f"expected {CT_QUANT_METHOD!r}"
        )
    status = qconfig.get("quantization_status")
    if status != "compressed":
        raise ValueError(
            f"{where} has quantization_status {status!r}: its weights are stored unpacked, not as MXFP4 codes. "
            "Save it compressed (llm-compressor's save_pretrained(..., save_compressed=True)) and convert that"
        )
    for key in ("transform_config", "sparsity_config", "kv_cache_scheme"):
        if qconfig.get(key):
            raise ValueError(
                f"{where} has a non-empty {key!r}; qwantize_hf loads plain MXFP4 weight-only checkpoints and would "
                "silently drop it. Export the model from llm-compressor without it"
            )
    groups = qconfig.get("config_groups") or {}
    if not groups:
        raise ValueError(f"{where} has no config_groups: nothing in it is quantized")
    top_format = qconfig.get("format")
    for name, group in groups.items():
        fmt = group.get("format") or top_format
        weights = group.get("weights") or {}
        found = {key: weights.get(key) for key in _CT_MXFP4_WEIGHTS if key != "scale_dtype"}
        expected = {key: value for key, value in _CT_MXFP4_WEIGHTS.items() if key != "scale_dtype"}
        if fmt != CT_MXFP4_FORMAT or found != expected or group.get("output_activations"):
            raise ValueError(
                f"{where}: config group {name!r} is {_describe_ct_group(fmt, group)}, not MXFP4 "
                f"({CT_MXFP4_FORMAT!r}, float 4-bit weights, one E8M0 scale per {CT_MXFP4_BLOCK_SIZE}). "
                "qwantize_hf imports only compressed-tensors MXFP4 checkpoints (llm-compressor schemes "
                "'MXFP4A16' and 'MXFP4'); quantize the original model with qwantize_hf instead"
            )
        activations = group.get("input_activations")
        if activations:
            if activations.get("dynamic") is False:
                raise ValueError(
                    f"{where}: config group {name!r} quantizes input activations with static scales; qwantize_hf "
                    "is weight-only and cannot carry them. Use an MXFP4A16 (weight-only) checkpoint"
                )
            logger.warning(
                "%s: config group %r also quantizes input activations (%s-bit %s, dynamic); qwantize_hf keeps "
                "activations in bf16, so the imported model computes weight-only (W4A16)",
                where,
                name,
                activations.get("num_bits"),
                activations.get("type"),
            )


# ---------------------------------------------------------------------------
# checkpoint folders


def _check_codes_and_scales(module: str, codes: TensorHeader | None, scales: TensorHeader, where: str) -> None:
    if codes is None:
        raise ValueError(f"{where}: {module}{SCALES_SUFFIX} has no packed codes beside it")
    (codes_dtype, codes_shape), (scales_dtype, scales_shape) = codes, scales
    if codes_dtype != U8 or scales_dtype not in (U8, E8M0) or len(codes_shape) != 2:
        raise ValueError(
            f"{where}: module {module} has codes {codes_dtype} {list(codes_shape)} and scales "
            f"{scales_dtype} {list(scales_shape)}; MXFP4 needs uint8 [N, K/2] codes and uint8 (E8M0) scales"
        )
    n, k = codes_shape[0], codes_shape[1] * F4_CODES_PER_BYTE
    expected = (n, k // CT_MXFP4_BLOCK_SIZE)
    if k % CT_MXFP4_BLOCK_SIZE or scales_shape != expected:
        raise ValueError(
            f"{where}: module {module} has codes {list(codes_shape)} (K = {k}) but scales {list(scales_shape)}; "
            f"blocks of {CT_MXFP4_BLOCK_SIZE} need scales {list(expected)}"
        )


def _quantized_modules(headers: Mapping[str, TensorHeader], codes_suffix: str, where: str) -> list[str]:
    modules = [name[: -len(SCALES_SUFFIX)] for name in headers if name.endswith(SCALES_SUFFIX)]
    if not modules:
        raise ValueError(f"{where} holds no {SCALES_SUFFIX} tensor: no module in it is MXFP4-quantized")
    for module in modules:
        _check_codes_and_scales(module, headers.get(module + codes_suffix), headers[module + SCALES_SUFFIX], where)
    foreign = sorted(name for name in headers if name.endswith(_FOREIGN_SUFFIXES))
    if foreign:
        raise ValueError(
            f"{where} holds {foreign[0]} (and {len(foreign) - 1} more like it): tensors of a scheme other than "
            "MXFP4 W4A16 (a global scale, zero points or static activation scales), which this converter cannot carry"
        )
    return modules


# per-expert projections (``...experts.<e>.gate_proj``): runtimes map them onto their fused experts by name
_PER_EXPERT = re.compile(r"\.experts\.\d+\.")


def _unquantized_linears(linears: list[str], quantized: Iterable[str], where: str) -> list[str]:
    quantized = set(quantized)
    strangers = sorted(name for name in quantized.difference(linears) if not _PER_EXPERT.search(name))
    if strangers:
        logger.warning(
            "%s: %d quantized module(s) are not Linear layers of the model config.json describes (first: %s); "
            "they are written as they are, but a runtime matching Linear layers by name may not find them",
            where,
            len(strangers),
            strangers[0],
        )
    return [name for name in linears if name not in quantized]


def _scale_bytes(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Scale bytes typed E8M0 become uint8 (the same bytes); every other tensor is carried as it is."""
    return tensor.view(torch.uint8) if name.endswith(SCALES_SUFFIX) and tensor.dtype != torch.uint8 else tensor


def _renamer(modules: Iterable[str], old_suffix: str, new_suffix: str) -> Callable[[str], str]:
    old_names = {module + old_suffix: module + new_suffix for module in modules}
    return lambda name: old_names.get(name, name)


# ---------------------------------------------------------------------------
# public API


def to_compressed_tensors(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    ignore: Iterable[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the qwantize_hf checkpoint in ``src_dir`` as a compressed-tensors MXFP4 (W4A16) checkpoint.

    Shards and their index keep their file names; ``<m>.weight`` codes of
    quantized modules become ``<m>.weight_packed``, scales and every other
    tensor are copied byte for byte. ``ignore`` (the Linear layers left
    unquantized) is found from the model's architecture unless given.
    Tokenizer, generation and other side files are copied. Returns ``out_dir``.
    """
    src, out = Path(src_dir), Path(out_dir)
    config = load_config(src)
    _check_ours(config.get("quantization_config"), str(src))
    files, index = weight_files(src)
    modules = _quantized_modules(read_headers(src, files), OUR_CODES_SUFFIX, str(src))
    if ignore is None:
        ignore = _unquantized_linears(linear_module_names(config), modules, str(src))
    prepare_out_dir(src, out, overwrite)
    rewrite_weights(src, out, files, index, _renamer(modules, OUR_CODES_SUFFIX, CT_CODES_SUFFIX), _scale_bytes)
    copy_side_files(src, out)
    config = dict(config)
    config["quantization_config"] = ct_mxfp4_quantization_config(ignore)
    write_json(out / CONFIG_NAME, config)
    logger.info("wrote %d MXFP4 modules of %s as compressed-tensors %s to %s", len(modules), src, CT_MXFP4_FORMAT, out)
    return out


def model_to_compressed_tensors(
    model: torch.nn.Module,
    out_dir: str | Path,
    *,
    ignore: Iterable[str] | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write a loaded qwantize_hf model (its ``state_dict``) as a compressed-tensors MXFP4 checkpoint.

    A quantized module is one whose state dict holds ``<m>.weight`` and
    ``<m>.weight_scale`` as uint8 (what MXFP4Linear saves). The config and
    generation config come from the model, the tokenizer (optional) is saved
    beside them. Weights go to one ``model.safetensors``; tied weights are
    written once, as ``save_pretrained`` does.
    """
    out = Path(out_dir)
    qconfig = _as_dict(getattr(model.config, "quantization_config", None))
    _check_ours(qconfig, type(model).__name__)
    state = _state_dict_for_saving(model)
    headers = {name: (U8 if t.dtype == torch.uint8 else str(t.dtype), tuple(t.shape)) for name, t in state.items()}
    where = f"{type(model).__name__}.state_dict()"
    modules = _quantized_modules(headers, OUR_CODES_SUFFIX, where)
    if ignore is None:
        linears = [name for name, module in model.named_modules() if linear_like(module)]
        ignore = _unquantized_linears(linears, modules, where)
    prepare_out_dir(None, out, overwrite)
    rename = _renamer(modules, OUR_CODES_SUFFIX, CT_CODES_SUFFIX)
    save_file({rename(name): tensor for name, tensor in state.items()}, out / WEIGHTS_NAME, metadata={"format": "pt"})
    model.config.save_pretrained(out)
    config = read_json(out / CONFIG_NAME)
    config["quantization_config"] = ct_mxfp4_quantization_config(ignore)
    write_json(out / CONFIG_NAME, config)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    logger.info("wrote %d MXFP4 modules as compressed-tensors %s to %s", len(modules), CT_MXFP4_FORMAT, out)
    return out


def _state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors; a tied copy (e.g. lm_head.weight = embed_tokens.weight) is dropped."""
    state = model.state_dict()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in tied.items():
        if target in state and source in state and state[target].data_ptr() == state[source].data_ptr():
            del state[target]
    seen: set[int] = set()
    tensors = {}
    for name, tensor in state.items():
        if tensor.is_meta:
            raise ValueError(
                f"{name} is on the meta device (offloaded with device_map?); save the model with save_pretrained "
                "and convert the folder with to_compressed_tensors instead"
            )
        tensor = tensor.detach().to("cpu").contiguous()
        # safetensors refuses two names on one storage; any sharing left is not a declared tie, so copy it.
        if tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[name] = tensor
    return tensors


def from_compressed_tensors(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    scale_method: str = "even",
    overwrite: bool = False,
) -> Path:
    """Write a compressed-tensors MXFP4 checkpoint (as llm-compressor saves it) as a qwantize_hf checkpoint.

    ``<m>.weight_packed`` becomes ``<m>.weight``; scales and all other tensors
    are copied byte for byte, so ``from_pretrained(out_dir)`` with qwantize_hf
    imported loads every quantized Linear as MXFP4Linear. ``scale_method`` is
    only recorded in the config (it is how *new* weights would be quantized);
    the default ``"even"`` is the rule of compressed-tensors' own MXFP4 scales.
    Any other compressed-tensors scheme (NVFP4, int4, FP8, ...) is refused.
    """
    check_scale_method(scale_method)
    src, out = Path(src_dir), Path(out_dir)
    config = load_config(src)
    # Checkpoints from compressed-tensors before transformers adopted quantization_config used this key.
    qconfig = config.get("quantization_config") or config.get("compression_config")
    _check_ct_mxfp4(qconfig, str(src))
    files, index = weight_files(src)
    modules = _quantized_modules(read_headers(src, files), CT_CODES_SUFFIX, str(src))
    try:
        not_converted = _unquantized_linears(linear_module_names(config), modules, str(src))
    except ValueError:
        # No transformers class to inspect: the checkpoint's own list of unquantized Linears.
        not_converted = [name for name in qconfig.get("ignore") or [] if not name.startswith("re:")]
        logger.warning("%s: using the checkpoint's ignore list %s as modules_to_not_convert", src, not_converted)
    config = {key: value for key, value in config.items() if key != "compression_config"}
    # Exactly what save_pretrained of a qwantize_hf model records.
    config["quantization_config"] = MXFP4Config(
        block_size=CT_MXFP4_BLOCK_SIZE, scale_method=scale_method, modules_to_not_convert=not_converted
    ).to_dict()
    rename = _renamer(modules, CT_CODES_SUFFIX, OUR_CODES_SUFFIX)
    write_import(src, out, files, index, rename, config, overwrite=overwrite, convert=_scale_bytes)
    logger.info("wrote %d compressed-tensors MXFP4 modules of %s as qwantize_hf to %s", len(modules), src, out)
    return out
