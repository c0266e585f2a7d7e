"""Model cards (README.md) for MXFP4 checkpoints, and their upload with ``push_to_hub``.

``render_model_card`` fills ``qwantize_hf/model_card_template.md`` (shipped with the package) from the checkpoint's
``quantization_config`` and, when given, the eval engineer's results JSON. It
states only what the config and the results say: nothing here measures or
guesses a number.

``push_to_hub`` in transformers saves the model to a temporary folder, then
writes its own generic README.md there, then uploads the folder. The only
moment a quantized model's card can take the generic one's place is between
the last two steps, so ``upload_card_with_push_to_hub`` wraps the model's
upload step (the same private ``_upload_modified_files`` in transformers 5.17
through 5.24) on that one model instance.
"""

from __future__ import annotations

import json
import os
import re
import types
from pathlib import Path
from typing import Any

from qwantize_hf.calibration import RANDOM_TOKENS_SEED
from qwantize_hf.config import QUANT_METHOD
from qwantize_hf.constants import BITS_PER_WEIGHT
from qwantize_hf.format import check_block_size
from qwantize_hf.methods import RANDOM_TOKENS
from qwantize_hf.methods import scale_method as scale_method_row

TEMPLATE_PATH = Path(__file__).resolve().parent / "model_card_template.md"
CARD_INFO_ATTRIBUTE = "qwantize_card_info"
DEFAULT_REPO_ID = "path/to/this/model"

TAGS = ("mxfp4", "qwantize_hf", "4-bit", "quantized")
EVAL_COLUMNS = ("Method", "Perplexity", "Δ vs bf16", "Gap to bf16 recovered", "Bits / weight")


# Characters that make Markdown structure (emphasis, code, links, tables, HTML, headings, lists) and
# the backslash that escapes them; a caller's string gets each one backslash-escaped.
_MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()<>#+!|~])")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _text(value: object) -> str:
    """A caller's string as inert Markdown text: one line, every structural character escaped."""
    return _MARKDOWN_SPECIALS.sub(r"\\\1", " ".join(str(value).split()))


def _code(value: object) -> str:
    """A caller's string as an inline code span; escaped text when it holds a backtick or a line break."""
    value = str(value)
    return _text(value) if "`" in value or "\n" in value or "\r" in value else f"`{value}`"


def _calibration_cell(calibration: dict[str, Any] | None) -> str:
    """The card's words for a calibration record (or request): what the statistics came from."""
    if not calibration:
        return "none (scales from the weights alone)"
    tokens = calibration.get("calibration_tokens")
    seq_len = calibration.get("calibration_seq_len")
    if calibration.get("dataset") == RANDOM_TOKENS:
        seed = calibration.get("seed", RANDOM_TOKENS_SEED)
        return (f"activation statistics of {_text(tokens)} token ids drawn uniformly from the vocabulary (seed "
                f"{_text(seed)}, sequences of {_text(seq_len)}); no text")
    words = f"activation statistics of {_text(tokens)} tokens of {_code(calibration.get('dataset'))}"
    if calibration.get("tokenizer"):
        words += f", tokenizer {_code(calibration['tokenizer'])}"
    if calibration.get("text_sha256"):
        words += f", text SHA-256 {_code(calibration['text_sha256'])}"
    return words + f", sequences of {_text(seq_len)}"


