"""A saved checkpoint folder, read and rewritten without loading a model: the converters' common ground.

config.json, the safetensors shards and their index (whose file names are checked before any is
opened), the tensor headers, the side files (tokenizer, generation config, ...), and the model's
Linear-like module names from its config (built on the meta device).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# safetensors dtype names of the scale bytes: plain bytes, or the same bytes typed as E8M0.
U8 = "U8"
E8M0 = "F8_E8M0"
# Files of a checkpoint folder the converters write themselves instead of copying.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

TensorHeader = tuple[str, tuple[int, ...]]  # safetensors dtype name, shape


def read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    # indent 2 and sorted keys, as transformers and compressed-tensors write config.json.
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def weight_files(src: Path) -> tuple[list[str], dict[str, Any] | None]:
    """The safetensors files of a checkpoint folder, and its index (None when unsharded)."""
    if (src / WEIGHTS_INDEX_NAME).is_file():
        index = read_json(src / WEIGHTS_INDEX_NAME)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{src / WEIGHTS_INDEX_NAME} has no 'weight_map' object; the checkpoint is corrupt")
        for tensor, file in weight_map.items():
            # Shard names are joined to the source and the output folder: a path, an absolute name or
            # '..' would read or write outside them.
            if not isinstance(file, str) or file in ("", ".", "..") or Path(file).name != file or "\\" in file:
                raise ValueError(
                    f"{src / WEIGHTS_INDEX_NAME} maps {tensor!r} to the file {file!r}, which is not a plain file "
                    "name in the checkpoint folder; refusing to read or write outside it (the index is corrupt "
                    "or hostile)"
                )
        return sorted(set(weight_map.values())), index
    if (src / WEIGHTS_NAME).is_file():
        return [WEIGHTS_NAME], None
    raise FileNotFoundError(
        f"{src} holds neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}; only safetensors checkpoints can be "
        "converted (re-save the model with save_pretrained, which writes safetensors)"
    )


def read_headers(src: Path, files: list[str]) -> dict[str, TensorHeader]:
    """Dtype and shape of every tensor, from the safetensors headers only (no tensor data is read)."""
    headers: dict[str, TensorHeader] = {}
    for file in files:
        with safe_open(src / file, framework="pt") as f:
            for name in f.keys():
                view = f.get_slice(name)
                headers[name] = (view.get_dtype(), tuple(view.get_shape()))
    return headers


def linear_like(module: torch.nn.Module) -> bool:
    """An ``nn.Linear``, or a module that owns a 2-D weight and is not an embedding: a mixture-of-experts
    router (transformers' ``*TopKRouter``, a Linear in vLLM) or a GPT-2 Conv1D."""
    if isinstance(module, torch.nn.Linear):
        return True
    weight = module._parameters.get("weight")
    return weight is not None and weight.ndim == 2 and not isinstance(module, torch.nn.Embedding)


def linear_module_names(config: Mapping[str, Any]) -> list[str]:
    """Names of every Linear-like module (``linear_like``) of the model a config.json describes, in
    ``named_modules`` order.

    The model is built on the meta device (no memory, no weights) from its
    transformers class. compressed-tensors lists each Linear it left
    unquantized in ``ignore``; vLLM expects packed weights for every other one
    (a float MoE router it does not find in ``ignore`` is built as an MXFP4 Linear).
    """
    import transformers

    architectures = config.get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise ValueError(
            f"cannot build architecture {architectures[:1] or 'None'} from transformers to find its Linear layers "
            "(custom code or no 'architectures' in config.json); pass the unquantized Linear module names "
            "explicitly (ignore=[...] / --ignore)"
        )
    plain = {key: value for key, value in config.items() if key not in ("quantization_config", "compression_config")}
    model_config = model_class.config_class.from_dict(plain)
    with torch.device("meta"):
        model = model_class(model_config)
    return [name for name, module in model.named_modules() if linear_like(module)]


def prepare_out_dir(src: Path | None, out: Path, overwrite: bool) -> None:
    if src is not None and out.resolve() == src.resolve():
        raise ValueError(f"the output folder {out} is the input folder; write the converted checkpoint elsewhere")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out} exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace it"
            )
        # Stale shards of an earlier conversion would sit beside the new index.
        for path in out.iterdir():
            if path.is_file() and (path.name.endswith(WEIGHT_FILE_SUFFIXES) or path.name == WEIGHTS_INDEX_NAME):
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def copy_side_files(src: Path, out: Path) -> None:
    """Tokenizer, generation config, chat template, model card...: every top-level file but weights and config."""
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name in (CONFIG_NAME, WEIGHTS_INDEX_NAME) or path.name.startswith("."):
            continue
        if path.name.endswith(WEIGHT_FILE_SUFFIXES):
            continue
        shutil.copy2(path, out / path.name)


def rewrite_weights(
    src: Path,
    out: Path,
    files: list[str],
    index: dict[str, Any] | None,
    rename: Callable[[str], str],
    convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Copy every shard with tensors renamed (and ``convert(name, tensor)``, under the old name, where given),
    one shard in memory at a time; the index, if any, follows the names."""
    for file in files:
        tensors = {}
        with safe_open(src / file, framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            for name in f.keys():
                tensor = f.get_tensor(name)
                tensors[rename(name)] = tensor if convert is None else convert(name, tensor)
        save_file(tensors, out / file, metadata=metadata)
    if index is not None:
        renamed = dict(index)
        renamed["weight_map"] = {rename(name): file for name, file in index["weight_map"].items()}
        write_json(out / WEIGHTS_INDEX_NAME, renamed)


def write_import(
    src: Path,
    out: Path,
    files: list[str],
    index: dict[str, Any] | None,
    rename: Callable[[str], str],
    config: dict[str, Any],
    *,
    overwrite: bool,
    convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """An importer's output folder: every shard rewritten (``rename``, ``convert``), the side files copied,
    and ``config`` (with its new quantization_config) as config.json."""
    prepare_out_dir(src, out, overwrite)
    rewrite_weights(src, out, files, index, rename, convert)
    copy_side_files(src, out)
    write_json(out / CONFIG_NAME, config)


def load_config(src: Path) -> dict[str, Any]:
    if not (src / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{src} has no {CONFIG_NAME}; point at a saved model folder")
    return read_json(src / CONFIG_NAME)


__all__ = [
    "CONFIG_NAME",
    "E8M0",
    "TensorHeader",
    "U8",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "WEIGHT_FILE_SUFFIXES",
    "copy_side_files",
    "linear_like",
    "linear_module_names",
    "load_config",
    "prepare_out_dir",
    "read_headers",
    "read_json",
    "rewrite_weights",
    "weight_files",
    "write_import",
    "write_json",
]
