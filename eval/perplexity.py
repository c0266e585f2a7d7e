"""Perplexity of bf16 vs MXFP4 block-scale methods on the same tokens.

    python eval/perplexity.py                      # the offline embedded default (SmolLM2-135M, Wikipedia sample)
    python eval/perplexity.py --model org/name --text wikitext-2 --tokens 65536

The same command is installed as ``qwantize-eval``; everything it does lives in
``qwantize_hf.evaluation`` (see ``--help``). Like every script under ``eval/``,
it imports the installed package (``pip install -e .``, as ``make venv`` and
``make demo`` do).
"""

import sys

from qwantize_cli import eval_main

if __name__ == "__main__":
    sys.exit(eval_main(prog="python eval/perplexity.py"))
