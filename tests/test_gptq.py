"""GPTQ-style MXFP4 (qwantize_hf.gptq) and its layer-by-layer pipeline (qwantize_hf.sequential)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qwantize_hf import dequantize_mxfp4, quantize_mxfp4
from qwantize_hf.constants import E8M0_MAX_QUANTIZE
from qwantize_hf.format import E2M1_MIDPOINTS, e2m1_magnitude_index
from qwantize_hf.gptq import _BOUNDARIES, block_weights, gptq_quantize, inverse_hessian_factor, magnitude_index
from qwantize_hf.norm_fits import (
    final_norm_of,
    kl_divergence,
    layerwise_backward,
    norm_parameters,
    output_head_of,
    relative_error,
)
from qwantize_hf.sequential import _hessians, gptq_sequential, linear_groups
from tests.mx_values import adversarial, block_sse_f64


def correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=gen) / k**0.5
    scales = 2.0 ** torch.randint(-3, 3, (k,), generator=gen).float()
    return (torch.randn(n, k, generator=gen) @ mixing + 0.3 * torch.randn(n, k, generator=gen)) * scales


def output_error(x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> float:
    q = dequantize_mxfp4(packed, scales, dtype=torch.float32)
    return float((x.double() @ (w.double() - q.double()).T).square().sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_identity_hessian_gives_plain_mse_bytes(dtype):
    # Nothing is fed back and every column weighs the same: exactly quantize_mxfp4(scale_method="mse").
    w = adversarial(16, 128, 32, dtype, seed=1)
    w = torch.where(torch.isfinite(w), w, 0.0).to(dtype)
    expected = quantize_mxfp4(w, scale_method="mse", backend="torch")
    got = gptq_quantize(w, torch.eye(128))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_hessian_weighted_scale_is_minimal_over_all_bytes():
    # The first block sees no feedback: its bytes must minimise sum_j (x_j - q_j)^2 / U_jj^2 over
    # every finite byte the quantizer may emit, not only e0-1..e0+1 (float64 brute force).
    # float16's range: feedback of errors near float32's largest value would overflow
    w = adversarial(24, 64, 32, torch.float16, seed=2).float()
    x = correlated_inputs(256, 64, seed=3)
    hessian = x.T @ x
    packed, scales = gptq_quantize(w, hessian)
    column_weights = block_weights(torch.diagonal(inverse_hessian_factor(hessian, 0.01, "w"))[:32])
    assert column_weights is not None and float(column_weights.max() / column_weights.min()) > 2
    for row in range(w.shape[0]):
        block = w[row, :32].double()
        chosen = block_sse_f64(block, int(scales[row, 0]), column_weights.double())
        best = min(block_sse_f64(block, e, column_weights.double()) for e in range(E8M0_MAX_QUANTIZE + 1))
        assert chosen <= best * (1 + 1e-6) + 1e-300, (row, int(scales[row, 0]))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_the_layer_output(act_order):
    w = torch.randn(48, 192, generator=torch.Generator().manual_seed(4))
    x = correlated_inputs(1024, 192, seed=5)
    packed, scales = gptq_quantize(w, x.T @ x, act_order=act_order)
    rtn = quantize_mxfp4(w, scale_method="mse")
    assert output_error(x, w, packed, scales) < 0.85 * output_error(x, w, *rtn)
    # an ordinary MXFP4 tensor: codes sit on the grid of the stored scales
    assert packed.shape == (48, 96) and scales.shape == (48, 6)
    assert torch.isfinite(dequantize_mxfp4(packed, scales, dtype=torch.float32)).all()


def test_float16_weights_near_its_max_stay_finite_in_float16():
    # GPTQ works on a float32 copy; its scales must still fit the weight's own dtype.
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(8)).half()
    w[:, 0], w[:4, 33] = 60000.0, -65504.0
    x = correlated_inputs(256, 64, seed=9)
    packed, scales = gptq_quantize(w, x.T @ x)
    assert int(scales.max()) <= 140
    assert torch.isfinite(dequantize_mxfp4(packed, scales, dtype=torch.float16)).all()


def test_dead_input_features_are_rounded_alone():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    x = correlated_inputs(256, 64, seed=7)
    x[:, 40:] = 0  # features 40..63 never see an input
    packed, scales = gptq_quantize(w, x.T @ x)
    q = dequantize_mxfp4(packed, scales, dtype=torch.float32)
    # the dead columns of the second block are still quantized (finite, on the grid), not dropped
    assert torch.isfinite(q).all() and q[:, 40:].abs().sum() > 0


def test_one_launch_magnitude_index_is_the_formats():
    # every midpoint, the float32 values either side of it, zero, tiny, huge and random values
    midpoints = torch.tensor(E2M1_MIDPOINTS)
    q = torch.cat([
        midpoints,
        torch.nextafter(midpoints, torch.tensor(float("inf"))),
        torch.nextafter(midpoints, torch.tensor(0.0)),
        torch.tensor([0.0, 1e-45, 1e-30, 5.999, 6.0, 6.5, 1e30, float("inf")]),
        torch.rand(4096, generator=torch.Generator().manual_seed(10)) * 8,
    ])  # fmt: skip
    boundaries = torch.tensor(_BOUNDARIES, dtype=torch.float32)
    assert torch.equal(magnitude_index(q, boundaries), e2m1_magnitude_index(q))


def test_bad_hessians():
    w = torch.randn(4, 32)
    with pytest.raises(ValueError, match="shape"):
        gptq_quantize(w, torch.eye(16))
    # no input ever reached the layer: every feature is dead, so each column is rounded alone (plain mse)
    expected = quantize_mxfp4(w, scale_method="mse")
    got = gptq_quantize(w, torch.zeros(32, 32))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(w, torch.full((32, 32), float("nan")))


# --------------------------------------------------------------------------- the pipeline


class Block(nn.Module):
    """A decoder-like layer: two projections read the same input, a third reads their product."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gate = nn.Linear(width, 2 * width, bias=False)
        self.up = nn.Linear(width, 2 * width, bias=False)
        self.down = nn.Linear(2 * width, width, bias=False)

    def forward(self, hidden, scale=None):
        return hidden + self.down(torch.tanh(self.gate(hidden)) * self.up(hidden)) * scale


