"""qwantize_hf <-> compressed-tensors MXFP4 (the layout vLLM serves), checked against the compressed-tensors
package itself and transformers' loading path for it, on a tiny Llama built from a config (CPU)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors import ModelCompressor, MXFP4PackedCompressor
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationStatus,
    apply_quantization_config,
    preset_name_to_scheme,
)
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, GenerationConfig, LlamaConfig, LlamaForCausalLM

from qwantize_hf import MXFP4Config, MXFP4Linear, dequantize_mxfp4, quantize_mxfp4
from qwantize_hf.constants import E8M0_MAX, F4_E2M1_SIGN_BIT, F4_NIBBLE_BITS, F4_NIBBLE_MASK
from qwantize_hf.integrations.cli import main as cli_main
from qwantize_hf.integrations.compressed_tensors import (
    CT_VERIFIED_VERSION,
    ct_mxfp4_quantization_config,
    from_compressed_tensors,
    model_to_compressed_tensors,
    to_compressed_tensors,
)
from tests.tiny_models import COMMON as TINY_COMMON

# One quantizable Linear is left in bf16 on purpose, so `ignore` holds more than lm_head.
NOT_CONVERTED = ["model.layers.1.mlp.down_proj", "lm_head"]
SIDE_FILES = {
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}\n',
    "tokenizer_config.json": b'{"model_max_length": 64}\n',
    "special_tokens_map.json": b'{"bos_token": "<s>"}\n',
}
INPUT_IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 127, 2, 3, 40, 41, 42]])


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    # biases must travel unchanged
    config = LlamaConfig(**{**TINY_COMMON, "vocab_size": 128, "attention_bias": True, "tie_word_embeddings": tie})
    torch.manual_seed(0)
    # Built as from_pretrained builds it (bf16 weights, float32 rotary buffers), so logits compare exactly.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.1)
    return model


def quantize_in_place(model: LlamaForCausalLM, block_size: int = 32) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Quantize every Linear but NOT_CONVERTED; the model keeps the dequantized weights (our reference)."""
    quantized = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name not in NOT_CONVERTED:
            packed, scales = quantize_mxfp4(module.weight.data, block_size=block_size, scale_method="mse")
            module.weight.data = dequantize_mxfp4(packed, scales, block_size=block_size, dtype=torch.bfloat16)
            quantized[name] = (packed, scales)
    return quantized


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_our_checkpoint(model, quantized, folder: Path, *, shards: int = 1, block_size: int = 32) -> Path:
    """What save_pretrained of a qwantize_hf model writes: <m>.weight codes, <m>.weight_scale, the rest as is."""
    folder.mkdir(parents=True)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    for module, (packed, scales) in quantized.items():
        state[f"{module}.weight"], state[f"{module}.weight_scale"] = packed, scales
    if shards == 1:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        # Alternate sorted names, so a module's codes and scales land in different shards.
        files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
        weight_map = {name: files[i % shards] for i, name in enumerate(sorted(state))}
        for file in files:
            shard = {name: tensor for name, tensor in state.items() if weight_map[name] == file}
            save_file(shard, folder / file, metadata={"format": "pt"})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}}
        write_json(folder / "model.safetensors.index.json", {**index, "weight_map": weight_map})
    config = model.config.to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    config["quantization_config"] = MXFP4Config(
        block_size=block_size, scale_method="mse", modules_to_not_convert=NOT_CONVERTED
    ).to_dict()
    write_json(folder / "config.json", config)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(folder)
    for name, content in SIDE_FILES.items():
        (folder / name).write_bytes(content)
    return folder


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def quantization_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def zero_sign_cleared(packed: torch.Tensor) -> torch.Tensor:
    """Codes with negative zero (sign bit only) turned into +0; every other code unchanged."""
    low, high = packed & F4_NIBBLE_MASK, packed >> F4_NIBBLE_BITS
    low = torch.where(low == F4_E2M1_SIGN_BIT, 0, low)
    high = torch.where(high == F4_E2M1_SIGN_BIT, 0, high)
    return low | (high << F4_NIBBLE_BITS)


