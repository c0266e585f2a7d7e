"""The perplexity eval: windows, token NLL against hand computations, identical token sets, outputs, cards."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qwantize_hf import evaluation
from qwantize_hf.calibration import eligible_linear_names
from qwantize_hf.evaluation import nll
from tests.tiny_models import COMMON, VOCAB, save_random_model


def byte_tokenizer():
    """A byte-level tokenizer with exactly VOCAB (256) ids, built offline from the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    assert len(alphabet) == VOCAB
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def tiny_llama(seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**COMMON), dtype=torch.float32).eval()


# --------------------------------------------------------------------------- windows


def hf_guide_targets(n: int, context_length: int, stride: int) -> list[list[int]]:
    """The scored positions per window, written as the transformers perplexity guide's loop."""
    scored, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context_length, n)
        trg_len = end - prev_end
        # labels[:, :-trg_len] = -100, and the causal shift drops the window's first label
        positions = [p for p in range(end - trg_len, end) if p > begin]
        scored.append(positions)
        prev_end = end
        if end == n:
            break
    return scored


@pytest.mark.parametrize(("n", "context_length", "stride"), [(100, 16, 8), (97, 16, 16), (50, 64, 8), (33, 8, 3)])
def test_windows_score_every_position_once_as_the_hf_guide(n, context_length, stride):
    windows = evaluation.sliding_windows(n, context_length, stride)
    assert [list(range(w.scored_begin, w.end)) for w in windows] == hf_guide_targets(n, context_length, stride)
    # Overlapping windows score every position but the first; disjoint ones also skip each window's first token.
    unscored = {0} if stride < context_length else set(range(0, n, stride))
    assert evaluation.scored_positions(windows).tolist() == [p for p in range(n) if p not in unscored]
    assert all(w.end - w.begin <= context_length and w.scored_begin > w.begin for w in windows)


def test_windows_refuse_a_stride_that_would_skip_tokens():
    with pytest.raises(ValueError, match="stride must be in 1..context_length"):
        evaluation.sliding_windows(100, 16, 17)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluation.sliding_windows(1, 16, 8)


# --------------------------------------------------------------------------- NLL


def hand_nll(model, ids: torch.Tensor, context_length: int, stride: int) -> tuple[float, int]:
    """Mean NLL by the definition: for each scored position, -log softmax(logits of its window)[token], in float64."""
    total, count = 0.0, 0
    for positions, begin in zip(hf_guide_targets(len(ids), context_length, stride), range(0, len(ids), stride)):
        window = ids[begin : begin + context_length]
        with torch.no_grad():
            logits = model(input_ids=window[None]).logits[0].double()
        for p in positions:
            row = logits[p - begin - 1]
            total += float(torch.logsumexp(row, 0) - row[ids[p]])
            count += 1
    return total / count, count


@pytest.mark.parametrize(("context_length", "stride"), [(32, 16), (24, 24), (40, 7)])
def test_perplexity_equals_hand_computed_mean_token_nll(context_length, stride):
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (150,), generator=torch.Generator().manual_seed(3))
    windows = evaluation.sliding_windows(len(ids), context_length, stride)
    result = evaluation.token_nll(model, ids, windows, progress=False)
    expected_mean, expected_count = hand_nll(model, ids, context_length, stride)
    assert result.tokens_scored == expected_count
    assert result.mean_nll == pytest.approx(expected_mean, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected_mean), rel=1e-5)


def test_a_model_with_zero_logits_has_perplexity_equal_to_the_vocabulary_size():
    model = tiny_llama()
    torch.nn.init.zeros_(model.lm_head.weight)
    ids = torch.randint(0, VOCAB, (90,), generator=torch.Generator().manual_seed(4))
    result = evaluation.token_nll(model, ids, evaluation.sliding_windows(90, 32, 16), progress=False)
    assert result.perplexity == pytest.approx(VOCAB, rel=1e-6)


