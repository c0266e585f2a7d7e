"""eval/bench_generate.py's CUDA-graph decode loop on the CPU (without the graph): the static
cache, the compiled step's call and the cache-position bookkeeping work with the installed
transformers, and too few new tokens for the loop are refused up front."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import LlamaForCausalLM

from tests.conftest import load_eval_script
from tests.tiny_models import FAMILIES

bench_generate = load_eval_script("bench_generate.py")


@pytest.fixture(scope="module")
def tiny_mxfp4_llama():
    config = FAMILIES["llama"]()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert bench_generate.quantize_decoder_linears(model) == 2 * 7
    return model


def test_graph_loop_steps_fill_the_cache_without_overflow(tiny_mxfp4_llama):
    # prompt 8 + 6 new tokens: the prefill, 3 warm-up steps, 1 untimed and 1 timed step use
    # positions 0..12 of a 14-position static cache.
    args = types.SimpleNamespace(prompt_tokens=8, new_tokens=6)
    rate = bench_generate.graph_decode_tok_s(tiny_mxfp4_llama, 2, args, backend="eager")
    assert rate != rate  # NaN: nothing is timed without a GPU


@pytest.mark.parametrize("shorter", [1, 2])
def test_graph_loop_uses_the_cache_up_to_its_last_position(tiny_mxfp4_llama, monkeypatch, shorter):
    """With the cache 1 position shorter the loop still fits (positions 0..12), with 2 shorter
    its last step has no slot: the loop writes exactly the positions it should."""
    real = bench_generate.StaticCache
    monkeypatch.setattr(
        bench_generate,
        "StaticCache",
        lambda config, max_cache_len: real(config=config, max_cache_len=max_cache_len - shorter),
    )
    args = types.SimpleNamespace(prompt_tokens=8, new_tokens=6)
    if shorter == 1:
        bench_generate.graph_decode_tok_s(tiny_mxfp4_llama, 2, args, backend="eager")
    else:
        with pytest.raises(IndexError, match="index 12 is out of bounds"):
            bench_generate.graph_decode_tok_s(tiny_mxfp4_llama, 2, args, backend="eager")


def test_graph_loop_refuses_too_few_new_tokens(tiny_mxfp4_llama):
    args = types.SimpleNamespace(prompt_tokens=8, new_tokens=5)
    with pytest.raises(ValueError, match="needs --new-tokens of at least 6, got 5"):
        bench_generate.graph_decode_tok_s(tiny_mxfp4_llama, 1, args, backend="eager")


def test_a_mixture_of_experts_model_quantizes_and_decodes_through_the_loop():
    """The MoE path of the script (``--model qwen3-30b-a3b-8l`` at full size on the GPU): a tiny Qwen3-MoE's
    Linears and experts become MXFP4, its experts run as qwantize_mxfp4, and the compiled decode loop runs."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from qwantize_hf.experts import IMPLEMENTATION, is_mxfp4_experts
    from tests.tiny_models import COMMON

    config = Qwen3MoeConfig(**COMMON, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).eval()
    assert bench_generate.quantize_decoder_linears(model) == 2 * 4  # q/k/v/o: the router is not a Linear
    assert bench_generate.quantize_experts(model) == 2
    assert all(is_mxfp4_experts(layer.mlp.experts) for layer in model.model.layers)
    assert model.config._experts_implementation == IMPLEMENTATION
    args = types.SimpleNamespace(prompt_tokens=8, new_tokens=8)
    assert torch.isnan(torch.tensor(bench_generate.graph_decode_tok_s(model, 2, args, backend="eager")))
    assert set(bench_generate.MOE_CONFIGS) == {"qwen3-30b-a3b-8l"}