def written_by_compressed_tensors(model, quantized, folder: Path) -> Path:
    """The package's own MXFP4A16 path (llm-compressor's save): our scales in, its packing and config out."""
    model = copy.deepcopy(model)
    scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    config = QuantizationConfig(
        config_groups={"group_0": scheme}, ignore=NOT_CONVERTED, quantization_status=QuantizationStatus.FROZEN
    )
    apply_quantization_config(model, config, show_progress=False)
    for name, module in model.named_modules():
        if name in quantized:
            scale_bytes = quantized[name][1].to(torch.int32)
            module.weight_scale.data = torch.exp2((scale_bytes - 127).float()).to(module.weight_scale.dtype)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    return folder


@pytest.fixture(scope="module")
def reference():
    model = tiny_llama()
    quantized = quantize_in_place(model)
    return model, quantized


@pytest.fixture(scope="module")
def ours_dir(reference, tmp_path_factory):
    return write_our_checkpoint(*reference, tmp_path_factory.mktemp("ours") / "model")


@pytest.fixture(scope="module")
def exported_dir(ours_dir, tmp_path_factory):
    return to_compressed_tensors(ours_dir, tmp_path_factory.mktemp("exported") / "model")


@pytest.fixture(scope="module")
def ct_dir(reference, tmp_path_factory):
    return written_by_compressed_tensors(*reference, tmp_path_factory.mktemp("ct") / "model")


def test_export_matches_what_compressed_tensors_writes(exported_dir, ct_dir):
    ours, theirs = quantization_config(exported_dir), quantization_config(ct_dir)
    assert ours.pop("version") == CT_VERIFIED_VERSION
    theirs.pop("version")
    assert ours == theirs
    assert ours["ignore"] == NOT_CONVERTED
    ours_tensors, theirs_tensors = read_tensors(exported_dir), read_tensors(ct_dir)
    assert sorted(ours_tensors) == sorted(theirs_tensors)
    n_packed = 0
    for name, tensor in ours_tensors.items():
        other = theirs_tensors[name]
        assert (tensor.dtype, tensor.shape) == (other.dtype, other.shape), name
        if not name.endswith(".weight_packed"):
            assert torch.equal(tensor, other), name
            continue
        n_packed += 1
        # compressed-tensors' CPU packer clears the sign bit of codes that are zero (we keep it, as the hardware
        # conversion does); that is the only difference, and both decode to zero.
        assert torch.equal(zero_sign_cleared(tensor), zero_sign_cleared(other)), name
        assert torch.equal(zero_sign_cleared(tensor), other), name
    assert n_packed == 13


def test_compressed_tensors_decompression_equals_ours_bit_for_bit(exported_dir, reference):
    scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    tensors = read_tensors(exported_dir)
    _, quantized = reference
    for module in quantized:
        packed, scales = tensors[f"{module}.weight_packed"], tensors[f"{module}.weight_scale"]
        theirs = MXFP4PackedCompressor.decompress({"weight_packed": packed, "weight_scale": scales}, scheme)["weight"]
        ours = dequantize_mxfp4(packed, scales, dtype=torch.bfloat16)
        assert torch.equal(theirs.view(torch.int16), ours.view(torch.int16)), module


