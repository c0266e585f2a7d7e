"""The scale methods and the quantization algorithms: one table each.

Everything that names a method reads it here: validation (config, ``quantize_mxfp4``),
the quantize kernel's method id, the model card's sentence and the eval's rows. Adding
a scale method is one row below plus its math: the torch twin's byte rule, registered
in ``format.SCALE_BYTE_RULES`` under the same name, and, when it has a Triton kernel, a
``kernel_id`` branch in ``kernels/quantize.py`` (a method without one runs its torch
twin on every device).

This file holds names and words only: no tensor math, no imports from the package.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class ScaleMethod:
    """How each block's UE8M0 scale byte is chosen."""

    name: str
    summary: str  # one line, for tables and --help
    description: str  # the model card's sentence
    kernel_id: int | None  # the quantize kernel's METHOD constant; None: the torch twin only
    takes_weights: bool  # accepts per-input-feature error weights (calibration statistics)


@dataclass(frozen=True)
class Algorithm:
    """How the codes are chosen once the scale rule is fixed."""

    name: str
    summary: str
    description: str
    needs_calibration: bool


_SCALE_METHODS = (
    ScaleMethod(
        "naive",
        "OCP MX v1.0 scale, floor(log2 amax) - 2",
        "the OCP MX v1.0 rule, floor(log2(amax)) - 2",
        kernel_id=0,
        takes_weights=False,
    ),
    ScaleMethod(
        "even",
        "torchao EVEN: one step up when amax's mantissa rounds up",
        "the OCP rule, one step up when amax's mantissa rounds up (torchao EVEN)",
        kernel_id=1,
        takes_weights=False,
    ),
    ScaleMethod(
        "mse",
        "least squared weight error per block",
        "per block, the power-of-two scale with the least squared error (searched exactly among e0-1, e0, "
        "e0+1, which holds the optimum over all scales whose grid stays finite)",
        kernel_id=2,
        takes_weights=True,
    ),
)
SCALE_METHODS: dict[str, ScaleMethod] = {method.name: method for method in _SCALE_METHODS}
DEFAULT_SCALE_METHOD = "mse"

_ALGORITHMS = (
    Algorithm(
        "rtn",
        "round to nearest at the chosen scale (calibration, if given, weights the scale search)",
        "each weight rounded to the nearest code at its block's scale",
        needs_calibration=False,
    ),
    Algorithm(
        "gptq",
        "GPTQ error feedback, Hessian-weighted scale search inside the loop, layer by layer on quantized inputs",
        "GPTQ-style error feedback: columns quantized in order, each one's rounding error spread over the "
        "columns not yet quantized through the Hessian of the layer's calibration inputs, each block's scale "
        "chosen inside the loop as the byte of least Hessian-weighted error; decoder layers quantized one at a "
        "time on the outputs of the layers before them, already quantized",
        needs_calibration=True,
    ),
)
ALGORITHMS: dict[str, Algorithm] = {algorithm.name: algorithm for algorithm in _ALGORITHMS}
DEFAULT_ALGORITHM = "rtn"

# calibration["dataset"] that needs no text: token ids drawn uniformly from the model's vocabulary
# (calibration.random_token_sequences), no tokenizer.
RANDOM_TOKENS = "random-tokens"


def _unknown(kind: str, value: object, known: dict[str, object]) -> ValueError:
    names = list(known)
    close = difflib.get_close_matches(str(value), names, n=1) if isinstance(value, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"{kind} must be one of {names}, got {value!r}{hint}")


def scale_method(name: object) -> ScaleMethod:
    """The table row of a scale method; ValueError naming the valid ones (and a close match) otherwise."""
    if not isinstance(name, str) or name not in SCALE_METHODS:
        raise _unknown("scale_method", name, SCALE_METHODS)
    return SCALE_METHODS[name]


def algorithm(name: object) -> Algorithm:
    """The table row of an algorithm; ValueError naming the valid ones (and a close match) otherwise."""
    if not isinstance(name, str) or name not in ALGORITHMS:
        raise _unknown("algorithm", name, ALGORITHMS)
    return ALGORITHMS[name]


__all__ = [
    "ALGORITHMS",
    "RANDOM_TOKENS",
    "DEFAULT_ALGORITHM",
    "DEFAULT_SCALE_METHOD",
    "SCALE_METHODS",
    "Algorithm",
    "ScaleMethod",
    "algorithm",
    "scale_method",
]