def _fence(value: str, language: str) -> list[str]:
    """A fenced code block of ``value`` whose fence is longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", value)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + language, value, fence]


def _yaml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar, quotes and escapes included


def _front_matter(base_model: str | None, license: str | None) -> str:
    lines = []
    if base_model:
        lines += [f"base_model: {_yaml_string(base_model)}", "base_model_relation: quantized"]
    lines.append("library_name: transformers")
    if license:
        lines.append(f"license: {_yaml_string(license)}")
    lines.append("tags:")
    lines += [f"- {tag}" for tag in TAGS]
    return "\n".join(lines)


def _number(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _eval_section(eval_results: dict[str, Any]) -> str:
    rows = [
        "| " + " | ".join(EVAL_COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(EVAL_COLUMNS) - 1)) + "|",
    ]
    for method in eval_results["methods"]:
        gap = method.get("gap_recovered")
        cells = [
            _text(method["method"]),
            _number(method.get("perplexity"), ".3f"),
            _number(method.get("delta_vs_bf16"), "+.3f"),
            "n/a" if gap is None else f"{gap:.1%}",
            _number(method.get("bits_per_weight"), "g"),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    setup = (
        f"Perplexity on {_text(eval_results.get('text', 'n/a'))}: {_text(eval_results.get('tokens_scored', 'n/a'))} "
        f"tokens scored with a context of {_text(eval_results.get('context_length', 'n/a'))} tokens, measured on "
        f"{_text(eval_results.get('machine', 'n/a'))}."
    )
    parts = ["", "## Evaluation", "", setup, "", *rows, ""]
    parts.append(
        "*Gap to bf16 recovered*: the share of the naive scale's perplexity increase over bf16 "
        "that the method wins back."
    )
    if eval_results.get("model_note"):
        parts += ["", _text(eval_results["model_note"])]
    if eval_results.get("command"):
        parts += ["", "Reproduce with:", "", *_fence(str(eval_results["command"]), "bash")]
    return "\n".join(parts) + "\n"


def render_model_card(
    quantization_config: dict[str, Any],
    base_model: str | None,
    eval_results: dict[str, Any] | None = None,
    base_model_note: str | None = None,
    *,
    repo_id: str | None = None,
    license: str | None = None,
) -> str:
    """README.md text (Hub YAML front matter + Markdown) for an MXFP4 checkpoint.

    ``quantization_config`` is the dict stored in config.json; ``eval_results``
    follows the eval scripts' JSON schema (``methods``: a list of dicts with
    ``method``, ``perplexity``, ``delta_vs_bf16``, ``gap_recovered``,
    ``bits_per_weight``; plus ``text``, ``tokens_scored``, ``context_length``,
    ``machine``, ``command``, ``model_note``).
    """
    block_size = quantization_config["block_size"]
    scale_method = quantization_config["scale_method"]
    check_block_size(block_size)
    description = scale_method_row(scale_method).description
    scales_from = quantization_config.get("scales_from")
    layout = (
        f"4-bit FP4 (E2M1) codes plus one power-of-two (UE8M0) scale per block of {block_size} weights"
    )
    stored_sentence = (
        f"Every eligible weight (`nn.Linear` layers, fused mixture-of-experts projections) is stored as MXFP4: "
        f"{layout}, quantized with `qwantize_hf`."
    )
    calibration = _calibration_cell(quantization_config.get("calibration"))
    if scales_from:
        stored_sentence = (
            f"Its MXFP4 weights ({layout}) were imported byte for byte from {_text(scales_from)}; `qwantize_hf` "
            "stores and runs them."
        )
        description = (
            f"the scales were chosen by {_text(scales_from)} and imported as they are; `{scale_method}` is how "
            "this library would quantize new weights"
        )
        calibration = f"not applicable: the scales were imported from {_text(scales_from)}"
    if eval_results is not None and not isinstance(eval_results.get("methods"), list):
        raise ValueError("eval_results needs a 'methods' list of per-method results (see the eval scripts' JSON)")
    quant_method = quantization_config.get("quant_method", QUANT_METHOD)
    format_version = quantization_config.get("format_version", 1)
    if quant_method != QUANT_METHOD or type(format_version) is not int:
        raise ValueError(
            f"quantization_config must be a {QUANT_METHOD!r} config with an int format_version, got "
            f"quant_method {quant_method!r}, format_version {format_version!r}"
        )
    skipped = quantization_config.get("modules_to_not_convert") or []
    name = _text(base_model.rsplit("/", 1)[-1]) if base_model else "Model"
    hub_link = bool(base_model) and _HUB_ID.match(base_model) is not None
    fields = {
        "front_matter": _front_matter(base_model, license),
        "title": f"{name} MXFP4 (block {block_size}, "
        + (f"scales from {_text(scales_from)})" if scales_from else f"{scale_method} scales)"),
        "base_model_sentence": (
            f"[`{base_model}`](https://huggingface.co/{base_model}) quantized to MXFP4."
            if hub_link
            else f"{_code(base_model)} quantized to MXFP4."
            if base_model
            else "A model quantized to MXFP4."
        ),
        "base_model_note": f"\n{_text(base_model_note)}\n" if base_model_note else "",
        "quant_method": quant_method,
        "format_version": format_version,
        "block_size": block_size,
        "scale_method": scale_method,
        "scale_method_description": description,
        "bits_per_weight": format(BITS_PER_WEIGHT[block_size], "g"),
        "base_model_cell": _code(base_model) if base_model else "not recorded",
        "modules_to_not_convert": ", ".join(_code(m) for m in skipped) if skipped else "none",
        "calibration": calibration,
        "stored_sentence": stored_sentence,
        # a Python string literal: json.dumps escapes quotes, backslashes and line breaks
        "repo_id": json.dumps(repo_id or DEFAULT_REPO_ID),
        "eval_section": _eval_section(eval_results) if eval_results is not None else "",
    }
    return TEMPLATE_PATH.read_text(encoding="utf-8").format_map(fields)


# --------------------------------------------------------------------------- a model's card


def set_model_card_info(
    model: Any,
    eval_results: dict[str, Any] | None = None,
    base_model_note: str | None = None,
    license: str | None = None,
) -> None:
    """Attach eval results / notes / license that the model's card should state on ``push_to_hub``."""
    setattr(
        model,
        CARD_INFO_ATTRIBUTE,
        {"eval_results": eval_results, "base_model_note": base_model_note, "license": license},
    )


