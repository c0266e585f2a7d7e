"""The outputs of a comparison run, from its JSON dict: Markdown tables, the per-layer report, the plot, the card.

``write_outputs`` writes, under the output folder: ``NAME.md`` (table),
``NAME.json`` (the schema ``qwantize_hf.card.render_model_card`` reads),
``NAME.png`` (plot), ``NAME-layers.md`` (per-layer relative weight error and how
often each block's scale is e0-1 / e0 / e0+1), and a model card for the
default ``MXFP4Config()`` under the card folder. Everything here reads the dict
``run.run_comparison`` returns; none of it loads a model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from qwantize_hf.evaluation.data import EMBEDDED
from qwantize_hf.evaluation.run import BASELINE, RunSettings


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _shares(shares: dict[str, float] | None) -> str:
    if shares is None:
        return "—"
    text = " / ".join(f"{100 * shares[k]:.1f}" for k in ("e0-1", "e0", "e0+1"))
    return text + (f" (+{100 * shares['other']:.1f} other)" if shares["other"] else "")


def _setup_lines(run: dict[str, Any]) -> list[str]:
    lines = [
        f"- Model: `{run['model']}`" + (f" — {run['model_note']}" if run.get("model_note") else ""),
        f"- Text: {run['text']}",
        f"- {run['tokens_scored']} tokens scored (the same positions for every method), context "
        f"{run['context_length']}, stride {run['stride']}; compute dtype {run['compute_dtype']} on {run['device']}"
        + (f", windows shared by {run['processes']} data-parallel processes" if run.get("processes", 1) > 1 else ""),
        f"- Machine: {run['machine']}",
    ]
    if run.get("calibration"):
        c = run["calibration"]
        lines.append(f"- `mse-act` calibration: {c['text']}, {c['tokens']} tokens in sequences of {c['seq_len']}")
    if run.get("command"):
        lines.append(f"- Command: `{run['command']}`")
    return lines


def markdown_table(run: dict[str, Any]) -> str:
    header = (
        "| method | perplexity | Δ vs bf16 | naive's gap recovered | weight rel. error | "
        "blocks at e0−1 / e0 / e0+1 (%) | bits/weight (quantized layers / model) | tokens | wall time (s) |"
    )
    rows = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in run["methods"]:
        gap = m["gap_recovered"]
        rows.append(
            "| " + " | ".join(
                [
                    m["method"],
                    f"{m['perplexity']:.3f}",
                    f"{m['delta_vs_bf16']:+.3f}",
                    "—" if gap is None else f"{100 * gap:.1f}%",
                    _fmt(m["weight_relative_error"], ".4f"),
                    _shares(m["scale_choice_shares"]),
                    f"{m['bits_per_weight']:.2f} / {m['model_bits_per_weight']:.2f}",
                    str(m["tokens_scored"]),
                    f"{m['wall_time_s']:.1f}",
                ]
            ) + " |"
        )
    return "\n".join(rows)


def markdown_report(run: dict[str, Any]) -> str:
    parts = [
        "# Perplexity: bf16 vs MXFP4 block-scale methods",
        "",
        *_setup_lines(run),
        "",
        markdown_table(run),
        "",
        "*naive's gap recovered*: (ppl(naive) − ppl(method)) / (ppl(naive) − ppl(bf16)). "
        "*weight rel. error*: ‖W − Ŵ‖ / ‖W‖ over all quantized Linears. "
        "*e0*: the naive OCP scale byte of the block. "
        "Model bits/weight counts the unquantized embeddings and norms too.",
        "",
    ]
    return "\n".join(parts)


def layer_report_markdown(run: dict[str, Any]) -> str:
    methods = list(run["layers"])
    names = list(run["layers"][methods[0]]) if methods else []
    header = "| layer | " + " | ".join(f"{m} rel. error" for m in methods) + " | mse blocks e0−1 / e0 / e0+1 (%) |"
    rows = [header, "|---|" + "---:|" * (len(methods) + 1)]
    for name in names:
        cells = [f"{run['layers'][m][name]['relative_error']:.4f}" for m in methods]
        mse = run["layers"].get("mse", {}).get(name)
        if mse:
            shares = {k: mse[k] / mse["blocks"] for k in ("e0-1", "e0", "e0+1", "other")}
            cells.append(_shares(shares))
        else:
            cells.append("—")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(
        [
            "# Per-layer weight error: ‖W − Ŵ‖ / ‖W‖ per quantized Linear",
            "",
            *_setup_lines(run),
            "",
            *rows,
            "",
        ]
    )


def plot(run: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m["method"] for m in run["methods"]]
    ppl = [m["perplexity"] for m in run["methods"]]
    colors = ["#555555" if m == BASELINE else "#c44e52" if m == "naive" else "#4c72b0" for m in methods]
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    bars = ax.bar(methods, ppl, color=colors)
    ax.axhline(ppl[0], color="#555555", linestyle="--", linewidth=1)
    for bar, m in zip(bars, run["methods"]):
        label = f"{m['perplexity']:.2f}"
        if m["gap_recovered"] is not None:
            label += f"\n{100 * m['gap_recovered']:.0f}% of gap"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=9, xytext=(0, 2), textcoords="offset points")
    ax.set_ylim(0, max(ppl) * 1.15)
    ax.set_ylabel("perplexity (lower is better)")
    model = run["model"].rsplit("/", 1)[-1]
    ax.set_title(f"{model}: MXFP4 block-scale methods, {run['tokens_scored']} tokens, context {run['context_length']}",
                 fontsize=10)
    if run.get("model_note"):
        note = "bf16 = the dequantized 4-bit GGUF weights, not the original bf16 model"
        fig.supxlabel(note if "GGUF" in run["model_note"] else run["model_note"][:120], fontsize=8, color="#555555")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def default_name(settings: RunSettings) -> str:
    model = "smollm2-135m" if settings.model == EMBEDDED else Path(settings.model).name
    text = "-".join(Path(t).stem for t in settings.text)
    tokens = f"{settings.tokens // 1024}k" if settings.tokens % 1024 == 0 else str(settings.tokens)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model}-{text}-{tokens}-ctx{settings.context_length}").lower()


def write_outputs(run: dict[str, Any], output_dir: Path, name: str, card_dir: Path | None) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    paths = {suffix: output_dir / f"{name}{suffix}" for suffix in (".json", ".md", ".png", "-layers.md")}
    paths[".json"].write_text(json.dumps(run, indent=1) + "\n")
    paths[".md"].write_text(markdown_report(run))
    paths["-layers.md"].write_text(layer_report_markdown(run))
    plot(run, paths[".png"])
    written += paths.values()
    if card_dir is not None:
        from qwantize_hf import MXFP4Config
        from qwantize_hf.card import render_model_card

        config = run.get("quantization_config") or MXFP4Config(block_size=run["block_size"]).to_dict()
        base_model = run["model"] if "/" in run["model"] and not Path(run["model"]).exists() else None
        card = render_model_card(config, base_model, run, base_model_note=run.get("model_note"))
        card_dir.mkdir(parents=True, exist_ok=True)
        (card_dir / "README.md").write_text(card)
        written.append(card_dir / "README.md")
    return written