# --------------------------------------------------------------------------- the comparison run


TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.\n"
) * 8
CALIBRATION = "A different text for the activation statistics, about rivers, mountains and weather.\n" * 8


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("tiny-llama")
    save_random_model(LlamaConfig(**COMMON), folder)
    byte_tokenizer().save_pretrained(folder)
    text = folder / "eval.txt"
    text.write_text(TEXT)
    calibration = folder / "calibration.txt"
    calibration.write_text(CALIBRATION)
    settings = evaluation.RunSettings(
        model=str(folder),
        text=[str(text)],
        context_length=64,
        stride=32,
        tokens=400,
        dtype="float32",
        device="cpu",
        calibration_text=[str(calibration)],
        calibration_tokens=256,
        calibration_seq_len=64,
        progress=False,
    )
    return settings, evaluation.run_comparison(settings)


def test_every_method_scores_the_same_tokens_and_the_json_has_the_card_schema(tiny_run):
    settings, run = tiny_run
    assert [m["method"] for m in run["methods"]] == [
        "bf16", "naive", "even", "mse", "mse-random", "mse-random-head", "mse-act", "gptq"
    ]  # fmt: skip
    assert {m["tokens_scored"] for m in run["methods"]} == {settings.tokens} == {run["tokens_scored"]}
    for key in ("model", "model_note", "text", "tokens_scored", "context_length", "stride", "machine", "versions",
                "command", "methods"):
        assert key in run
    for m in run["methods"]:
        assert set(m) >= {"method", "perplexity", "delta_vs_bf16", "gap_recovered", "bits_per_weight",
                          "tokens_scored", "wall_time_s"}
        assert math.isfinite(m["perplexity"])
    by = {m["method"]: m for m in run["methods"]}
    assert by["bf16"]["delta_vs_bf16"] == 0 and by["bf16"]["bits_per_weight"] == 16
    assert by["naive"]["bits_per_weight"] == 4.25 and by["mse"]["bits_per_weight"] == 4.25
    assert by["bf16"]["gap_recovered"] is None and by["naive"]["gap_recovered"] is None
    naive_gap = by["naive"]["perplexity"] - by["bf16"]["perplexity"]
    if naive_gap > 0:
        expected = (by["naive"]["perplexity"] - by["mse"]["perplexity"]) / naive_gap
        assert by["mse"]["gap_recovered"] == pytest.approx(expected)
    json.dumps(run)  # serialisable as written


def test_a_method_scoring_other_positions_is_refused(tiny_run, monkeypatch):
    settings, _ = tiny_run
    real = evaluation.token_nll

    def shifted(model, input_ids, windows, **kwargs):
        result = real(model, input_ids, windows, **kwargs)
        if kwargs.get("desc") == "naive":
            result.positions = result.positions + 1
        return result

    monkeypatch.setattr(nll, "token_nll", shifted)  # where the data-parallel scorer looks it up
    quick = evaluation.RunSettings(**{**vars(settings), "methods": ["naive"], "tokens": 100})
    with pytest.raises(RuntimeError, match="naive scored other token positions"):
        evaluation.run_comparison(quick)


