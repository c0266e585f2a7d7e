"""``qwantize-convert``: checkpoint conversion between qwantize_hf and other runtimes' layouts.

    qwantize-convert to-compressed-tensors   OURS_DIR  OUT_DIR   # for vLLM
    qwantize-convert from-compressed-tensors CT_DIR    OUT_DIR   # an llm-compressor MXFP4 model
    qwantize-convert from-transformers-mxfp4 SRC_DIR   OUT_DIR   # GPT-OSS as published (*_blocks, *_scales)

Argument parsing only; the work is in ``qwantize_hf.integrations.compressed_tensors`` and
``qwantize_hf.integrations.transformers_mxfp4``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from qwantize_hf.methods import SCALE_METHODS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwantize-convert",
        description="Convert MXFP4 checkpoints between qwantize_hf and compressed-tensors (the layout vLLM serves), "
        "and import transformers' own MXFP4 checkpoints (GPT-OSS).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    to_ct = commands.add_parser(
        "to-compressed-tensors",
        help="qwantize_hf checkpoint folder -> compressed-tensors MXFP4 (W4A16) folder, for vLLM",
    )
    to_ct.add_argument("src", help="folder written by save_pretrained of a model quantized with qwantize_hf")
    to_ct.add_argument("out", help="output folder")
    to_ct.add_argument(
        "--ignore",
        nargs="+",
        metavar="MODULE",
        help="the unquantized Linear modules to list in 'ignore' (default: found from the model's architecture)",
    )
    to_ct.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty output folder")

    _import_command(
        commands, "from-compressed-tensors",
        "compressed-tensors MXFP4 folder (llm-compressor) -> qwantize_hf checkpoint folder",
        "compressed-tensors checkpoint folder with format 'mxfp4-pack-quantized'",
        "even", " (default: even, compressed-tensors' own rule)",
    )  # fmt: skip
    _import_command(
        commands, "from-transformers-mxfp4",
        "transformers MXFP4 folder (quant_method 'mxfp4': GPT-OSS as published) -> qwantize_hf checkpoint folder",
        "checkpoint folder whose experts are stored as *_blocks and *_scales",
        "mse", " (config.json's scales_from says whose they are)",
    )  # fmt: skip
    return parser


def _import_command(commands: Any, name: str, summary: str, source: str, default: str, note: str) -> None:
    """A converter from another tool's MXFP4 layout into ours: SRC, OUT, --scale-method, --overwrite."""
    command = commands.add_parser(name, help=summary)
    command.add_argument("src", help=source)
    command.add_argument("out", help="output folder")
    command.add_argument(
        "--scale-method",
        choices=list(SCALE_METHODS),
        default=default,
        help="recorded in the config: how new weights would be quantized; the checkpoint's scales are kept as "
        "they are" + note,
    )
    command.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty output folder")


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Convert as the parsed ``args`` ask."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from qwantize_hf.integrations import compressed_tensors, transformers_mxfp4

    try:
        if args.command == "from-transformers-mxfp4":
            transformers_mxfp4.from_transformers_mxfp4(
                args.src, args.out, scale_method=args.scale_method, overwrite=args.overwrite
            )
        elif args.command == "to-compressed-tensors":
            compressed_tensors.to_compressed_tensors(args.src, args.out, ignore=args.ignore, overwrite=args.overwrite)
        else:
            compressed_tensors.from_compressed_tensors(
                args.src, args.out, scale_method=args.scale_method, overwrite=args.overwrite
            )
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        logging.getLogger("qwantize-convert").error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
