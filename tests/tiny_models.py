"""Tiny causal LMs built from configs (random weights, a few hundred KB each) for the plugin tests.

Nothing here downloads anything: each model is built with ``from_config`` and
saved to a temporary folder as a bf16 checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config, Qwen2Config

VOCAB = 256
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)

# Llama: plain q/k/v/o + gate/up/down; Qwen2: q/k/v with biases; Phi3: fused qkv_proj and gate_up_proj.
FAMILIES = {
    "llama": lambda: LlamaConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "phi3": lambda: Phi3Config(**COMMON, pad_token_id=0),
}


def odd_llama_config() -> LlamaConfig:
    """One layer whose down_proj has in_features 80, not a multiple of 32 (nor of 16)."""
    return LlamaConfig(**{**COMMON, "num_hidden_layers": 1, "intermediate_size": 80})


def tied_llama_config() -> LlamaConfig:
    return LlamaConfig(**{**COMMON, "tie_word_embeddings": True})


def save_random_model(config, folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def linear_names(model: nn.Module) -> dict[str, nn.Module]:
    """Every module that is an nn.Linear or an MXFP4Linear, by name."""
    from qwantize_hf import MXFP4Linear

    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, MXFP4Linear))}


def input_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


def assert_same_tensors(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    """The same names, dtypes and bytes (state dicts, or safetensors files as loaded)."""
    assert expected.keys() == got.keys()
    for name in expected:
        assert expected[name].dtype == got[name].dtype and torch.equal(expected[name], got[name]), name


def statistics_of_ids(model: nn.Module, ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Mean square input feature of each named module over the rows of ``ids``, by keeping every input
    (no code shared with the library)."""
    inputs = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda module, args, output, name=name: inputs[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        )
        for name in names
    ]
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None], use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(inputs[name]).double().square().mean(dim=0).float() for name in names}


def random_token_statistics(
    path: Path, dtype: torch.dtype, tokens: int = 32768, seq_len: int = 1024, block_size: int = 32
) -> dict[str, torch.Tensor]:
    """What ``MXFP4Config()`` weighs each Linear's scale search with: the statistics of ``tokens // seq_len``
    sequences of token ids uniform over the vocabulary (seed 0), run through the model quantized with
    plain mse (``calibration=None``), as it is right after loading. Sequences are no longer than the
    model's context (``max_position_embeddings``: 128 here), with the token budget kept."""
    from qwantize_hf import MXFP4Config, MXFP4Linear

    plain = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=MXFP4Config(block_size=block_size, calibration=None)
    )
    vocab = plain.get_input_embeddings().num_embeddings
    seq_len = min(seq_len, plain.config.max_position_embeddings)
    ids = torch.randint(0, vocab, (tokens // seq_len, seq_len), generator=torch.Generator().manual_seed(0))
    names = [name for name, module in plain.named_modules() if isinstance(module, MXFP4Linear)]
    return statistics_of_ids(plain.eval(), ids, names)
