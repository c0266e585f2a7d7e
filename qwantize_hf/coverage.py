"""What a quantized model holds as MXFP4 and what stayed float, by kind, and why.

After a load, the quantizer logs the summary and warns about each weight that looks like linear
algebra (a 2-D or 3-D float weight outside embeddings, norms, routers and the output head) and
stayed float, saying why: fused experts of an unsupported layout (ungated), a subclass of
``nn.Linear`` may carry a forward of its own, ``in_features`` is not a multiple of the block size,
or the user's ``modules_to_not_convert`` (not warned: asked for). A model in
which nothing became MXFP4 must not be saved as an MXFP4 checkpoint (``quantizer.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from qwantize_hf.experts import unsupported_layout
from qwantize_hf.replace import module_matches, output_head_name, stored_pairs
from qwantize_hf.targets import mxfp4_kind, weight_kind

# Float weights smaller than this many elements are not reported as skipped (biases, scalars).
_MIN_MATRIX = 256


@dataclass
class Coverage:
    """``mxfp4``: per kind, [modules, weights they stand for, bytes stored]; ``float``: per category,
    [parameters, bytes]; ``skipped``: (name, why) for float weights that look quantizable."""

    mxfp4: dict[str, list[int]] = field(default_factory=dict)
    float: dict[str, list[int]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def mxfp4_weights(self) -> int:
        return sum(weights for _, weights, _ in self.mxfp4.values())

    def share(self, exclude: Iterable[str] = ("embeddings", "norms", "output head", "routers")) -> float:
        """Share of the linear-algebra weights stored as MXFP4 (the float categories in ``exclude``
        do not count)."""
        skipped = sum(count for category, (count, _) in self.float.items() if category not in set(exclude))
        total = self.mxfp4_weights + skipped
        return self.mxfp4_weights / total if total else 0.0

    def warnings(self, shown: int = 3) -> list[str]:
        """One line per reason: how many float weights it kept, and the first few by name and shape."""
        reasons: dict[str, list[str]] = {}
        for name, why in self.skipped:
            reasons.setdefault(why, []).append(name)
        return [
            f"{len(names)} weight(s) that look quantizable stayed float: {why} "
            f"({', '.join(names[:shown])}{f' and {len(names) - shown} more' if len(names) > shown else ''})"
            for why, names in reasons.items()
        ]

    def summary(self) -> str:
        gib = 2**20
        parts = [
            f"{modules} {kind} layer(s), {weights:,} weights in {size / gib:.2f} MiB"
            for kind, (modules, weights, size) in sorted(self.mxfp4.items())
        ]
        floats = [
            f"{category} {count:,} ({size / gib:.2f} MiB)" for category, (count, size) in sorted(self.float.items())
        ]
        return (
            f"MXFP4: {'; '.join(parts) or 'nothing'}. Float: {', '.join(floats) or 'nothing'}. "
            f"{self.share():.1%} of the linear-algebra weights are MXFP4"
        )


def _category(name: str, module: nn.Module, head: str | None, skip: list[str]) -> str:
    kind = type(module).__name__.lower()
    if isinstance(module, nn.Embedding) or "embedding" in kind:
        return "embeddings"
    if "norm" in kind:
        return "norms"
    if name == head:
        return "output head"
    if "router" in kind or (name.rsplit(".", 1)[-1] in ("router", "gate") and "mlp" not in kind):
        return "routers"
    if module_matches(name, skip):
        return "modules_to_not_convert"
    return "not quantized"


def _why_skipped(module: nn.Module, tensor: torch.Tensor, block_size: int) -> str:
    cls, kind = type(module), weight_kind(module)
    if tensor.ndim == 3:
        layout = unsupported_layout(module)
        if layout is not None:
            return f"fused mixture-of-experts weights of this layout ({cls.__name__} {layout}) have no MXFP4 kind yet"
        return f"fused experts ({cls.__name__}) were left float (in_features not a multiple of {block_size}?)"
    if isinstance(module, nn.Linear) and kind is None:
        return (
            f"{cls.__module__}.{cls.__name__} subclasses nn.Linear with a forward of its own, which an "
            "MXFP4Linear would drop"
        )
    if kind is not None and kind.reduction_size(module) % block_size:
        return f"in_features is not a multiple of block_size {block_size}"
    if kind is not None:
        return f"eligible {cls.__name__} layers were left float (not quantized by this load)"
    return f"{cls.__name__} has no MXFP4 kind"


def coverage(model: nn.Module, modules_to_not_convert: Iterable[str], block_size: int) -> Coverage:
    """Count what ``model`` holds as MXFP4 and as float; list the float weights that look quantizable."""
    skip = list(modules_to_not_convert)
    head = output_head_name(model)
    report = Coverage()
    seen: set[int] = set()  # tied parameters count once
    for name, module in model.named_modules():
        pairs = stored_pairs(module)
        if pairs:
            kind = mxfp4_kind(module)
            row = report.mxfp4.setdefault(kind.name if kind is not None else "experts", [0, 0, 0])
            row[0] += 1
            for codes_name, scales_name in pairs:
                packed, scales = getattr(module, codes_name), getattr(module, scales_name)
                row[1] += packed.numel() * 2
                row[2] += packed.numel() * packed.element_size() + scales.numel() * scales.element_size()
            continue  # its biases stay float and are not counted
        for parameter, tensor in module.named_parameters(recurse=False):
            if id(tensor) in seen or not tensor.is_floating_point():
                continue
            seen.add(id(tensor))
            category = _category(name, module, head, skip)
            row = report.float.setdefault(category, [0, 0])
            row[0] += tensor.numel()
            row[1] += tensor.numel() * tensor.element_size()
            looks_like_weight = tensor.ndim >= 2 and tensor.numel() >= _MIN_MATRIX and "bias" not in parameter
            if category == "not quantized" and looks_like_weight:
                full = f"{name}.{parameter}" if name else parameter
                report.skipped.append((f"{full} {list(tensor.shape)}", _why_skipped(module, tensor, block_size)))
    return report


__all__ = ["Coverage", "coverage"]