def test_decompression_agrees_on_every_code_and_every_finite_scale_byte():
    # Every byte of codes (both nibbles, both signs of zero) under every scale byte 0..254, including the
    # bf16 subnormals at the bottom and the overflow to infinity at the top.
    scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    packed = torch.arange(256, dtype=torch.uint8).repeat(E8M0_MAX + 1, 1)
    scales = torch.arange(E8M0_MAX + 1, dtype=torch.uint8)[:, None].repeat(1, 256 * 2 // 32)
    theirs = MXFP4PackedCompressor.decompress({"weight_packed": packed, "weight_scale": scales}, scheme)["weight"]
    ours = dequantize_mxfp4(packed, scales, dtype=torch.bfloat16)
    assert torch.equal(theirs.view(torch.int16), ours.view(torch.int16))


@pytest.mark.parametrize("dequantize", [False, True], ids=["compressed-then-hook", "dequantize-at-load"])
def test_transformers_compressed_tensors_loading_gives_our_logits(exported_dir, reference, dequantize):
    model, _ = reference
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    loaded = AutoModelForCausalLM.from_pretrained(exported_dir, dtype=torch.bfloat16, **kwargs).eval()
    # The folder holds only weight_packed for these: a load that bypassed compressed-tensors would fail or
    # leave them random, so equal logits also show that its MXFP4 path did the loading.
    up_proj = loaded.model.layers[0].mlp.up_proj
    assert dequantize or up_proj.weight_packed.dtype == torch.uint8
    with torch.no_grad():
        theirs = loaded(INPUT_IDS).logits
        ours = model(INPUT_IDS).logits
    assert torch.equal(theirs, ours)


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_then_import_gives_back_every_file_byte_for_byte(tmp_path, shards, tie):
    model = tiny_llama(tie=tie)
    quantized = quantize_in_place(model)
    ours = write_our_checkpoint(model, quantized, tmp_path / "ours", shards=shards)
    exported = to_compressed_tensors(ours, tmp_path / "ct")
    assert "model.layers.0.mlp.up_proj.weight_packed" in read_tensors(exported)
    assert "model.layers.0.mlp.up_proj.weight" not in read_tensors(exported)
    back = from_compressed_tensors(exported, tmp_path / "back", scale_method="mse")
    assert file_bytes(back) == file_bytes(ours)


def test_side_files_are_copied(ours_dir, exported_dir):
    for name in [*SIDE_FILES, "generation_config.json"]:
        assert (exported_dir / name).read_bytes() == (ours_dir / name).read_bytes()
    config, original = (json.loads((d / "config.json").read_text()) for d in (exported_dir, ours_dir))
    config.pop("quantization_config"), original.pop("quantization_config")
    assert config == original


def test_import_of_a_checkpoint_written_by_compressed_tensors(ct_dir, reference, tmp_path):
    _, quantized = reference
    imported = from_compressed_tensors(ct_dir, tmp_path / "imported")
    expected = MXFP4Config(block_size=32, scale_method="even", modules_to_not_convert=NOT_CONVERTED)
    assert quantization_config(imported) == expected.to_dict()
    tensors, written = read_tensors(imported), read_tensors(ct_dir)
    assert len(tensors) == len(written)
    for module, (packed, scales) in quantized.items():
        assert torch.equal(tensors.pop(f"{module}.weight_scale"), scales)
        assert torch.equal(tensors.pop(f"{module}.weight"), zero_sign_cleared(packed))
    # Everything else (biases, norms, embeddings, unquantized Linears) is carried over unchanged.
    for name, tensor in tensors.items():
        assert torch.equal(tensor, written[name]), name


def test_import_accepts_scales_typed_e8m0(ct_dir, reference, tmp_path):
    # Same bytes, typed float8_e8m0fnu instead of uint8 (as some writers store E8M0).
    typed = tmp_path / "typed"
    typed.mkdir()
    for path in ct_dir.iterdir():
        if path.suffix != ".safetensors":
            (typed / path.name).write_bytes(path.read_bytes())
    tensors = read_tensors(ct_dir)
    retyped = {
        name: t.view(torch.float8_e8m0fnu) if name.endswith(".weight_scale") else t for name, t in tensors.items()
    }
    save_file(retyped, typed / "model.safetensors", metadata={"format": "pt"})
    imported = read_tensors(from_compressed_tensors(typed, tmp_path / "imported"))
    for module, (_, scales) in reference[1].items():
        assert imported[f"{module}.weight_scale"].dtype == torch.uint8
        assert torch.equal(imported[f"{module}.weight_scale"], scales)


def ct_checkpoint_of_scheme(folder: Path, preset: str, fmt: str, status: str = "compressed") -> Path:
    """config.json of a compressed-tensors checkpoint of another scheme (refused before any tensor is read)."""
    folder.mkdir()
    qconfig = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])}, format=fmt, quantization_status=status
    ).model_dump(mode="json")
    qconfig["config_groups"]["group_0"]["format"] = fmt
    write_json(folder / "config.json", {"architectures": ["LlamaForCausalLM"], "quantization_config": qconfig})
    return folder


