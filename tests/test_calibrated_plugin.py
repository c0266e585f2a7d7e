"""Calibrated MXFP4 through from_pretrained: MXFP4Config(scale_method="mse", calibration=...).

Tiny Llama/Qwen2 models from configs and a character-level tokenizer built in
memory, so nothing is downloaded. Runs against whichever transformers is
installed (``make test-tf-oldest`` runs it on 5.17 too).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from qwantize_hf import MXFP4Config, MXFP4Linear, quantize_mxfp4
from qwantize_hf.config import CALIBRATION_DEFAULTS
from tests.tiny_models import (
    COMMON,
    FAMILIES,
    VOCAB,
    assert_same_tensors,
    input_ids,
    random_token_statistics,
    save_random_model,
    statistics_of_ids,
)

# Two different texts, so a test can tell which one a model was calibrated on.
CALIBRATION_TEXT = (
    "The committee met on Tuesday to discuss the budget for the new library. Members agreed that the "
    "reading rooms need more light, and that the children's section should open earlier on weekends. "
) * 6
OTHER_TEXT = "Rain fell over the harbour all night; by morning the boats were back at their moorings. " * 8
SEQ_LEN = 64
TOKENS = 256  # four sequences of SEQ_LEN


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (ids below the tiny models' vocabulary of 256)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{chr(code): code - 31 for code in range(32, 127)}}
    assert max(vocab.values()) < VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def request(**overrides) -> dict:
    calibration = {
        "dataset": [CALIBRATION_TEXT],
        "tokenizer": char_tokenizer(),
        "calibration_tokens": TOKENS,
        "calibration_seq_len": SEQ_LEN,
    }
    calibration.update(overrides)
    return calibration


def load_calibrated(path, **overrides):
    config = MXFP4Config(scale_method="mse", calibration=request(**overrides))
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    return {family: save_random_model(FAMILIES[family](), root / family) for family in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def calibrated_llama(checkpoints, tmp_path_factory):
    """A calibrated llama and the folder it was saved to."""
    model = load_calibrated(checkpoints["llama"])
    folder = tmp_path_factory.mktemp("calibrated") / "llama"
    model.save_pretrained(folder)
    return model, folder


def plain_mse() -> MXFP4Config:
    """Each weight quantized by itself as it loads: no statistics at all."""
    return MXFP4Config(calibration=None)


def eligible(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is nn.Linear and name != "lm_head"]


def direct_statistics(model: nn.Module, text: str, names: list[str]) -> dict[str, torch.Tensor]:
    """Mean square input feature of each named Linear over the calibration text's sequences."""
    ids = torch.tensor(char_tokenizer()(text)["input_ids"])[:TOKENS].reshape(-1, SEQ_LEN)
    return statistics_of_ids(model, ids, names)


# --------------------------------------------------------------------------- the bytes


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_calibrated_bytes_equal_quantize_with_direct_statistics(checkpoints, family):
    reference = AutoModelForCausalLM.from_pretrained(checkpoints[family]).eval()
    names = eligible(reference)
    stats = direct_statistics(reference, CALIBRATION_TEXT, names)
    model = load_calibrated(checkpoints[family])
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, MXFP4Linear)}
    assert sorted(quantized) == sorted(names)
    assert type(model.lm_head) is nn.Linear
    for name in names:
        linear = reference.get_submodule(name)
        packed, scales = quantize_mxfp4(linear.weight.detach(), weights=stats[name], name=name)
        assert torch.equal(quantized[name].weight, packed), name
        assert torch.equal(quantized[name].weight_scale, scales), name
        if linear.bias is not None:  # qwen2's q/k/v
            assert torch.equal(quantized[name].bias, linear.bias), name
    with torch.no_grad():
        assert torch.isfinite(model(input_ids()).logits).all()


