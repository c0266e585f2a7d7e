"""Import of transformers' own MXFP4 checkpoints (GPT-OSS's ``*_blocks``/``*_scales``) with
``from_transformers_mxfp4`` / ``qwantize-convert from-transformers-mxfp4``.

transformers cannot write such a checkpoint offline (its quantizer fetches kernels from the Hub), so the
tests write one in its layout from a tiny GPT-OSS; the independent reader is transformers itself:
``Mxfp4Config(dequantize=True)`` dequantizes it with its own code, and our imported model must hold exactly
those weights and give the same logits.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GptOssConfig, Mxfp4Config

from qwantize_hf import dequantize_mxfp4, quantize_mxfp4
from qwantize_hf.card import render_model_card
from qwantize_hf.experts import IMPLEMENTATION, is_mxfp4_experts
from qwantize_hf.integrations.cli import main as cli_main
from qwantize_hf.integrations.transformers_mxfp4 import from_transformers_mxfp4
from tests.tiny_models import COMMON, assert_same_tensors, input_ids, save_random_model

SOURCE_SKIPS = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory):
    """A tiny GPT-OSS saved as transformers' MXFP4 checkpoints are: experts as blocks + scales."""
    folder = save_random_model(
        GptOssConfig(**{**COMMON, "head_dim": 16}, num_local_experts=4, num_experts_per_tok=2),
        tmp_path_factory.mktemp("float"),
    )
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        weight = tensors.pop(name).transpose(-1, -2)  # the module's [E, K, N] -> [E, N, K]
        codes, scales = quantize_mxfp4(weight, scale_method="naive", name=name)  # another tool's rule
        tensors[f"{name}_blocks"] = codes.reshape(*scales.shape, 16)
        tensors[f"{name}_scales"] = scales
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": SOURCE_SKIPS}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


def transformers_reference(folder):
    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16
    )


def test_imported_experts_hold_the_bytes_transformers_dequantizes_and_give_its_logits(gpt_oss_mxfp4, tmp_path):
    out = from_transformers_mxfp4(gpt_oss_mxfp4, tmp_path / "ours")
    assert (out / "tokenizer_config.json").is_file()
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "qwantize_mxfp4" and "lm_head" in quantization["modules_to_not_convert"]
    assert "GPT-OSS" in quantization["scales_from"]  # the scales are not this library's mse ones
    card = render_model_card(quantization, "gpt-oss-tiny")
    assert "scales from the source checkpoint" in card and "mse scales)" not in card
    assert "were imported byte for byte from" in card and "Every eligible" not in card
    assert "| Calibration | not applicable: the scales were imported from" in card
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    reference = transformers_reference(gpt_oss_mxfp4)
    stored = load_file(gpt_oss_mxfp4 / "model.safetensors")
    for index in range(2):
        ours, theirs = model.model.layers[index].mlp.experts, reference.model.layers[index].mlp.experts
        assert is_mxfp4_experts(ours) and ours.config._experts_implementation == IMPLEMENTATION
        for projection in ("gate_up_proj", "down_proj"):
            codes, scales = getattr(ours, projection), getattr(ours, projection + "_scale")
            blocks = stored[f"model.layers.{index}.mlp.experts.{projection}_blocks"]
            assert torch.equal(codes, blocks.reshape(codes.shape))
            dequantized = dequantize_mxfp4(codes, scales, dtype=torch.bfloat16).transpose(-1, -2)
            assert torch.equal(dequantized, getattr(theirs, projection))  # [E, K, N], exactly
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=2e-2, rtol=2e-2)
    assert model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    assert_same_tensors(model.state_dict(), reloaded.state_dict())


def test_the_cli_imports_and_refuses_what_is_not_that_format(gpt_oss_mxfp4, tmp_path, caplog):
    assert cli_main(["from-transformers-mxfp4", str(gpt_oss_mxfp4), str(tmp_path / "ours")]) == 0
    assert (tmp_path / "ours" / "model.safetensors").is_file()
    assert cli_main(["from-transformers-mxfp4", str(gpt_oss_mxfp4), str(tmp_path / "ours")]) == 1
    assert "exists and is not empty" in caplog.text
    # ours is not transformers' MXFP4
    assert cli_main(["from-transformers-mxfp4", str(tmp_path / "ours"), str(tmp_path / "again")]) == 1
    assert "quant_method 'qwantize_mxfp4', not 'mxfp4'" in caplog.text


def test_a_scales_tensor_missing_or_misshapen_is_refused_naming_it(gpt_oss_mxfp4, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(gpt_oss_mxfp4, broken)
    tensors = load_file(broken / "model.safetensors")
    name = "model.layers.1.mlp.experts.down_proj"
    scales = tensors.pop(f"{name}_scales")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{name}_blocks has no _scales tensor"):
        from_transformers_mxfp4(broken, tmp_path / "a")
    tensors[f"{name}_scales"] = scales[:, :, :1].contiguous()
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name} has blocks U8 \[4, 64, 4, 16\] and scales U8 \[4, 64, 1\]"):
        from_transformers_mxfp4(broken, tmp_path / "b")


def test_scales_from_is_written_only_when_set_and_must_name_something():
    from qwantize_hf import MXFP4Config

    assert "scales_from" not in MXFP4Config().to_dict()
    assert MXFP4Config(scales_from="a tool").to_dict()["scales_from"] == "a tool"
    for bad in ("", "  ", 3):
        with pytest.raises(TypeError, match="scales_from must be None or a non-empty string"):
            MXFP4Config(scales_from=bad)