@pytest.mark.parametrize(
    ("preset", "fmt"),
    [("NVFP4", "nvfp4-pack-quantized"), ("W4A16", "pack-quantized"), ("FP8_DYNAMIC", "float-quantized")],
)
def test_import_refuses_other_compressed_tensors_schemes(tmp_path, preset, fmt):
    src = ct_checkpoint_of_scheme(tmp_path / preset, preset, fmt)
    with pytest.raises(ValueError, match=rf"group 'group_0' is format '{fmt}'.*not MXFP4"):
        from_compressed_tensors(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_refuses_uncompressed_and_non_ct_checkpoints(tmp_path, ours_dir):
    src = ct_checkpoint_of_scheme(tmp_path / "frozen", "MXFP4A16", "mxfp4-pack-quantized", status="frozen")
    with pytest.raises(ValueError, match="quantization_status 'frozen'"):
        from_compressed_tensors(src, tmp_path / "out")
    with pytest.raises(ValueError, match="quant_method 'qwantize_mxfp4', expected 'compressed-tensors'"):
        from_compressed_tensors(ours_dir, tmp_path / "out")


def test_import_of_mxfp4_with_dynamic_activations_warns_and_keeps_weights(ct_dir, tmp_path, caplog):
    w4a4 = tmp_path / "w4a4"
    w4a4.mkdir()
    for path in ct_dir.iterdir():
        (w4a4 / path.name).write_bytes(path.read_bytes())
    config = json.loads((w4a4 / "config.json").read_text())
    mxfp4 = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("MXFP4", ["Linear"])})
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = mxfp4.model_dump(mode="json")[
        "config_groups"
    ]["group_0"]["input_activations"]
    write_json(w4a4 / "config.json", config)
    with caplog.at_level(logging.WARNING):
        imported = from_compressed_tensors(w4a4, tmp_path / "imported")
    assert "keeps activations in bf16" in caplog.text
    assert read_tensors(imported).keys() == read_tensors(from_compressed_tensors(ct_dir, tmp_path / "plain")).keys()


def test_export_refuses_block_size_16_and_foreign_checkpoints(tmp_path, ct_dir):
    model = tiny_llama()
    src = write_our_checkpoint(model, quantize_in_place(model, block_size=16), tmp_path / "bs16", block_size=16)
    with pytest.raises(ValueError, match="block_size 16.*only have blocks of 32"):
        to_compressed_tensors(src, tmp_path / "out")
    with pytest.raises(ValueError, match="from_compressed_tensors"):
        to_compressed_tensors(ct_dir, tmp_path / "out")


def test_export_refuses_a_non_empty_output_folder_unless_told(ours_dir, tmp_path):
    out = tmp_path / "out"
    to_compressed_tensors(ours_dir, out)
    with pytest.raises(FileExistsError, match="overwrite"):
        to_compressed_tensors(ours_dir, out)
    to_compressed_tensors(ours_dir, out, overwrite=True)
    with pytest.raises(ValueError, match="is the input folder"):
        to_compressed_tensors(ours_dir, ours_dir, overwrite=True)


