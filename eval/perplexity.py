"""Perplexity of bf16 vs MXFP4 block-scale methods on the same tokens.

    python eval/perplexity.py                      # the offline embedded default (SmolLM2-135M, Wikipedia sample)
    python eval/perplexity.py --model org/name --text wikitext-2 --tokens 65536

The same command is installed as ``qwantize-eval``; everything it does lives in
``qwantize_hf.perplexity`` (see ``--help``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qwantize_hf.perplexity import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python eval/perplexity.py"))