class TinyLM(nn.Module):
    def __init__(self, width: int = 32, layers: int = 3, vocab: int = 50) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(layers))

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=False):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, scale=0.5)
        return hidden


class NormBlock(Block):
    """Block with a LayerNorm in front of its projections, as decoder layers have."""

    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.norm = nn.LayerNorm(width)

    def forward(self, hidden, scale=None):
        x = self.norm(hidden)
        return hidden + self.down(torch.tanh(self.gate(x)) * self.up(x)) * scale


def tiny_lm(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def sequences(count: int = 4, length: int = 16) -> list[torch.Tensor]:
    return list(torch.randint(0, 50, (count, length), generator=torch.Generator().manual_seed(9)))


def test_linears_that_read_one_input_share_one_hessian_equal_to_the_direct_sum():
    torch.manual_seed(5)
    layer = Block(32)
    hidden = [torch.randn(1, 6, 32) for _ in range(2)]
    got = _hessians(layer, ["gate", "up", "down"], [(h, {"scale": 0.5}) for h in hidden], torch.device("cpu"))
    assert got["gate"] is got["up"]  # summed once, by the first of the two
    seen = []
    handle = layer.down.register_forward_pre_hook(lambda module, args: seen.append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        for h in hidden:
            layer(h, scale=0.5)
    handle.remove()
    for name, xs in (("gate", [h.reshape(-1, 32) for h in hidden]), ("down", seen)):
        torch.testing.assert_close(got[name], sum(x.T @ x for x in xs) / 12, rtol=1e-5, atol=1e-6)


def test_groups_follow_the_forward_and_shared_inputs():
    model = tiny_lm()
    hidden = model.embed(sequences()[0][None]).detach()
    groups = linear_groups(model.layers[0], {"gate": "g", "up": "u", "down": "d"}, [(hidden, {"scale": 0.5})], "cpu")
    assert groups == [["gate", "up"], ["down"]]


def test_each_layer_is_calibrated_on_the_quantized_outputs_of_the_layers_before():
    names = [f"layers.{i}.{p}" for i in range(3) for p in ("gate", "up", "down")]
    model = tiny_lm()
    # tune_norms off: the replay below sets only the earlier layers' weights
    results = gptq_sequential(model, sequences(), names, block_size=32, device=torch.device("cpu"), tune_norms=False)
    assert sorted(results) == sorted(names)
    # Replay: the Hessian of layer 2's inputs must come from layers 0-1 holding their MXFP4 weights.
    # Quantizing layer 2 alone on a copy whose earlier layers are quantized the same way gives the same
    # bytes; on a copy whose earlier layers stayed bf16 (float) it gives other bytes.
    for earlier_quantized in (True, False):
        replay = tiny_lm()
        if earlier_quantized:
            for name in names[:6]:
                replay.get_submodule(name).weight.data = dequantize_mxfp4(*results[name], dtype=torch.float32)
        again = gptq_sequential(
            replay, sequences(), names[6:], block_size=32, device=torch.device("cpu"), tune_norms=False
        )
        same = all(torch.equal(again[n][0], results[n][0]) and torch.equal(again[n][1], results[n][1])
                   for n in names[6:])
        assert same == earlier_quantized


def test_pipeline_leaves_dequantized_weights_and_refuses_linears_outside_the_layers():
    model = tiny_lm()
    names = ["layers.0.gate", "layers.0.up", "layers.0.down"]
    results = gptq_sequential(model, sequences(), names, block_size=32, device=torch.device("cpu"))
    for name in names:
        assert torch.equal(model.get_submodule(name).weight, dequantize_mxfp4(*results[name], dtype=torch.float32))
    with pytest.raises(ValueError, match="no modules"):
        gptq_sequential(tiny_lm(), sequences(), [], block_size=32)
    with pytest.raises(ValueError, match="at least one calibration sequence"):
        gptq_sequential(tiny_lm(), [], names, block_size=32)


def test_a_linear_off_the_forward_path_is_a_clear_error():
    model = tiny_lm()
    model.layers[1].unused = nn.Linear(32, 32, bias=False)
    names = ["layers.0.gate", "layers.1.unused"]
    with pytest.raises(RuntimeError, match="saw no input during calibration.*layers.1.unused"):
        gptq_sequential(model, sequences(), names, block_size=32, device=torch.device("cpu"))


def test_tuned_norms_bring_the_quantized_model_closer_to_the_float_one():
    names = [f"layers.{i}.{p}" for i in range(3) for p in ("gate", "up", "down")]
    float_model = tiny_lm()
    float_model.layers = nn.ModuleList(NormBlock(32) for _ in range(3))
    with torch.no_grad():
        target = torch.stack([float_model(ids[None]) for ids in sequences()])
    errors, norms, layer_0 = {}, {}, {}
    for tuned in (False, True):
        model = copy.deepcopy(float_model)
        cpu = torch.device("cpu")
        results = gptq_sequential(model, sequences(), names, block_size=32, device=cpu, tune_norms=tuned)
        with torch.no_grad():
            errors[tuned] = float((torch.stack([model(ids[None]) for ids in sequences()]) - target).square().sum())
        norms[tuned] = [layer.norm.weight.detach().clone() for layer in model.layers]
        layer_0[tuned] = [results[name][0] for name in names[:3]]
    # layer 0 is quantized before anything is tuned: the same bytes either way
    assert all(torch.equal(a, b) for a, b in zip(layer_0[False], layer_0[True]))
    # only the norms moved, and the model's output on its calibration data came closer to the float model's
    assert all(not torch.equal(a, b) for a, b in zip(norms[False], norms[True]))
    assert errors[True] < errors[False]
    assert sorted(norm_parameters(float_model.layers[0])) == ["norm.bias", "norm.weight"]


class NormedLM(TinyLM):
    """TinyLM with norms in its layers and a final norm after them, as a Llama has."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(NormBlock(32) for _ in range(3))
        self.norm = nn.LayerNorm(32)

    def forward(self, input_ids, use_cache=False):
        return self.norm(super().forward(input_ids))


def test_the_final_norm_is_found_and_tuned_too():
    torch.manual_seed(1)
    model = NormedLM()
    assert final_norm_of(model, "layers") is model.norm
    assert final_norm_of(tiny_lm(), "layers") is None
    before = model.norm.weight.detach().clone()
    names = [f"layers.{i}.{p}" for i in range(3) for p in ("gate", "up", "down")]
    gptq_sequential(model, sequences(), names, block_size=32, device=torch.device("cpu"))
    assert not torch.equal(model.norm.weight, before)


class HeadedLM(NormedLM):
    """NormedLM with an LM head after the final norm: it returns logits."""

    def __init__(self, vocab: int = 50) -> None:
        super().__init__()
        self.lm_head = nn.Linear(32, vocab, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, use_cache=False):
        return self.lm_head(super().forward(input_ids))


def test_the_final_norm_is_fitted_to_the_float_models_next_token_distributions():
    torch.manual_seed(2)
    float_model = HeadedLM()
    assert output_head_of(float_model) is float_model.lm_head and output_head_of(NormedLM()) is None
    with torch.no_grad():
        target = [float_model(ids[None]) for ids in sequences()]
    names = [f"layers.{i}.{p}" for i in range(3) for p in ("gate", "up", "down")]
    kl, head = {}, {}
    for tuned in (False, True):
        model = copy.deepcopy(float_model)
        gptq_sequential(model, sequences(), names, block_size=32, device=torch.device("cpu"), tune_norms=tuned)
        with torch.no_grad():
            kl[tuned] = sum(float(kl_divergence(model(ids[None]), t)) for ids, t in zip(sequences(), target))
        head[tuned] = model.lm_head.weight.detach().clone()
    assert kl[True] < kl[False]
    assert torch.equal(head[True], float_model.lm_head.weight)  # the head is read, never changed
    assert torch.equal(head[False], head[True])


def test_fit_losses_weigh_every_token_the_same_and_vanish_at_the_target():
    target = torch.randn(2, 5, 8)
    assert float(relative_error(target, target)) == 0.0 and float(kl_divergence(target, target)) == 0.0
    # one token 100x larger than the rest (an attention sink) does not rule the relative error
    target[:, 0] *= 100
    out = target.clone()
    out[:, 1:] *= 1.1  # 10% off on the other 4 tokens of each sequence: 1% relative squared error each
    assert float(relative_error(out, target)) == pytest.approx(0.01 * 4 / 5, rel=1e-4)



def test_the_head_is_quantized_last_on_the_final_norms_outputs_of_the_quantized_model():
    torch.manual_seed(3)
    float_model = HeadedLM()
    model = copy.deepcopy(float_model)
    names = [f"layers.{i}.{p}" for i in range(3) for p in ("gate", "up", "down")] + ["lm_head"]
    results = gptq_sequential(model, sequences(), names, block_size=32, device=torch.device("cpu"),
                              end_to_end_norms=False)  # fmt: skip
    # the head's Hessian: the (tuned) final norm's outputs on the hidden states of the quantized layers
    hessian, count = torch.zeros(32, 32), 0
    with torch.no_grad():
        for ids in sequences():
            x = NormedLM.forward(model, ids[None]).reshape(-1, 32)
            hessian.addmm_(x.T, x)
            count += x.shape[0]
    expected = gptq_quantize(float_model.lm_head.weight, hessian / count, block_size=32, act_order=True)
    assert torch.equal(results["lm_head"][0], expected[0]) and torch.equal(results["lm_head"][1], expected[1])
    float_hessian = torch.zeros(32, 32)
    with torch.no_grad():
        for ids in sequences():
            x = NormedLM.forward(float_model, ids[None]).reshape(-1, 32)
            float_hessian.addmm_(x.T, x)
    assert not torch.equal(gptq_quantize(float_model.lm_head.weight, float_hessian / count, block_size=32,
                                         act_order=True)[0], expected[0])  # fmt: skip
    assert torch.equal(model.lm_head.weight, dequantize_mxfp4(*results["lm_head"], block_size=32))
    # any other Linear outside the decoder layers is still refused
    model = HeadedLM()
    model.side = nn.Linear(32, 32, bias=False)
    with pytest.raises(ValueError, match="outside the decoder layers.*'side'"):
        gptq_sequential(model, sequences(), ["layers.0.gate", "side"], block_size=32, device=torch.device("cpu"))


def test_the_layerwise_backward_gives_the_gradients_of_the_whole_graph():
    torch.manual_seed(4)
    model = HeadedLM()
    target = torch.randn(1, 16, 50)
    hidden = model.embed(sequences()[0][None]).detach()
    layers = list(model.layers)
    masters = [{n: p.detach().clone().requires_grad_(True) for n, p in norm_parameters(layer).items()}
               for layer in layers]  # fmt: skip

    def output_loss(x):
        return kl_divergence(model.lm_head(model.norm(x)), target)

    loss = layerwise_backward(layers, masters, hidden, {"scale": 0.5}, output_loss, torch.device("cpu"))
    got = [{n: m.grad.clone() for n, m in d.items()} for d in masters]
    for d in masters:
        for m in d.values():
            m.grad = None
    x = hidden
    for layer, layer_masters in zip(layers, masters):
        x = torch.func.functional_call(layer, {**dict(layer.named_parameters()), **layer_masters}, (x,), {"scale": 0.5})
    whole = output_loss(x)
    whole.backward()
    assert loss == pytest.approx(float(whole.detach()), rel=1e-6)
    for expected, actual in zip(masters, got):
        for name, master in expected.items():
            torch.testing.assert_close(actual[name], master.grad, rtol=1e-5, atol=1e-7)


def test_end_to_end_norms_bring_the_model_closer_than_the_layer_wise_fits_alone():
    torch.manual_seed(2)
    float_model = HeadedLM()
    with torch.no_grad():
        target = [float_model(ids[None]) for ids in sequences()]
    names = [f"layers.{i}.{p}" for i in range(3) for p in ("gate", "up", "down")]
    kl, results, norms = {}, {}, {}
    for end_to_end in (False, True):
        model = copy.deepcopy(float_model)
        results[end_to_end] = gptq_sequential(model, sequences(), names, block_size=32, device=torch.device("cpu"),
                                              end_to_end_norms=end_to_end)  # fmt: skip
        with torch.no_grad():
            kl[end_to_end] = sum(float(kl_divergence(model(ids[None]), t)) for ids, t in zip(sequences(), target))
        norms[end_to_end] = [p.detach().clone() for n, p in model.named_parameters() if "norm" in n]
    assert kl[True] < kl[False]
    # the fit comes after every weight is quantized: the same bytes, other norms
    assert all(torch.equal(results[False][n][i], results[True][n][i]) for n in names for i in (0, 1))
    assert all(not torch.equal(a, b) for a, b in zip(norms[False], norms[True]))
    # the head is the float one and is never changed; the target is the float model, not the tuned one
    assert torch.equal(model.lm_head.weight, float_model.lm_head.weight)