def test_random_tokens_calibrate_without_text_or_tokenizer(checkpoints, tmp_path):
    # dataset="random-tokens": the ids are drawn from the model's vocabulary with a fixed seed and run
    # through the model as it quantized on load (plain mse), so the bytes are those of quantize_mxfp4
    # weighted by that model's statistics of exactly those ids.
    reference = AutoModelForCausalLM.from_pretrained(checkpoints["llama"]).eval()
    names = eligible(reference)
    stats = random_token_statistics(checkpoints["llama"], torch.bfloat16, TOKENS, SEQ_LEN)
    config = MXFP4Config(calibration={"dataset": "random-tokens", "calibration_tokens": TOKENS,
                                      "calibration_seq_len": SEQ_LEN})  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], quantization_config=config)
    for name in names:
        packed, scales = quantize_mxfp4(reference.get_submodule(name).weight.detach(), weights=stats[name])
        assert torch.equal(model.get_submodule(name).weight, packed), name
        assert torch.equal(model.get_submodule(name).weight_scale, scales), name
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["calibration"]
    assert record == {"dataset": "random-tokens", "seed": 0, "vocab_size": VOCAB, "calibration_tokens": TOKENS,
                      "calibration_seq_len": SEQ_LEN, "calibrated": True}  # fmt: skip
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_same_tensors(model.state_dict(), reloaded.state_dict())


def test_the_default_is_random_tokens_and_holds_no_float_model(checkpoints, monkeypatch):
    # MXFP4Config() quantizes as it loads (the Linears are never nn.Linear with float weights), then
    # quantizes each weight again, read from the checkpoint, with the random-token statistics.
    import qwantize_hf.replace as replace

    stats = random_token_statistics(checkpoints["qwen2"], torch.bfloat16)
    swapped_after_load = []
    monkeypatch.setattr(replace, "quantize_linears_with_weights", lambda *a, **k: swapped_after_load.append(a))
    model = AutoModelForCausalLM.from_pretrained(checkpoints["qwen2"], quantization_config=MXFP4Config())
    assert not swapped_after_load
    reference = AutoModelForCausalLM.from_pretrained(checkpoints["qwen2"])
    for name in eligible(reference):
        packed, scales = quantize_mxfp4(reference.get_submodule(name).weight.detach(), weights=stats[name])
        assert torch.equal(model.get_submodule(name).weight, packed), name
        assert torch.equal(model.get_submodule(name).weight_scale, scales), name
    assert model.config.quantization_config.calibration["dataset"] == "random-tokens"
    # and it is not plain mse
    plain = AutoModelForCausalLM.from_pretrained(checkpoints["qwen2"], quantization_config=plain_mse())
    assert plain.config.quantization_config.calibration is None
    assert any(not torch.equal(model.get_submodule(n).weight_scale, plain.get_submodule(n).weight_scale)
               for n in eligible(reference))  # fmt: skip


def test_float_weights_that_cannot_be_read_back_leave_plain_mse_and_say_so(checkpoints, monkeypatch, caplog, tmp_path):
    import qwantize_hf.read_back as read_back

    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], quantization_config=plain_mse())
    stored = [str(checkpoints["llama"] / "model.safetensors")]

    def reader(files, names):
        return read_back.float_weight_reader(files, model, names, block_size=32, dtype=torch.bfloat16)

    reader(stored, ["model.layers.0.mlp.up_proj"])  # the checkpoint it came from reads back
    with pytest.raises(read_back.FloatWeightsUnavailable, match="not a .safetensors file"):
        reader([str(tmp_path / "pytorch_model.bin")], ["model.layers.0.mlp.up_proj"])
    with pytest.raises(read_back.FloatWeightsUnavailable, match="has no tensor model.layers.0.mlp.nope.weight"):
        reader(stored, ["model.layers.0.mlp.nope"])
    with pytest.raises(read_back.FloatWeightsUnavailable, match="did not come from checkpoint files"):
        reader(None, ["model.layers.0.mlp.up_proj"])
    # a checkpoint whose tensor is not the one the model loaded (here: another model's) is refused
    other = AutoModelForCausalLM.from_pretrained(checkpoints["qwen2"], quantization_config=plain_mse())
    with pytest.raises(read_back.FloatWeightsUnavailable, match="is not the weight model.layers.0.mlp.up_proj"):
        read_back.float_weight_reader(
            stored, other, ["model.layers.0.mlp.up_proj"], block_size=32, dtype=torch.bfloat16
        )

    def unreadable(*args, **kwargs):
        raise read_back.FloatWeightsUnavailable("the checkpoint renames its tensors")

    monkeypatch.setattr(read_back, "float_weight_reader", unreadable)
    with caplog.at_level("WARNING", logger="qwantize_hf.quantizer"):
        fallback = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], quantization_config=MXFP4Config())
    assert "the checkpoint renames its tensors" in caplog.text and "calibration=None" in caplog.text
    assert fallback.config.quantization_config.calibration is None  # the record says what was done
    plain = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], quantization_config=plain_mse())
    assert_same_tensors(plain.state_dict(), fallback.state_dict())


