"""What became MXFP4 and what stayed float: the load-time report, its warnings, and the refusal to save
a checkpoint labelled MXFP4 that holds no MXFP4 layer."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.integrations.moe import use_experts_implementation

from qwantize_hf import MXFP4Config
from qwantize_hf.coverage import coverage
from tests.tiny_models import FAMILIES, save_random_model


class Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self, level: int) -> str:
        return "\n".join(r.getMessage() for r in self.records if r.levelno == level)


def load(folder, **kwargs):
    handler = Messages()
    logger = logging.getLogger("qwantize_hf.quantizer")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=MXFP4Config(**kwargs), dtype=torch.bfloat16
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    return model, handler


def test_a_dense_model_reports_every_linear_algebra_weight_as_mxfp4_and_warns_of_nothing(tmp_path):
    model, messages = load(save_random_model(FAMILIES["llama"](), tmp_path / "llama"))
    info = messages.text(logging.INFO)
    assert "MXFP4: 14 linear layer(s), 73,728 weights" in info and "100.0% of the linear-algebra weights" in info
    assert messages.text(logging.WARNING) == ""
    report = coverage(model, model.config.quantization_config.modules_to_not_convert, 32)
    assert set(report.float) == {"embeddings", "norms", "output head"} and report.skipped == []


@use_experts_implementation(has_gate=False)
class UngatedExperts(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts = 4
        self.up_proj = nn.Parameter(torch.zeros(4, 128, 64))
        self.down_proj = nn.Parameter(torch.zeros(4, 64, 128))


def test_fused_experts_of_an_unsupported_layout_are_warned_about_by_name():
    model = nn.Module()
    model.experts = UngatedExperts(FAMILIES["llama"]())
    report = coverage(model, [], 32)
    why = "fused mixture-of-experts weights of this layout (UngatedExperts has no gate_up_proj (ungated experts)) have "
    assert report.skipped == [("experts.up_proj [4, 128, 64]", why + "no MXFP4 kind yet"),
                              ("experts.down_proj [4, 64, 128]", why + "no MXFP4 kind yet")]  # fmt: skip
    assert report.share() == 0.0 and "1 more" not in report.warnings()[0]


def test_a_model_that_quantized_nothing_is_warned_about_and_does_not_save(tmp_path):
    folder = save_random_model(FAMILIES["llama"](), tmp_path / "llama")
    model, messages = load(folder, modules_to_not_convert=["self_attn", "mlp"])
    assert "no layer of this model became MXFP4" in messages.text(logging.WARNING)
    with pytest.raises(ValueError, match="no layer of this model is MXFP4"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_a_linear_subclass_with_its_own_forward_is_warned_about(tmp_path):
    model = AutoModelForCausalLM.from_config(FAMILIES["llama"](), dtype=torch.bfloat16)
    proj = model.model.layers[0].mlp.up_proj
    model.model.layers[0].mlp.up_proj = ScaledLinear(proj.in_features, proj.out_features, bias=False)
    report = coverage(model, ["lm_head"], 32)  # a float model: every Linear is eligible and left float
    assert ("model.layers.0.self_attn.q_proj.weight [64, 64]", "eligible Linear layers were left float (not "
            "quantized by this load)") in report.skipped  # fmt: skip
    assert [item for item in report.skipped if "layers.0.mlp.up_proj" in item[0]] == [
        (
            "model.layers.0.mlp.up_proj.weight [128, 64]",
            "tests.test_coverage.ScaledLinear subclasses nn.Linear with a forward of its own, which an MXFP4Linear "
            "would drop",
        )
    ]


def test_modules_to_not_convert_are_counted_but_not_warned_about(tmp_path):
    folder = save_random_model(FAMILIES["llama"](), tmp_path / "llama")
    model, messages = load(folder, modules_to_not_convert=["lm_head", "mlp"])
    assert messages.text(logging.WARNING) == ""
    report = coverage(model, model.config.quantization_config.modules_to_not_convert, 32)
    assert report.float["modules_to_not_convert"][0] == 2 * 3 * 64 * 128