def model_card_for(model: Any, repo_id: str | None = None) -> str:
    """The card of a model loaded with MXFP4Config, from its quantization_config and attached info."""
    config = model.config.quantization_config
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    info = getattr(model, CARD_INFO_ATTRIBUTE, None) or {}
    return render_model_card(
        config,
        config.get("base_model"),
        info.get("eval_results"),
        info.get("base_model_note"),
        repo_id=repo_id,
        license=info.get("license"),
    )


def write_model_card(model: Any, folder: str | os.PathLike, repo_id: str | None = None) -> Path:
    """Write the model's README.md into ``folder`` (e.g. after ``save_pretrained``); returns its path."""
    path = Path(folder) / "README.md"
    path.write_text(model_card_for(model, repo_id), encoding="utf-8")
    return path


def _upload_with_card(self: Any, working_dir: str | os.PathLike, repo_id: str, *args: Any, **kwargs: Any) -> Any:
    write_model_card(self, working_dir, repo_id)
    return type(self)._upload_modified_files(self, working_dir, repo_id, *args, **kwargs)


def _is_our_card(path: Path) -> bool:
    """README.md is a card this package wrote (its front matter carries our tag), not the user's own."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---\n"):
        return False
    front_matter = text[4:].split("\n---", 1)[0]
    return f"- {TAGS[1]}" in front_matter.splitlines()


def _save_with_card(self: Any, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    result = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    readme = Path(save_directory) / "README.md"
    if kwargs.get("is_main_process", True) and (not readme.exists() or _is_our_card(readme)):
        write_model_card(self, save_directory)  # a README of the user's own is left as it is
    return result


def upload_card_with_push_to_hub(model: Any) -> None:
    """Make ``model.push_to_hub`` upload this model's MXFP4 card as README.md, and ``model.save_pretrained``
    write it beside the weights (unless the folder holds a README.md that is not one of ours), so a
    checkpoint always says which package reads it."""
    model._upload_modified_files = types.MethodType(_upload_with_card, model)
    model.save_pretrained = types.MethodType(_save_with_card, model)


def remove_card_hook(model: Any) -> None:
    """Undo ``upload_card_with_push_to_hub`` (the model is no longer quantized)."""
    model.__dict__.pop("_upload_modified_files", None)
    model.__dict__.pop("save_pretrained", None)
