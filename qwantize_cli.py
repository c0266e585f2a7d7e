"""The console scripts ``qwantize-eval`` and ``qwantize-convert``: arguments parsed before torch loads.

``import qwantize_hf`` imports torch and transformers (importing the package registers its
quantizer with transformers), which takes seconds. The parsers live in modules of the
package that import neither at the top, so these entry points import them with the
package's ``__init__`` deferred: the package module is created but not yet run, the
arguments are parsed (``--help`` and a wrong argument answer at once), and only then does
the package's ``__init__`` run, registering the quantizer, before any work starts.

This module sits outside the package because a console script inside it would run the
package's ``__init__`` first; it holds no logic of its own.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from typing import Any

PACKAGE = "qwantize_hf"


def _parse_then_initialize(parse: Callable[[], Any]) -> Any:
    """``parse()`` with the package's ``__init__`` deferred until it returns; its result."""
    if PACKAGE in sys.modules:  # already imported (a test, an interactive session): nothing to defer
        return parse()
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"{PACKAGE} is not installed")
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    try:
        parsed = parse()  # --help and bad arguments exit here, the package never initialized
    except BaseException:
        del sys.modules[PACKAGE]
        raise
    spec.loader.exec_module(package)  # the package's __init__: torch, transformers, registration
    return parsed


def eval_main(argv: list[str] | None = None, prog: str = "qwantize-eval") -> int:
    """``qwantize-eval``: the perplexity comparison (``qwantize_hf.evaluation.cli``)."""
    argv = sys.argv[1:] if argv is None else argv

    def parse() -> Any:
        from qwantize_hf.evaluation import cli

        return cli, cli.build_parser(prog).parse_args(argv)

    cli, args = _parse_then_initialize(parse)
    return cli.run(args, argv, prog)


def convert_main(argv: list[str] | None = None) -> int:
    """``qwantize-convert``: checkpoint conversion (``qwantize_hf.integrations.cli``)."""

    def parse() -> Any:
        from qwantize_hf.integrations import cli

        return cli, cli.build_parser().parse_args(argv)

    cli, args = _parse_then_initialize(parse)
    return cli.run(args)