def test_per_layer_report_matches_a_direct_computation(tiny_run):
    from transformers import AutoModelForCausalLM

    from qwantize_hf import dequantize_mxfp4, quantize_mxfp4

    settings, run = tiny_run
    reference = AutoModelForCausalLM.from_pretrained(settings.model, dtype=torch.bfloat16)
    names = eligible_linear_names(reference, 32)
    assert sorted(run["layers"]["mse"]) == sorted(names)
    # the row with the output head quantized reports it with the rest, quantized as the default is
    assert sorted(run["layers"]["mse-random-head"]) == sorted([*names, "lm_head"])
    for name in names:
        assert run["layers"]["mse-random-head"][name] == run["layers"]["mse-random"][name]
    for method in ("naive", "even", "mse"):
        for name in names:
            w = reference.get_submodule(name).weight.detach()
            packed, scales = quantize_mxfp4(w, scale_method=method)
            w_hat = dequantize_mxfp4(packed, scales, dtype=torch.float32)
            expected = float((w.double() - w_hat.double()).norm() / w.double().norm())
            assert run["layers"][method][name]["relative_error"] == pytest.approx(expected, rel=1e-12)
            e0 = evaluation.naive_bytes_of(w, 32)
            offsets = scales.reshape(-1).int() - e0
            row = run["layers"][method][name]
            assert [row["e0-1"], row["e0"], row["e0+1"]] == [int((offsets == d).sum()) for d in (-1, 0, 1)]
            assert row["other"] == 0
    shares = {m["method"]: m["scale_choice_shares"] for m in run["methods"]}
    assert shares["naive"]["e0"] == 1.0
    assert shares["even"]["e0-1"] == 0.0


def test_outputs_are_written_and_the_card_states_the_results(tiny_run, tmp_path):
    _, run = tiny_run
    run = {**run, "command": "qwantize-eval --tokens 400", "model_note": "weights from a test GGUF grid"}
    written = evaluation.write_outputs(run, tmp_path / "results", "tiny", tmp_path / "card")
    names = sorted(p.name for p in written)
    assert names == ["README.md", "tiny-layers.md", "tiny.json", "tiny.md", "tiny.png"]
    assert json.loads((tmp_path / "results" / "tiny.json").read_text())["methods"] == run["methods"]
    assert (tmp_path / "results" / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "results" / "tiny.md").read_text()
    for m in run["methods"]:
        assert f"| {m['method']} | {m['perplexity']:.3f} |" in table
    assert "weights from a test GGUF grid" in table
    card = (tmp_path / "card" / "README.md").read_text()
    assert card.startswith("---\n")
    assert "qwantize-eval --tokens 400" in card and "weights from a test GGUF grid" in card
    assert f"{run['methods'][3]['perplexity']:.3f}" in card


FIXED_RUN = {
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "model_note": "Its weights are a dequantized 4-bit GGUF grid, not the original bf16.",
    "text": "English Wikipedia sample shipped in gensim",
    "tokens_scored": 16384,
    "context_length": 1024,
    "stride": 512,
    "machine": "test machine",
    "versions": {"torch": "2.13.0"},
    "command": "qwantize-eval",
    "methods": [
        {"method": "bf16", "perplexity": 20.0, "delta_vs_bf16": 0.0, "gap_recovered": None, "bits_per_weight": 16,
         "tokens_scored": 16384, "wall_time_s": 10.0},
        {"method": "naive", "perplexity": 30.0, "delta_vs_bf16": 10.0, "gap_recovered": None,
         "bits_per_weight": 4.25, "tokens_scored": 16384, "wall_time_s": 40.0},
        {"method": "mse", "perplexity": 27.5, "delta_vs_bf16": 7.5, "gap_recovered": 0.25, "bits_per_weight": 4.25,
         "tokens_scored": 16384, "wall_time_s": 45.0},
    ],
}


def test_card_renderer_output_for_a_fixed_run_json():
    from qwantize_hf import MXFP4Config
    from qwantize_hf.card import render_model_card

    card = render_model_card(MXFP4Config().to_dict(), FIXED_RUN["model"], FIXED_RUN, FIXED_RUN["model_note"])
    front, body = card.split("---\n", 2)[1:]
    assert 'base_model: "HuggingFaceTB/SmolLM2-135M-Instruct"' in front
    assert "library_name: transformers" in front and "- mxfp4" in front
    assert "| mse | 27.500 | +7.500 | 25.0% | 4.25 |" in body
    assert "| naive | 30.000 | +10.000 | n/a | 4.25 |" in body
    assert "dequantized 4-bit GGUF grid" in body
    assert "16384 tokens" in body and "qwantize-eval" in body