def test_another_text_gives_other_statistics(checkpoints):
    # The bytes above follow the calibration text, not some fixed weighting.
    reference = AutoModelForCausalLM.from_pretrained(checkpoints["llama"]).eval()
    names = eligible(reference)
    ours = direct_statistics(reference, CALIBRATION_TEXT, names)
    other = direct_statistics(reference, OTHER_TEXT, names)
    assert not torch.equal(ours[names[0]], other[names[0]])
    model = load_calibrated(checkpoints["llama"], dataset=[OTHER_TEXT])
    for name in names:
        packed, scales = quantize_mxfp4(reference.get_submodule(name).weight.detach(), weights=other[name])
        assert torch.equal(model.get_submodule(name).weight_scale, scales), name


def test_uniform_statistics_give_the_plain_mse_bytes(checkpoints, monkeypatch):
    import qwantize_hf.calibration as calibration

    def uniform(model, sequences, module_names, **kwargs):
        return {n: torch.full((model.get_submodule(n).in_features,), 0.37) for n in module_names}

    plain = AutoModelForCausalLM.from_pretrained(checkpoints["qwen2"], quantization_config=plain_mse())
    monkeypatch.setattr(calibration, "collect_activation_stats", uniform)
    calibrated = load_calibrated(checkpoints["qwen2"])
    assert_same_tensors(plain.state_dict(), calibrated.state_dict())

    # Strongly skewed statistics move some scales: the weights reach the search.
    def skewed(model, sequences, module_names, **kwargs):
        out = {}
        for n in module_names:
            weights = torch.ones(model.get_submodule(n).in_features)
            weights[::32] = 1e6
            out[n] = weights
        return out

    monkeypatch.setattr(calibration, "collect_activation_stats", skewed)
    moved = load_calibrated(checkpoints["qwen2"])
    assert any(
        not torch.equal(m.weight_scale, plain.get_submodule(n).weight_scale)
        for n, m in moved.named_modules()
        if isinstance(m, MXFP4Linear)
    )


# --------------------------------------------------------------------------- save, reload, config.json


def test_config_json_records_the_calibration_and_no_text(calibrated_llama):
    model, folder = calibrated_llama
    raw = (folder / "config.json").read_text()
    stored = json.loads(raw)["quantization_config"]
    record = stored["calibration"]
    assert record["calibrated"] is True
    assert record["dataset"] == "1 text(s) given in memory"
    assert record["calibration_tokens"] == TOKENS and record["calibration_seq_len"] == SEQ_LEN
    assert len(record["text_sha256"]) == 64
    assert isinstance(record["tokenizer"], str)
    assert stored["scale_method"] == "mse" and stored["modules_to_not_convert"] == ["lm_head"]
    assert "committee" not in raw  # the calibration text never reaches config.json
    assert model.config.quantization_config.calibration == record
    # The record reads back as a record, which is never run again.
    again = MXFP4Config.from_dict(stored)
    assert not again.calibrates and again.to_dict() == stored


def test_reload_is_bit_identical_without_recalibrating(calibrated_llama, monkeypatch):
    model, folder = calibrated_llama

    def refuse(*args, **kwargs):
        raise AssertionError("a calibrated checkpoint must load without calibrating or quantizing again")

    monkeypatch.setattr("qwantize_hf.calibration.calibration_inputs", refuse)
    monkeypatch.setattr("qwantize_hf.calibration.collect_activation_stats", refuse)
    monkeypatch.setattr("qwantize_hf.replace.quantize_mxfp4", refuse)
    monkeypatch.setattr("qwantize_hf.read_back.quantize_mxfp4", refuse)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert_same_tensors(model.state_dict(), reloaded.state_dict())
    with torch.no_grad():
        assert torch.equal(model(input_ids()).logits, reloaded(input_ids()).logits)
    assert reloaded.config.quantization_config.calibration == model.config.quantization_config.calibration


