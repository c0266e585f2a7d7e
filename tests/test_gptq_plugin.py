"""GPTQ through from_pretrained: MXFP4Config(algorithm="gptq", calibration=...).

Tiny Llama/Qwen2 models from configs and the character tokenizer of the calibrated-plugin
tests, so nothing is downloaded; runs against the newest and the oldest transformers.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from qwantize_hf import MXFP4Config, MXFP4Linear
from qwantize_hf.calibration import calibration_inputs
from qwantize_hf.config import GPTQ_DEFAULTS
from qwantize_hf.sequential import gptq_sequential
from tests.test_calibrated_plugin import CALIBRATION_TEXT, char_tokenizer, eligible, request
from tests.tiny_models import FAMILIES, assert_same_tensors, input_ids, save_random_model

DEFAULTS = dict(GPTQ_DEFAULTS)  # gptq_sequential keywords (test_config_defaults_are_the_pipeline_defaults)


def gptq_config(**overrides) -> MXFP4Config:
    return MXFP4Config(algorithm="gptq", calibration=request(), **overrides)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    return {family: save_random_model(FAMILIES[family](), root / family) for family in ("llama", "qwen2")}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_from_pretrained_runs_the_layer_by_layer_pipeline(checkpoints, family):
    model = AutoModelForCausalLM.from_pretrained(checkpoints[family], quantization_config=gptq_config())
    # The same bytes as the pipeline run by hand on the float model with the same calibration tokens.
    reference = AutoModelForCausalLM.from_pretrained(checkpoints[family])
    names = eligible(reference)
    sequences, _ = calibration_inputs(request())
    # device left to the pipeline's default (the GPU when there is one), as the quantizer leaves it
    expected = gptq_sequential(reference, sequences, names, block_size=32, **DEFAULTS)
    for name in names:
        module = model.get_submodule(name)
        assert isinstance(module, MXFP4Linear), name
        assert torch.equal(module.weight, expected[name][0]) and torch.equal(module.weight_scale, expected[name][1])
    # logits of the quantized model = the float model holding the dequantized weights (which the pipeline left)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids()).logits, reference(input_ids()).logits, rtol=0, atol=1e-5)


def test_save_reload_is_bit_identical_and_config_records_the_run(checkpoints, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        checkpoints["llama"], quantization_config=gptq_config(gptq={"true_sequential": True, "damping": 0.05})
    )
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert stored["algorithm"] == "gptq"
    assert stored["gptq"] == {**GPTQ_DEFAULTS, "damping": 0.05, "true_sequential": True}
    assert stored["calibration"]["calibrated"] is True and stored["calibration"]["calibration_tokens"] == 256
    assert CALIBRATION_TEXT[:40] not in json.dumps(stored)  # the text itself is never stored
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # the stored bytes, no calibration again
    assert_same_tensors(model.state_dict(), reloaded.state_dict())
    with torch.no_grad():
        assert torch.equal(model(input_ids()).logits, reloaded(input_ids()).logits)


def test_gptq_beats_round_to_nearest_on_the_calibration_text(checkpoints):
    ids = torch.tensor(char_tokenizer()(CALIBRATION_TEXT)["input_ids"])[None, :256]
    float_model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    with torch.no_grad():
        target = float_model(ids).logits
        errors = {}
        for label, config in (("rtn", MXFP4Config()), ("gptq", gptq_config())):
            model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], quantization_config=config)
            errors[label] = float((model(ids).logits - target).square().mean())
    assert errors["gptq"] < errors["rtn"], errors


def test_gptq_requests_are_checked():
    with pytest.raises(ValueError, match="needs calibration"):
        MXFP4Config(algorithm="gptq")
    with pytest.raises(ValueError, match="did you mean 'gptq'"):
        MXFP4Config(algorithm="gtpq", calibration=request())
    with pytest.raises(ValueError, match="unknown key"):
        gptq_config(gptq={"dampening": 0.1})
    with pytest.raises(ValueError, match="damping"):
        gptq_config(gptq={"damping": 0})
    with pytest.raises(ValueError, match="algorithm is 'rtn'"):
        MXFP4Config(gptq={"act_order": True})
    with pytest.raises(ValueError, match="fewer than one sequence"):
        MXFP4Config(algorithm="gptq", calibration=request(calibration_tokens=10))


def test_too_little_text_is_a_clear_error(checkpoints):
    with pytest.raises(ValueError, match="fewer than one"):
        AutoModelForCausalLM.from_pretrained(
            checkpoints["llama"],
            quantization_config=MXFP4Config(algorithm="gptq", calibration=request(dataset=["short text"])),
        )


def test_gptq_with_naive_scales_is_the_pipeline_with_naive_scales(checkpoints):
    config = gptq_config(scale_method="naive")
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], quantization_config=config)
    reference = AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    sequences, _ = calibration_inputs(request())
    names = eligible(reference)
    expected = gptq_sequential(reference, sequences, names, block_size=32, scale_method="naive", **DEFAULTS)
    mse = gptq_sequential(AutoModelForCausalLM.from_pretrained(checkpoints["llama"]), sequences, names, block_size=32,
                          **DEFAULTS)  # fmt: skip
    for name in names:
        module = model.get_submodule(name)
        assert torch.equal(module.weight_scale, expected[name][1]) and torch.equal(module.weight, expected[name][0])
    assert any(not torch.equal(mse[name][1], expected[name][1]) for name in names)


def test_config_defaults_are_the_pipeline_defaults():
    import inspect

    parameters = inspect.signature(gptq_sequential).parameters
    assert {key: parameters[key].default for key in GPTQ_DEFAULTS} == GPTQ_DEFAULTS
