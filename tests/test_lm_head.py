"""MXFP4Config(quantize_lm_head=True): the output head quantized too, tied or not, by every path.

Tiny Llamas from configs; runs against whichever transformers is installed (``make test`` also
runs it on 5.17).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from qwantize_hf import MXFP4Config, MXFP4Linear, quantize_mxfp4
from qwantize_hf.calibration import eligible_linear_names
from tests.test_calibrated_plugin import request
from tests.tiny_models import FAMILIES, input_ids, save_random_model, statistics_of_ids, tied_llama_config

RANDOM = {"dataset": "random-tokens", "calibration_tokens": 256, "calibration_seq_len": 64}


def save_with_uneven_final_norm(config, folder):
    """A random model whose final norm weights differ by feature, so the head's input features differ in
    mean square (with the init's all-ones norm, a weighted scale search would look like a plain one)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.linspace(0.1, 3.0, config.hidden_size)[torch.randperm(config.hidden_size)])
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    return {
        "tied": save_with_uneven_final_norm(tied_llama_config(), root / "tied"),
        "untied": save_with_uneven_final_norm(FAMILIES["llama"](), root / "untied"),
    }


def float_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)


def load(path, **config):
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=MXFP4Config(quantize_lm_head=True, **config)
    )


def assert_same_bytes(module: MXFP4Linear, expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert torch.equal(module.weight, expected[0]) and torch.equal(module.weight_scale, expected[1])


def test_the_head_stays_float_unless_asked(checkpoints):
    for path in checkpoints.values():
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=MXFP4Config(calibration=None))
        assert type(model.lm_head) is nn.Linear
        assert "lm_head" not in eligible_linear_names(float_model(path), 32)
        assert "lm_head" in eligible_linear_names(float_model(path), 32, quantize_lm_head=True)
    with pytest.raises(TypeError, match="quantize_lm_head must be True or False, got 'yes'"):
        MXFP4Config(quantize_lm_head="yes")


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_plain_mse_head_saves_and_reloads(checkpoints, kind, tmp_path):
    reference = float_model(checkpoints[kind])
    embeddings = reference.model.embed_tokens.weight.detach().clone()
    model = load(checkpoints[kind], calibration=None)
    assert type(model.lm_head) is MXFP4Linear
    assert_same_bytes(model.lm_head, quantize_mxfp4(reference.lm_head.weight, block_size=32, scale_method="mse"))
    # the embeddings keep their float weight: a tied head is untied, never quantized in place
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert model.config.tie_word_embeddings is False
    assert model.config.quantization_config.modules_to_not_convert == []
    assert model.config.quantization_config.quantize_lm_head is True
    logits = model(input_ids()).logits
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as stored:
        assert stored.get_tensor("lm_head.weight").dtype == torch.uint8
        assert torch.equal(stored.get_tensor("model.embed_tokens.weight"), embeddings)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert type(reloaded.lm_head) is MXFP4Linear
    assert_same_bytes(reloaded.lm_head, (model.lm_head.weight, model.lm_head.weight_scale))
    assert torch.equal(reloaded.model.embed_tokens.weight, embeddings)
    assert torch.equal(reloaded(input_ids()).logits, logits)


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_the_default_weighs_the_head_by_its_random_token_statistics(checkpoints, kind):
    model = load(checkpoints[kind], calibration=RANDOM)
    assert model.config.quantization_config.calibration["dataset"] == "random-tokens"
    # the head's input comes before the head: its statistics are the same whether it is quantized or not
    plain = AutoModelForCausalLM.from_pretrained(checkpoints[kind], quantization_config=MXFP4Config(calibration=None))
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    stats = statistics_of_ids(plain.eval(), ids, ["lm_head"])["lm_head"]
    weight = float_model(checkpoints[kind]).lm_head.weight
    expected = quantize_mxfp4(weight, block_size=32, scale_method="mse", weights=stats)
    assert_same_bytes(model.lm_head, expected)
    assert not torch.equal(expected[1], quantize_mxfp4(weight, block_size=32, scale_method="mse")[1])


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_calibrated_methods_quantize_a_tied_head_and_leave_the_embeddings(checkpoints, algorithm, tmp_path):
    reference = float_model(checkpoints["tied"])
    model = load(checkpoints["tied"], algorithm=algorithm, calibration=request())
    assert type(model.lm_head) is MXFP4Linear
    # GPTQ writes the dequantized head into its weight before the swap: the embeddings must not see it
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    plain = quantize_mxfp4(reference.lm_head.weight, block_size=32, scale_method="mse")
    assert not torch.equal(model.lm_head.weight_scale, plain[1]) or not torch.equal(model.lm_head.weight, plain[0])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert_same_bytes(reloaded.lm_head, (model.lm_head.weight, model.lm_head.weight_scale))
    assert torch.equal(reloaded(input_ids()).logits, model(input_ids()).logits)


def test_a_head_that_cannot_be_quantized_stays_float_and_the_record_says_so(tmp_path):
    from transformers import LlamaConfig

    from tests.tiny_models import COMMON

    for tied in (True, False):
        folder = save_random_model(LlamaConfig(**{**COMMON, "hidden_size": 48, "tie_word_embeddings": tied}),
                                   tmp_path / str(tied))  # fmt: skip
        model = load(folder, calibration=None, block_size=32)
        assert type(model.lm_head) is nn.Linear
        assert model.config.quantization_config.quantize_lm_head is False
        model.save_pretrained(tmp_path / f"saved-{tied}")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / f"saved-{tied}")
        assert type(reloaded.lm_head) is nn.Linear


def test_a_quantized_head_goes_through_compressed_tensors_and_back(checkpoints, tmp_path):
    from qwantize_hf.integrations.compressed_tensors import from_compressed_tensors, to_compressed_tensors

    model = load(checkpoints["tied"], calibration=None)
    model.save_pretrained(tmp_path / "mxfp4")
    to_compressed_tensors(tmp_path / "mxfp4", tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == [] and config["tie_word_embeddings"] is False
    from_compressed_tensors(tmp_path / "ct", tmp_path / "back")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.bfloat16)
    assert_same_bytes(back.lm_head, (model.lm_head.weight, model.lm_head.weight_scale))
    assert torch.equal(back(input_ids()).logits, model(input_ids()).logits)
