"""A stored MXFP4 checkpoint that is corrupt must not load: scale byte 255 (NaN in UE8M0)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from qwantize_hf import MXFP4Config
from qwantize_hf.constants import E8M0_NAN
from tests.tiny_models import FAMILIES, save_random_model

SCALES = "model.layers.1.mlp.down_proj.weight_scale"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    bf16 = save_random_model(FAMILIES["llama"](), tmp_path_factory.mktemp("bf16") / "llama")
    folder = tmp_path_factory.mktemp("mxfp4") / "llama"
    AutoModelForCausalLM.from_pretrained(bf16, quantization_config=MXFP4Config()).save_pretrained(folder)
    return folder


def corrupt(folder, tmp_path, edit):
    import shutil

    copy = tmp_path / "corrupt"
    shutil.copytree(folder, copy)
    tensors = load_file(copy / "model.safetensors")
    edit(tensors)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def set_nan_scale(tensors):
    tensors[SCALES][3, 1] = E8M0_NAN


def overwrite_region(tensors):
    tensors[SCALES][:, :] = 0xFF  # a region of the file overwritten with 0xFF bytes


@pytest.mark.parametrize("edit", [set_nan_scale, overwrite_region])
@pytest.mark.parametrize("dequantize", [False, True])
def test_scale_byte_255_is_refused_naming_the_tensor(saved, tmp_path, edit, dequantize):
    folder = corrupt(saved, tmp_path, edit)
    kwargs = {"quantization_config": MXFP4Config(dequantize=True)} if dequantize else {}
    with pytest.raises(ValueError, match=rf"{SCALES} holds .* scale byte\(s\) 255.*corrupt"):
        AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def test_an_intact_checkpoint_still_loads(saved):
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert model.get_submodule("model.layers.1.mlp.down_proj").weight_scale.dtype == torch.uint8
