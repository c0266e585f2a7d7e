"""Activation statistics for the mse-act column: coverage, values, and the uniform-weights identity."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from qwantize_hf.calibration import calibration_sequences, collect_activation_stats, eligible_linear_names
from tests.tiny_models import COMMON, VOCAB, tied_llama_config

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_model(config=None):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config or LlamaConfig(**COMMON), dtype=torch.float32).eval()


def token_ids(n: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def test_eligible_linears_are_every_projection_and_not_the_head():
    names = eligible_linear_names(tiny_model(), 32)
    layers = COMMON["num_hidden_layers"]
    expected = {
        f"model.layers.{i}.{'self_attn' if p in PROJECTIONS[:4] else 'mlp'}.{p}"
        for i in range(layers)
        for p in PROJECTIONS
    }
    assert set(names) == expected
    assert "lm_head" not in eligible_linear_names(tiny_model(tied_llama_config()), 32)


def test_hooks_see_every_eligible_linear_and_are_removed():
    model = tiny_model()
    names = eligible_linear_names(model, 32)
    stats = collect_activation_stats(model, calibration_sequences(token_ids(96), 32), names, progress=False)
    assert set(stats) == set(names)
    for name in names:
        module = model.get_submodule(name)
        assert stats[name].shape == (module.in_features,) and stats[name].dtype == torch.float32
        assert bool((stats[name] > 0).all())
        assert not module._forward_pre_hooks


def test_statistics_equal_a_direct_computation_over_all_sequences():
    model = tiny_model()
    sequences = calibration_sequences(token_ids(100), 24)
    assert len(sequences) == 4  # 100 tokens → 4 whole sequences of 24, the rest dropped
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj"]
    stats = collect_activation_stats(model, sequences, names, progress=False)
    squares = []
    with torch.no_grad():
        for ids in sequences:
            # layer 0's attention input: the input RMSNorm of the embeddings
            hidden = model.model.embed_tokens(ids[None])
            squares.append(model.model.layers[0].input_layernorm(hidden)[0].double().square())
    direct = torch.cat(squares).mean(dim=0).float()
    torch.testing.assert_close(stats[names[0]], direct, rtol=1e-5, atol=0)
    assert torch.equal(stats[names[0]], stats[names[1]])  # same input, same statistics


def test_too_little_calibration_text_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one sequence of 64"):
        calibration_sequences(token_ids(50), 64)
    with pytest.raises(ValueError, match="fewer than one sequence of 64"):
        calibration_sequences(token_ids(500), 64, max_tokens=32)
    with pytest.raises(ValueError, match="one flat sequence"):
        calibration_sequences(token_ids(64)[None], 64)


def test_hooks_are_removed_when_the_forward_fails():
    model = tiny_model()
    names = eligible_linear_names(model, 32)
    bad = [torch.tensor([VOCAB + 5, 1, 2])]  # an id past the embedding table
    with pytest.raises(IndexError):
        collect_activation_stats(model, bad, names, progress=False)
    assert all(not model.get_submodule(n)._forward_pre_hooks for n in names)


def test_the_token_budget_bounds_the_text_read(tmp_path):
    from qwantize_hf.calibration import DATASET_CHARS_PER_TOKEN, calibration_text

    big = "word " * 100_000
    (tmp_path / "big.txt").write_text(big)
    for source in (str(tmp_path / "big.txt"), [big, big], [None, "short", big]):
        text = calibration_text(source, max_tokens=100)
        assert len(text) == 100 * DATASET_CHARS_PER_TOKEN
    assert calibration_text(["a", None, "b"], max_tokens=100) == "a\n\nb"  # missing rows are skipped
