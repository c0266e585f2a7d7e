"""The model card and push_to_hub, offline: huggingface_hub's repo, card and commit calls are mocked."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.utils import hub as transformers_hub

from qwantize_hf import MXFP4Config
from qwantize_hf.card import render_model_card, set_model_card_info, write_model_card
from tests.tiny_models import FAMILIES, save_random_model

EVAL_RESULTS = {
    "methods": [
        {"method": "bf16", "perplexity": 10.0, "delta_vs_bf16": 0.0, "gap_recovered": None, "bits_per_weight": 16},
        {"method": "naive", "perplexity": 11.0, "delta_vs_bf16": 1.0, "gap_recovered": 0.0, "bits_per_weight": 4.25},
        {"method": "mse", "perplexity": 10.75, "delta_vs_bf16": 0.75, "gap_recovered": 0.25, "bits_per_weight": 4.25},
    ],
    "text": "WikiText-2 test split",
    "tokens_scored": 16384,
    "context_length": 2048,
    "machine": "1x H100",
    "command": "python eval/perplexity.py --model org/base",
    "model_note": "Perplexity of the base model in bf16 is the first row.",
}
QUANT_CONFIG = MXFP4Config(modules_to_not_convert=["lm_head"], base_model="org/base").to_dict()


def front_matter(card: str) -> dict:
    return ModelCard(card).data.to_dict()


# --------------------------------------------------------------------------- rendering


def test_card_states_the_method_truthfully():
    card = render_model_card(QUANT_CONFIG, "org/base", repo_id="me/base-mxfp4")
    data = front_matter(card)
    assert data["base_model"] == "org/base" and data["base_model_relation"] == "quantized"
    assert data["library_name"] == "transformers"
    assert {"mxfp4", "qwantize_hf"} <= set(data["tags"]) and "license" not in data
    assert "| Block size | 32 weights" in card
    assert "| Scale method | `mse`: per block, the power-of-two scale with the least squared error" in card
    assert "| Bits per weight | 4.25 in quantized layers" in card
    assert "| Base model | `org/base` |" in card and "| Kept unquantized | `lm_head` |" in card
    assert ("| Calibration | activation statistics of 32768 token ids drawn uniformly from the vocabulary (seed 0, "
            "sequences of 1024); no text |") in card  # fmt: skip
    assert 'from_pretrained("me/base-mxfp4", device_map="auto")' in card and "import qwantize_hf" in card
    assert "## Evaluation" not in card and "{" not in card.split("```python")[0]


def test_card_for_block16_naive_with_license_and_note():
    config = MXFP4Config(block_size=16, scale_method="naive").to_dict()
    card = render_model_card(config, None, base_model_note="Random weights: a test.", license="apache-2.0")
    data = front_matter(card)
    assert "base_model" not in data and data["license"] == "apache-2.0"
    assert "| Bits per weight | 4.5 in quantized layers" in card and "the OCP MX v1.0 rule" in card
    assert "| Calibration | none (scales from the weights alone) |" in card
    assert "| Base model | not recorded |" in card and "Random weights: a test." in card


def test_card_eval_table():
    card = render_model_card(QUANT_CONFIG, "org/base", EVAL_RESULTS)
    assert "| Method | Perplexity | Δ vs bf16 | Gap to bf16 recovered | Bits / weight |" in card
    assert "| bf16 | 10.000 | +0.000 | n/a | 16 |" in card
    assert "| naive | 11.000 | +1.000 | 0.0% | 4.25 |" in card
    assert "| mse | 10.750 | +0.750 | 25.0% | 4.25 |" in card
    assert "WikiText-2 test split: 16384 tokens scored with a context of 2048 tokens, measured on 1x H100" in card
    assert "python eval/perplexity.py --model org/base" in card and EVAL_RESULTS["model_note"] in card


@pytest.mark.parametrize(
    "config, results, message",
    [
        ({**QUANT_CONFIG, "block_size": 8}, None, "block_size must be one of"),
        ({**QUANT_CONFIG, "scale_method": "max"}, None, "scale_method must be one of"),
        (QUANT_CONFIG, {"text": "no methods"}, "eval_results needs a 'methods' list"),
    ],
)
def test_card_refuses_bad_input(config, results, message):
    with pytest.raises(ValueError, match=message):
        render_model_card(config, "org/base", results)


# --------------------------------------------------------------------------- push_to_hub


class FakeHub:
    """Stands in for the Hub: records the repo created and every file of every commit."""

    def __init__(self) -> None:
        self.repos: list[str] = []
        self.commits: list[dict[str, bytes]] = []

    # Installed on HfApi as bound methods of this object, so they never see the HfApi instance.
    def create_repo(self, repo_id, **kwargs):
        self.repos.append(repo_id)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else source.read()
        self.commits.append(files)
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0",
            commit_message=kwargs.get("commit_message", ""),
            commit_description="",
            oid="0" * 40,
        )


@pytest.fixture
def fake_hub(monkeypatch) -> FakeHub:
    hub = FakeHub()

    def no_remote_card(*args, **kwargs):
        raise transformers_hub.EntryNotFoundError("no README.md in the repo yet")

    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", hub.create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", hub.create_commit)
    monkeypatch.setattr(ModelCard, "load", no_remote_card)
    return hub


@pytest.fixture
def quantized_model(tmp_path):
    source = save_random_model(FAMILIES["llama"](), tmp_path / "bf16")
    return AutoModelForCausalLM.from_pretrained(source, quantization_config=MXFP4Config())


def test_push_to_hub_uploads_weights_config_and_card(quantized_model, fake_hub):
    set_model_card_info(quantized_model, eval_results=EVAL_RESULTS, license="apache-2.0")
    quantized_model.push_to_hub("me/tiny-mxfp4")
    assert fake_hub.repos == ["me/tiny-mxfp4"]
    (files,) = fake_hub.commits
    assert sorted(files) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]

    card = files["README.md"].decode()
    assert front_matter(card)["license"] == "apache-2.0" and "mxfp4" in front_matter(card)["tags"]
    assert "| Bits per weight | 4.25 in quantized layers" in card and "| mse | 10.750 |" in card
    assert 'from_pretrained("me/tiny-mxfp4"' in card
    assert "automatically generated" not in card  # not transformers' generic card

    config = json.loads(files["config.json"])["quantization_config"]
    assert config["quant_method"] == "qwantize_mxfp4" and config["block_size"] == 32
    weights = Path(quantized_model.config.name_or_path).parent / "pushed.safetensors"
    weights.write_bytes(files["model.safetensors"])
    with safe_open(weights, "pt") as stored:
        packed = stored.get_tensor("model.layers.0.mlp.up_proj.weight")
        assert packed.dtype == torch.uint8 and packed.shape == (128, 32)
        assert torch.equal(packed, quantized_model.model.layers[0].mlp.up_proj.weight)


def test_write_model_card_next_to_saved_model(quantized_model, tmp_path):
    quantized_model.save_pretrained(tmp_path / "out")
    path = write_model_card(quantized_model, tmp_path / "out", repo_id="me/x")
    assert path.name == "README.md" and "qwantize_mxfp4" in path.read_text()


def test_save_pretrained_writes_the_card_and_config_names_the_package(quantized_model, tmp_path):
    # a checkpoint read without qwantize_hf must say what it needs: the card and config.json both do
    quantized_model.save_pretrained(tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "pip install qwantize_hf" in card and "import qwantize_hf" in card
    stored = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert stored["quantizer"]["package"] == "qwantize_hf" and "import qwantize_hf" in stored["quantizer"]["to_load"]
    # a second save refreshes our own card; a README of the user's own is never overwritten
    quantized_model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "README.md").read_text() == card
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("# my notes\n")
    quantized_model.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "README.md").read_text() == "# my notes\n"


def test_dequantized_model_pushes_no_mxfp4_card(quantized_model, fake_hub, tmp_path):
    quantized_model.dequantize()
    quantized_model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "README.md").exists()
    quantized_model.push_to_hub("me/tiny-plain")
    (files,) = fake_hub.commits
    assert "mxfp4" not in files["README.md"].decode()
    assert "quantization_config" not in json.loads(files["config.json"])


def test_hostile_strings_stay_inert_in_the_card():
    import ast
    import re

    hostile = "x) <script>alert(1)</script>\n# Pwned [link](https://evil) `code` | cell"
    config = {
        **QUANT_CONFIG,
        "modules_to_not_convert": ["lm_head", "a`b\n# Heading"],
        "calibration": {"dataset": "data`\n<img src=x onerror=alert(1)>", "calibrated": True},
    }
    eval_results = {
        "methods": [{"method": "mse <b>bold</b> | x", "perplexity": 1.0}],
        "text": hostile,
        "machine": hostile,
        "model_note": hostile,
        "command": "python x.py\n```\n# Pwned",
    }
    card = render_model_card(
        config, "evil/x) <script>", eval_results, base_model_note=hostile, repo_id='org/m", exec("import os")#\n'
    )
    body = card.split("---", 2)[2]
    # outside code spans (where HTML is shown as text) no tag survives unescaped
    prose = re.sub(r"`[^`\n]*`", "", body)
    assert "<script>" not in prose.replace("\\<script\\>", "") and "<img" not in prose.replace("\\<img", "")
    outside_fences = re.sub(r"(`{3,})[a-z]*\n.*?\n\1", "", body, flags=re.S)
    assert not any(line.startswith(("# Pwned", "# Heading")) for line in outside_fences.splitlines())
    assert "](https://evil)" not in body and "https://huggingface.co/evil" not in body
    # the usage snippet is valid Python whose only string is the repo id, as given
    snippet = re.search(r"```python\n(.*?)\n```", body, re.S).group(1)
    tree = ast.parse(snippet)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "from_pretrained"]
    assert calls[0].args[0].value == 'org/m", exec("import os")#\n'
    # the command stays inside its fence
    fence = re.search(r"Reproduce with:\n\n(`{3,})bash\n", body).group(1)
    assert len(fence) > 3 and body.rstrip().endswith(fence)