def test_a_request_serializes_without_text_or_tokenizer_and_the_users_config_is_untouched(checkpoints):
    tokenizer = char_tokenizer()
    config = MXFP4Config(calibration=request(tokenizer=tokenizer))
    summary = config.to_dict()["calibration"]
    assert summary == {
        "dataset": "1 text(s) given in memory",
        "tokenizer": type(tokenizer).__name__,
        "calibration_tokens": TOKENS,
        "calibration_seq_len": SEQ_LEN,
    }
    assert "committee" not in config.to_json_string()
    AutoModelForCausalLM.from_pretrained(checkpoints["llama"], quantization_config=config)
    # The quantizer worked on its own copy, sharing (not copying) the tokenizer.
    assert config.calibrates and config.calibration["tokenizer"] is tokenizer


def test_defaults_and_tokenizer_by_path_and_text_file(checkpoints, tmp_path):
    assert MXFP4Config(calibration=request()).calibration["calibration_tokens"] == TOKENS
    defaults = MXFP4Config(calibration={"dataset": ["x"], "tokenizer": "org/tok"}).calibration
    assert {k: defaults[k] for k in CALIBRATION_DEFAULTS} == CALIBRATION_DEFAULTS
    char_tokenizer().save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "calibration.txt").write_text(CALIBRATION_TEXT)
    by_path = load_calibrated(
        checkpoints["llama"], dataset=str(tmp_path / "calibration.txt"), tokenizer=str(tmp_path / "tokenizer")
    )
    in_memory = load_calibrated(checkpoints["llama"])
    for name, module in in_memory.named_modules():
        if isinstance(module, MXFP4Linear):
            assert torch.equal(by_path.get_submodule(name).weight_scale, module.weight_scale), name
    record = by_path.config.quantization_config.calibration
    assert record["dataset"] == "local text file calibration.txt" and record["tokenizer"] == "tokenizer"
    assert record["text_sha256"] == in_memory.config.quantization_config.calibration["text_sha256"]


def test_dataset_name_goes_through_datasets(checkpoints, tmp_path, monkeypatch):
    folder = tmp_path / "corpus"  # a local `datasets` folder: the "text" builder reads it offline
    folder.mkdir()
    (folder / "train.txt").write_text(CALIBRATION_TEXT)
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ImportError, match="pip install datasets"):
            load_calibrated(checkpoints["llama"], dataset=str(folder))
        return
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    model = load_calibrated(checkpoints["llama"], dataset=str(folder))
    assert model.config.quantization_config.calibration["dataset"] == f"local dataset folder {folder.name}"
    assert str(folder) not in json.dumps(model.config.quantization_config.to_dict())  # no local path leaks
    assert isinstance(model.model.layers[0].mlp.down_proj, MXFP4Linear)


# --------------------------------------------------------------------------- offloaded models


def test_offloaded_layers_calibrate_to_the_same_bytes(checkpoints, calibrated_llama, tmp_path):
    # Accelerate's hooks run the calibration: the embedding and layer 1 are read from disk
    # at forward time, and their quantized bytes are then kept in the hooks' weights maps.
    model, _ = calibrated_llama
    device_map = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk"}
    device_map.update({"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"})
    config = MXFP4Config(calibration=request())
    offloaded = AutoModelForCausalLM.from_pretrained(
        checkpoints["llama"], quantization_config=config, device_map=device_map, offload_folder=tmp_path / "offload"
    )
    up = offloaded.model.layers[1].mlp.up_proj
    assert isinstance(up, MXFP4Linear) and up.weight.device.type == "meta" and up.weight.dtype == torch.uint8
    with torch.no_grad():
        assert torch.equal(offloaded(input_ids()).logits, model(input_ids()).logits)
    offloaded.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded[key], value), key


