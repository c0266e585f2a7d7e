"""A stored MXFP4 checkpoint that is corrupt must not load: scale byte 255 (NaN in UE8M0), codes or scales
stored in a dtype that is not their bytes. The same bytes under another name (int8, float8_e8m0fnu) load as bytes."""

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


PACKED = "model.layers.1.mlp.down_proj.weight"


def scales_as_e8m0(tensors):
    tensors[SCALES] = tensors[SCALES].view(torch.float8_e8m0fnu)  # how other MX tools store E8M0


def codes_as_int8(tensors):
    tensors[PACKED] = tensors[PACKED].view(torch.int8)


@pytest.mark.parametrize("edit", [scales_as_e8m0, codes_as_int8])
def test_the_same_bytes_under_another_dtype_load_as_those_bytes(saved, tmp_path, edit):
    intact = AutoModelForCausalLM.from_pretrained(saved)
    model = AutoModelForCausalLM.from_pretrained(corrupt(saved, tmp_path, edit))
    module, reference = (
        model.get_submodule("model.layers.1.mlp.down_proj"),
        intact.get_submodule("model.layers.1.mlp.down_proj"),
    )
    assert module.weight.dtype == module.weight_scale.dtype == torch.uint8
    assert torch.equal(module.weight, reference.weight) and torch.equal(module.weight_scale, reference.weight_scale)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, intact(ids).logits)


def scales_as_float32(tensors):
    tensors[SCALES] = tensors[SCALES].float()  # byte values as floats: a cast of some other tool's scales


def codes_as_bfloat16(tensors):
    tensors[PACKED] = tensors[PACKED].to(torch.bfloat16)


@pytest.mark.parametrize(
    ("edit", "name", "dtype"), [(scales_as_float32, SCALES, "F32"), (codes_as_bfloat16, PACKED, "BF16")]
)
@pytest.mark.parametrize("dequantize", [False, True])
def test_other_dtypes_are_refused_naming_the_tensor(saved, tmp_path, edit, name, dtype, dequantize):
    folder = corrupt(saved, tmp_path, edit)
    kwargs = {"quantization_config": MXFP4Config(dequantize=True)} if dequantize else {}
    with pytest.raises(ValueError, match=rf"stores {name} as {dtype}, but MXFP4 codes and scales are bytes"):
        AutoModelForCausalLM.from_pretrained(folder, **kwargs)
