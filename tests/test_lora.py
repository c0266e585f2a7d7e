"""LoRA on a frozen MXFP4 base through PEFT (qwantize_hf.lora), and Trainer's acceptance of it.

The specification is the same adapter on the dequantized float layer: ``F.linear(x, dequantize(W), b) +
scaling * B(A(x))``. The fine-tune runs on real text (gensim's Lee news corpus, one byte a token for the
tiny models' 256-token vocabulary). CPU here; the same tests run on CUDA when there is one.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from qwantize_hf import MXFP4Config, MXFP4Linear
from tests.tiny_models import FAMILIES, input_ids, save_random_model

peft = pytest.importorskip("peft")
lora = pytest.importorskip("qwantize_hf.lora")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # weights of std 0.2 rather than 0.02: after the final RMSNorm, logits from a head of std 0.02 span
    # too little to fall far below log(256) whatever the adapters do
    config = FAMILIES["llama"]()
    config.initializer_range = 0.2
    return save_random_model(config, tmp_path_factory.mktemp("llama"))


def quantized(folder, dtype=torch.bfloat16, **kwargs):
    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=MXFP4Config(**kwargs), dtype=dtype, device_map=DEVICE
    )


def base_bytes(model) -> dict[str, torch.Tensor]:
    return {
        name.replace(".base_layer", ""): torch.cat([m.weight.flatten(), m.weight_scale.flatten()]).detach().cpu()
        for name, m in model.named_modules()
        if isinstance(m, MXFP4Linear)
    }


def real_text_batches(length: int = 64, batch: int = 4, steps: int = 40) -> list[torch.Tensor]:
    """Consecutive windows of the Lee corpus as byte ids."""
    from qwantize_hf.evaluation.data import embedded_calibration_file

    data = torch.tensor(list(embedded_calibration_file().read_bytes()[: length * batch * steps]), dtype=torch.long)
    return list(data.reshape(steps, batch, length))


def test_adapter_output_equals_the_dequantized_float_reference(checkpoint):
    model = quantized(checkpoint)
    peft_model = peft.get_peft_model(model, lora.lora_config(r=4, lora_alpha=8, target_modules=TARGETS))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, lora.MXFP4LoraLinear) and isinstance(layer.get_base_layer(), MXFP4Linear)
    with torch.no_grad():  # B starts at zero: give it values so the adapter's term counts
        layer.lora_B["default"].weight.normal_(0, 0.1)
    base = layer.get_base_layer()
    x = torch.randn(3, 5, base.in_features, device=DEVICE, dtype=torch.bfloat16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = F.linear(x.float(), base.dequantized_weight(torch.float32)) + 2.0 * (x.float() @ a.T @ b.T)
    torch.testing.assert_close(layer(x).float(), expected, atol=0.05, rtol=0.02)  # bf16 base product
    assert layer(x).dtype == torch.bfloat16


def test_only_the_adapters_train_and_input_gradients_reach_the_first_layer(checkpoint):
    model = quantized(checkpoint)
    peft_model = peft.get_peft_model(model, lora.lora_config(r=4, lora_alpha=8, target_modules=TARGETS))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert len(trainable) == 2 * len(TARGETS) * 2  # A and B, 7 targets, 2 layers
    ids = input_ids().to(DEVICE)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    # layer 0's adapters only get a gradient through every MXFP4 product of layer 1 (B: A's is zero while
    # B starts at zero)
    first = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in peft_model.named_parameters() if "lora_" not in n)


def test_lora_fine_tune_on_real_text_lowers_the_loss_and_leaves_the_base_bytes(checkpoint):
    torch.manual_seed(0)
    model = quantized(checkpoint)
    before_bytes = base_bytes(model)
    peft_model = peft.get_peft_model(model, lora.lora_config(r=8, lora_alpha=16, target_modules=TARGETS))
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:  # transformers before its rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batches = real_text_batches()
    losses = []
    for batch in batches:
        batch = batch.to(DEVICE)
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, losses
    after_bytes = base_bytes(model)
    assert after_bytes.keys() == before_bytes.keys()
    for name, stored in after_bytes.items():
        assert torch.equal(stored, before_bytes[name]), name


def adapted(checkpoint, targets, dtype=torch.bfloat16):
    """A PEFT model on the MXFP4 base whose adapters are not zero (B drawn at random), in eval mode, with
    its logits on ``input_ids()``."""
    peft_model = peft.get_peft_model(
        quantized(checkpoint, dtype=dtype), lora.lora_config(r=4, lora_alpha=8, target_modules=targets)
    )
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    peft_model.eval()
    ids = input_ids().to(DEVICE)
    with torch.no_grad():
        return peft_model, ids, peft_model(input_ids=ids).logits


def test_adapter_save_and_reload_gives_the_same_logits(checkpoint, tmp_path):
    peft_model, ids, expected = adapted(checkpoint, TARGETS)
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and "_custom_modules" not in saved
    reloaded = lora.load_lora_adapter(quantized(checkpoint), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=0, rtol=0)
    # without the registration PEFT refuses the layer, naming it
    with pytest.raises(ValueError, match="MXFP4Linear"):
        peft.PeftModel.from_pretrained(quantized(checkpoint), tmp_path / "adapter")


def test_merge_is_lossless_and_unmerge_restores_the_mxfp4_layer(checkpoint):
    model = quantized(checkpoint)
    peft_model = peft.get_peft_model(model, lora.lora_config(r=4, lora_alpha=8, target_modules=["q_proj"]))
    layer = peft_model.base_model.model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    base = layer.get_base_layer()
    expected = base.dequantized_weight(torch.float32) + layer.get_delta_weight("default")
    with pytest.warns(UserWarning, match="float nn.Linear"):
        layer.merge(safe_merge=True)
    merged = layer.get_base_layer()
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.bfloat16
    torch.testing.assert_close(merged.weight.float(), expected.to(torch.bfloat16).float(), atol=0, rtol=0)
    assert not any("_mxfp4_base" in name for name in layer.state_dict())
    layer.unmerge()
    assert layer.get_base_layer() is base and not layer.merged


def test_merge_and_dequantize_gives_a_float_model_that_saves_and_reloads(checkpoint, tmp_path):
    # float32: the merge itself rounds nothing away
    peft_model, ids, expected = adapted(checkpoint, ["q_proj", "v_proj"], dtype=torch.float32)
    with pytest.warns(UserWarning, match="float nn.Linear"):
        merged = lora.merge_and_dequantize(peft_model)
    assert not any(isinstance(m, MXFP4Linear) for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None
    with torch.no_grad():
        got = merged(input_ids=ids).logits.float()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32, device_map=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits.float(), got, atol=0, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"use_dora": True}, "use_dora=True needs the float base weight"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' initialises from the float base weight"),
        ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
    ],
)
def test_variants_that_need_the_float_weight_are_refused_by_name(checkpoint, kwargs, match):
    model = quantized(checkpoint)
    with pytest.raises(ValueError, match=match):
        peft.get_peft_model(model, lora.lora_config(r=4, target_modules=["q_proj"], **kwargs))


def test_register_lora_takes_only_a_lora_config():
    with pytest.raises(TypeError, match="peft.LoraConfig"):
        lora.register_lora(peft.IA3Config(target_modules=["q_proj"]))


def test_trainer_accepts_the_peft_model_and_trains_it(checkpoint, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = quantized(checkpoint)
    assert model.hf_quantizer.is_trainable
    peft_model = peft.get_peft_model(model, lora.lora_config(r=4, lora_alpha=8, target_modules=TARGETS))
    batches = real_text_batches(length=32, batch=1, steps=16)

    class Texts(torch.utils.data.Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, index):
            ids = batches[index][0]
            return {"input_ids": ids, "labels": ids}

    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=DEVICE == "cpu", bf16=False,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
    )  # fmt: skip
    before = base_bytes(model)
    result = Trainer(model=peft_model, args=args, train_dataset=Texts()).train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    after = base_bytes(model)
    assert after.keys() == before.keys() and all(torch.equal(t, before[n]) for n, t in after.items())


def test_trainer_still_refuses_a_quantized_model_without_adapters(checkpoint, tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=DEVICE == "cpu")
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=quantized(checkpoint), args=args)


def test_saving_a_model_whose_mxfp4_layers_were_merged_to_float_is_refused(checkpoint, tmp_path):
    model = quantized(checkpoint)
    peft_model = peft.get_peft_model(model, lora.lora_config(r=4, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="float nn.Linear"):
        merged = peft_model.merge_and_unload()
    with pytest.raises(ValueError, match=r"2 layer\(s\) loaded as MXFP4Linear are float now .*merge_and_dequantize"):
        merged.save_pretrained(tmp_path / "half")
    assert not (tmp_path / "half" / "model.safetensors").exists()


def test_peft_prepare_model_for_kbit_training_keeps_the_codes_and_trains(checkpoint):
    # the usual QLoRA preamble: it freezes everything and casts the float parameters to float32
    model = peft.prepare_model_for_kbit_training(quantized(checkpoint))
    before = base_bytes(model)
    assert all(p.dtype in (torch.uint8, torch.float32) for p in model.parameters())
    peft_model = peft.get_peft_model(model, lora.lora_config(r=4, lora_alpha=8, target_modules=TARGETS))
    ids = input_ids().to(DEVICE)
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert peft_model.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight.grad is not None
    after = base_bytes(model)
    assert after.keys() == before.keys() and all(torch.equal(t, before[n]) for n, t in after.items())