def test_device_map_auto_plans_with_float_sizes(checkpoints, tmp_path):
    # The float model is held while calibrating, so max_memory must be planned for it.
    full = AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    budget = full.get_memory_footprint() * 9 // 10
    model = AutoModelForCausalLM.from_pretrained(
        checkpoints["llama"],
        quantization_config=MXFP4Config(calibration=request()),
        device_map="auto",
        max_memory={"cpu": budget, "disk": "1GB"},
        offload_folder=tmp_path,
    )
    assert "disk" in model.hf_device_map.values()
    assert all(isinstance(m, MXFP4Linear) for n, m in model.named_modules() if n.endswith("mlp.up_proj"))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"calibration": request(dataset=[""])}, ValueError, "is empty"),
        ({"calibration": request(dataset=["  ", "\n"])}, ValueError, "is empty"),
        ({"calibration": request(dataset="")}, ValueError, "empty string"),
        ({"calibration": request(dataset=[1, 2])}, TypeError, "must hold only strings"),
        ({"calibration": request(dataset=torch.ones(3))}, TypeError, "list of texts"),
        ({"calibration": {"tokenizer": "org/tok"}}, ValueError, "needs a 'dataset'"),
        ({"calibration": {"dataset": ["text"]}}, ValueError, "needs a 'tokenizer'"),
        ({"calibration": request(tokenizer=None)}, ValueError, "needs a 'tokenizer'"),
        ({"calibration": request(tokenizer=3)}, TypeError, "must be a tokenizer"),
        ({"calibration": request(calibration_tokens=32)}, ValueError, "fewer than one sequence"),
        ({"calibration": request(calibration_seq_len=0)}, ValueError, "must be a positive int"),
        ({"calibration": request(calibration_tokens=True)}, ValueError, "must be a positive int"),
        ({"calibration": request(seq_len=8)}, ValueError, r"unknown key\(s\) \['seq_len'\]"),
        ({"calibration": request(), "scale_method": "naive"}, ValueError, "scale_method='mse'"),
        ({"calibration": request(), "scale_method": "even"}, ValueError, "drop calibration"),
        ({"calibration": request(dataset="random-tokens")}, ValueError, "takes no tokenizer"),
    ],
)
def test_bad_calibration_requests_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        MXFP4Config(**kwargs)


def test_text_shorter_than_one_sequence_fails_at_load(checkpoints):
    with pytest.raises(ValueError, match=r"has 20 tokens \(budget 256\), fewer than one sequence of 64"):
        load_calibrated(checkpoints["llama"], dataset=["twenty characters..."])


def test_empty_text_file_fails_at_load(checkpoints, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="local text file empty.txt\\) holds no text"):
        load_calibrated(checkpoints["llama"], dataset=str(tmp_path / "empty.txt"))


def test_a_record_is_not_a_request(checkpoints, calibrated_llama):
    _, folder = calibrated_llama
    record = json.loads((folder / "config.json").read_text())["quantization_config"]["calibration"]
    with pytest.raises(ValueError, match="record of a calibration that already ran"):
        AutoModelForCausalLM.from_pretrained(checkpoints["llama"], quantization_config=MXFP4Config(calibration=record))


def test_linears_that_are_not_a_multiple_of_the_block_stay_float(tmp_path):
    folder = save_random_model(LlamaConfig(**{**COMMON, "num_hidden_layers": 1, "intermediate_size": 80}), tmp_path)
    model = load_calibrated(folder)
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, MXFP4Linear)
    assert "model.layers.0.mlp.down_proj" in model.config.quantization_config.modules_to_not_convert


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_calibration_on_the_gpu_matches_the_cpu_bytes(checkpoints, calibrated_llama):
    model, _ = calibrated_llama
    config = MXFP4Config(calibration=request())
    on_gpu = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], quantization_config=config, device_map="cuda")
    for name, module in model.named_modules():
        if isinstance(module, MXFP4Linear):
            gpu_module = on_gpu.get_submodule(name)
            assert gpu_module.weight.is_cuda
            # Statistics summed on another device may differ in the last bits; the scales rarely do.
            agreement = (gpu_module.weight_scale.cpu() == module.weight_scale).float().mean()
            assert agreement > 0.99, name