def test_plugin_loads_an_llm_compressor_checkpoint_as_mxfp4linear(ct_dir, reference, tmp_path):
    model, quantized = reference
    imported = from_compressed_tensors(ct_dir, tmp_path / "imported")
    loaded = AutoModelForCausalLM.from_pretrained(imported, dtype=torch.bfloat16).eval()
    for name, module in loaded.named_modules():
        if name in quantized:
            assert isinstance(module, MXFP4Linear), name
            assert torch.equal(module.weight_scale, quantized[name][1])
    for name in NOT_CONVERTED:
        assert type(loaded.get_submodule(name)) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(loaded(INPUT_IDS).logits, model(INPUT_IDS).logits)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_of_a_loaded_plugin_model(tmp_path, tie):
    tiny_llama(tie=tie).save_pretrained(tmp_path / "bf16")
    config = MXFP4Config(modules_to_not_convert=NOT_CONVERTED)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", quantization_config=config).eval()
    from_model = model_to_compressed_tensors(model, tmp_path / "from_model")
    # The same bytes as saving the model and converting the folder.
    model.save_pretrained(tmp_path / "saved")
    from_folder = to_compressed_tensors(tmp_path / "saved", tmp_path / "from_folder")
    assert (from_model / "model.safetensors").read_bytes() == (from_folder / "model.safetensors").read_bytes()
    assert quantization_config(from_model) == quantization_config(from_folder) == ct_mxfp4_quantization_config(
        NOT_CONVERTED
    )
    assert (from_model / "generation_config.json").is_file()
    # transformers' compressed-tensors path on the export computes what the plugin model computes.
    served = AutoModelForCausalLM.from_pretrained(from_model, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.equal(served(INPUT_IDS).logits, model(INPUT_IDS).logits)


def test_cli_both_directions_and_refusal(ours_dir, tmp_path, caplog):
    assert cli_main(["to-compressed-tensors", str(ours_dir), str(tmp_path / "ct")]) == 0
    assert quantization_config(tmp_path / "ct") == ct_mxfp4_quantization_config(NOT_CONVERTED)
    back = ["from-compressed-tensors", str(tmp_path / "ct"), str(tmp_path / "back"), "--scale-method", "mse"]
    assert cli_main(back) == 0
    assert file_bytes(tmp_path / "back") == file_bytes(ours_dir)
    nvfp4 = ct_checkpoint_of_scheme(tmp_path / "nvfp4", "NVFP4", "nvfp4-pack-quantized")
    with caplog.at_level(logging.ERROR):
        assert cli_main(["from-compressed-tensors", str(nvfp4), str(tmp_path / "x")]) == 1
    assert "NVFP4" in caplog.text


@pytest.mark.parametrize("hostile", ["../elsewhere/model-00001-of-00003.safetensors", "/abs/model.safetensors", ".."])
def test_shard_names_that_leave_the_folder_are_refused_both_ways(tmp_path, hostile):
    model = tiny_llama(tie=False)
    ours = write_our_checkpoint(model, quantize_in_place(model), tmp_path / "ours", shards=3)
    exported = to_compressed_tensors(ours, tmp_path / "ct")
    for folder, convert in ((ours, to_compressed_tensors), (exported, from_compressed_tensors)):
        index_path = folder / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        index["weight_map"][next(iter(index["weight_map"]))] = hostile
        index_path.write_text(json.dumps(index))
        with pytest.raises(ValueError, match="not a plain file name"):
            convert(folder, tmp_path / "out")
        # nothing outside (or inside) was written or changed
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p != index_path} == {
            p: b for p, b in before.items() if p != index_path
        }


def test_a_mixture_of_experts_checkpoint_exports_each_expert_and_ignores_the_routers(tmp_path, caplog):
    # vLLM (read from its source, not run here) maps experts.<e>.{gate,up,down}_proj.weight_packed/weight_scale
    # onto its fused experts, and builds a float router only when `ignore` names it
    from transformers import Qwen3MoeConfig

    from tests.tiny_models import save_random_model

    config = Qwen3MoeConfig(**TINY_COMMON, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2)
    folder = save_random_model(config, tmp_path / "float")
    AutoModelForCausalLM.from_pretrained(folder, quantization_config=MXFP4Config(calibration=None)).save_pretrained(
        tmp_path / "ours"
    )
    with caplog.at_level(logging.WARNING):
        to_compressed_tensors(tmp_path / "ours", tmp_path / "ct")
    assert "are not Linear layers" not in caplog.text
    qconfig = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qconfig["ignore"] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate", "lm_head"]
    ours, exported = read_tensors(tmp_path / "ours"), read_tensors(tmp_path / "ct")
    for layer in range(2):
        for expert in range(4):
            for projection in ("gate_proj", "up_proj", "down_proj"):
                name = f"model.layers.{layer}.mlp.experts.{expert}.{projection}"
                assert torch.equal(exported[f"{name}.weight_packed"], ours[f"{name}.weight"])
                assert torch.equal(exported[f"{name}.weight_scale"], ours[f"{name}.weight_scale"])
