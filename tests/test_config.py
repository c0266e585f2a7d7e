"""MXFP4Config: defaults, validation, and the round trip through config.json."""

from __future__ import annotations

import json
import logging

import pytest
from transformers import LlamaConfig
from transformers.quantizers.auto import AutoQuantizationConfig

import qwantize_hf
from qwantize_hf import MXFP4Config
from qwantize_hf.config import FORMAT_VERSION, QUANT_METHOD


def test_defaults():
    config = MXFP4Config()
    assert config.quant_method == QUANT_METHOD == "qwantize_mxfp4"
    assert (config.block_size, config.scale_method, config.dequantize) == (32, "mse", False)
    assert config.modules_to_not_convert is None and config.base_model is None
    # data-free activation statistics: random token ids, no text, no tokenizer
    assert config.calibration == {"dataset": "random-tokens", "calibration_tokens": 32768, "calibration_seq_len": 1024}
    assert config.calibrates and config.rescales_on_random_tokens
    # None asks for none; rules that weigh nothing and GPTQ (which needs text) get none by default
    assert MXFP4Config(calibration=None).calibration is None
    assert MXFP4Config(scale_method="naive").calibration is None
    assert MXFP4Config(scale_method="even").calibration is None
    with pytest.raises(ValueError, match="needs calibration text"):
        MXFP4Config(algorithm="gptq")
    with pytest.raises(TypeError, match="must be a dict, 'auto' or None"):
        MXFP4Config(calibration="random-tokens")
    assert config.format_version == FORMAT_VERSION == 1
    assert config.bits_per_weight == 4.25 and MXFP4Config(block_size=16).bits_per_weight == 4.5


def test_to_dict_is_the_config_json_entry():
    config = MXFP4Config(block_size=16, scale_method="naive", modules_to_not_convert=["lm_head", "gate"])
    assert config.to_dict() == {
        "quant_method": "qwantize_mxfp4",
        "format_version": 1,
        "block_size": 16,
        "scale_method": "naive",
        "modules_to_not_convert": ["lm_head", "gate"],
        "quantize_lm_head": False,
        "base_model": None,
        "calibration": None,
        "algorithm": "rtn",
        "gptq": None,
        # what a reader without qwantize_hf needs to know
        "quantizer": {
            "package": "qwantize_hf",
            "version": qwantize_hf.__version__,
            "to_load": "pip install qwantize_hf, then import qwantize_hf before from_pretrained",
        },
    }
    assert "dequantize" not in config.to_dict()  # a load-time request, not a property of the bytes


def test_round_trip_through_model_config_json(tmp_path):
    config = MXFP4Config(block_size=16, scale_method="even", modules_to_not_convert=["lm_head"], base_model="org/m")
    model_config = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4)
    model_config.quantization_config = config
    model_config.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert stored == config.to_dict()
    back = AutoQuantizationConfig.from_dict(stored)
    assert isinstance(back, MXFP4Config) and back.to_dict() == config.to_dict()
    assert MXFP4Config.from_dict(json.loads(config.to_json_string())).to_dict() == config.to_dict()


def test_quant_method_and_unknown_config_json_keys_are_accepted(caplog):
    # Unknown keys are tolerated only where a newer version may have written them: config.json.
    with caplog.at_level(logging.WARNING, logger="qwantize_hf"):
        config = MXFP4Config.from_dict({"quant_method": "qwantize_mxfp4", "block_size": 32, "future_knob": 3})
    assert config.block_size == 32 and not hasattr(config, "future_knob")
    assert "future_knob" in caplog.text
    with pytest.raises(TypeError, match="future_knob"):
        MXFP4Config(quant_method="qwantize_mxfp4", block_size=32, future_knob=3)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"block_size": 64}, ValueError, r"block_size must be one of \(32, 16\), got 64"),
        ({"block_size": True}, ValueError, "block_size must be one of"),
        ({"scale_method": "max"}, ValueError, r"scale_method must be one of \['naive', 'even', 'mse'\], got 'max'"),
        ({"scale_method": "mes"}, ValueError, r"got 'mes' \(did you mean 'mse'\?\)"),
        ({"quant_method": "mxfp4"}, ValueError, "MXFP4Config is for quant_method 'qwantize_mxfp4', got 'mxfp4'"),
        ({"format_version": FORMAT_VERSION + 1}, ValueError, "upgrade qwantize_hf"),
        ({"format_version": 0}, ValueError, "format_version must be >= 1"),
        ({"format_version": "1"}, TypeError, "format_version must be an int"),
        ({"modules_to_not_convert": "lm_head"}, TypeError, r"got the string 'lm_head'; write \['lm_head'\]"),
        ({"quantize_lm_head": 1}, TypeError, "quantize_lm_head must be True or False, got 1"),
        ({"quantize_lm_head": True, "modules_to_not_convert": ["lm_head"]}, ValueError, "drop one of them"),
        ({"algorithm": "gptq", "calibration": {"dataset": ["t"], "tokenizer": "x"}, "gptq": {"end_to_end_norms": 1}},
         TypeError, r"gptq\['end_to_end_norms'\] must be True or False"),
        ({"modules_to_not_convert": [""]}, TypeError, "modules_to_not_convert must be a list"),
        ({"dequantize": "yes"}, TypeError, "dequantize must be True or False"),
        ({"base_model": 3}, TypeError, "base_model must be a Hub id"),
        ({"calibration": [1]}, TypeError, "calibration must be a dict, .auto. or None"),
    ],
)
def test_bad_values_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        MXFP4Config(**kwargs)


def test_loading_attributes_are_only_dequantize():
    assert MXFP4Config(dequantize=True).get_loading_attributes() == {"dequantize": True}


def test_a_typo_in_a_keyword_is_an_error_with_the_close_match():
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['scale_methd'\].*did you mean 'scale_method'"):
        MXFP4Config(scale_methd="naive")


@pytest.mark.parametrize("block_size", [32.0, True, "32"])
def test_block_size_must_be_an_int(block_size):
    with pytest.raises(ValueError, match="block_size must be one of"):
        MXFP4Config(block_size=block_size)


def test_fields_of_a_newer_config_json_are_dropped_with_a_warning(caplog):
    stored = {**MXFP4Config(scale_method="naive").to_dict(), "written_by_a_newer_version": 1}
    with caplog.at_level("WARNING", logger="qwantize_hf.config"):
        config = MXFP4Config.from_dict(stored)
    assert config.scale_method == "naive" and "written_by_a_newer_version" not in config.to_dict()
    assert "written_by_a_newer_version" in caplog.text
