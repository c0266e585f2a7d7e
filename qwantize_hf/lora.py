"""LoRA adapters on a frozen MXFP4 base (QLoRA-style fine-tuning) through PEFT.

PEFT adapts layer types it does not know through one extension point: a ``LoraConfig``'s
``_register_custom_module({base type: LoRA layer type})`` (documented as experimental in PEFT's
"custom models" guide). ``lora_config(...)`` builds a ``LoraConfig`` with ``MXFP4Linear`` registered
(``register_lora`` does it to a config of your own), so ``peft.get_peft_model`` wraps each targeted
``MXFP4Linear`` in an ``MXFP4LoraLinear``:

    y = mxfp4_linear(x, codes, scales, bias) + scaling * B(A(dropout(x)))

The codes and scales stay frozen uint8 (they are never copied or dequantized between calls); only A
and B (float32 by PEFT's default) train. The base product's backward gives the input gradient through
the op's registered autograd.

PEFT does not save the registration in ``adapter_config.json``, so an adapter is loaded back onto an
MXFP4 model with ``load_lora_adapter(model, path)``, which registers it again.

Merging (``merge_adapter``, ``merge_and_unload``) cannot add a float delta to 4-bit codes without
rounding it away, so it is lossless instead: the merged layer becomes an ``nn.Linear`` holding the
dequantized weight plus the delta (float, 4x the bytes of the MXFP4 layer), and unmerging puts the
untouched MXFP4 layer back. ``merge_and_dequantize(peft_model)`` returns a float model with the adapter
merged and the quantization config removed, ready for ``save_pretrained``. Needs PEFT >= 0.22.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from qwantize_hf.linear import MXFP4Linear

MIN_PEFT_VERSION = (0, 22)

# LoRA initialisations that never read the base weight (the others, e.g. PiSSA, OLoRA, LoftQ, CorDA,
# EVA, LoRA-GA, decompose or fit the float weight, which an MXFP4 layer does not hold)
_INITS_WITHOUT_BASE_WEIGHT = (True, False, "gaussian", "orthogonal")


def _peft() -> Any:
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            "LoRA on MXFP4 weights needs PEFT: pip install 'peft>=0.22' (or qwantize-hf[peft])"
        ) from error
    version = tuple(int(part) for part in peft.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_PEFT_VERSION:
        raise ImportError(
            f"LoRA on MXFP4 weights needs peft >= {'.'.join(map(str, MIN_PEFT_VERSION))} (its LoRA layers take "
            f"their settings from the LoraConfig); found {peft.__version__}: pip install -U peft"
        )
    return peft


def _lora_layer_base() -> type:
    return _peft().tuners.lora.LoraLayer


class MXFP4LoraLinear(nn.Module, _lora_layer_base()):  # type: ignore[misc]
    """A LoRA adapter beside a frozen ``MXFP4Linear``, created by PEFT through the registration that
    ``register_lora`` makes; not built by hand."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: Any,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        name = kwargs.get("target_name") or "an MXFP4Linear"
        if not isinstance(base, MXFP4Linear):
            raise TypeError(f"{name}: MXFP4LoraLinear adapts an MXFP4Linear, got {type(base).__name__}")
        _check_supported(config, name)
        super().__init__()
        _lora_layer_base().__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        return base.in_features, base.out_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        _check_supported(config, f"adapter {adapter_name!r}")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B @ A`` in float32, ``[out, in]``."""
        weight_a = self.lora_A[adapter].weight.float()
        weight_b = self.lora_B[adapter].weight.float()
        return (weight_b @ weight_a) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge adapters into a float copy of the layer: the MXFP4 layer is swapped for an ``nn.Linear``
        holding its dequantized weight plus every merged delta (kept aside, so ``unmerge`` restores it
        bit for bit). ``safe_merge`` checks the merged weight is finite before it is used."""
        adapter_names = _peft().tuners.tuners_utils.check_adapters_to_merge(self, adapter_names)
        adapter_names = [name for name in adapter_names if name in self.lora_A]
        if not adapter_names:
            return
        base = self.get_base_layer()
        linear = base.to_linear() if isinstance(base, MXFP4Linear) else base
        weight = linear.weight.detach().float()
        bias = None if linear.bias is None else linear.bias.detach().float()
        for adapter in adapter_names:
            weight = weight + self.get_delta_weight(adapter).to(weight.device)
            if self.lora_bias[adapter]:
                bias = bias + self.lora_B[adapter].bias.detach().float() * self.scaling[adapter]
        if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(
                f"merging adapter(s) {adapter_names} gives non-finite weights: the adapter is broken; nothing merged"
            )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        if isinstance(base, MXFP4Linear):
            warnings.warn(
                f"merging a LoRA adapter into an MXFP4Linear [{base.out_features}, {base.in_features}] makes it a "
                f"float nn.Linear ({linear.weight.dtype}, {linear.weight.numel() * linear.weight.element_size()} "
                "bytes): 4-bit codes cannot hold the adapter's delta. Unmerge to get the MXFP4 layer back; "
                "qwantize_hf.lora.merge_and_dequantize gives a float model that saves as one",
                stacklevel=2,
            )
            self.__dict__["_mxfp4_base"] = base  # not a submodule: not in the state dict while merged
            self.base_layer = linear
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Put the MXFP4 layer back as it was before ``merge`` (its bytes were never changed)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.base_layer = self.__dict__.pop("_mxfp4_base")
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        out_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
            adapter_x = self._cast_input_dtype(x, lora_a.weight.dtype)
            result = result + lora_b(lora_a(self.lora_dropout[adapter](adapter_x))) * self.scaling[adapter]
        return result.to(out_dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _check_supported(config: Any, where: str) -> None:
    """LoRA variants and initialisations that need the float base weight are refused by name."""
    for field in ("use_dora", "use_qalora", "use_bdlora"):
        if getattr(config, field, False):
            raise ValueError(
                f"{where}: {field}=True needs the float base weight, which an MXFP4Linear does not hold; "
                "use plain LoRA on MXFP4 weights (set it to False), or load the model with dequantize=True"
            )
    for field in ("alora_invocation_tokens", "velora_config", "monteclora_config", "kasa_config", "arrow_config"):
        if getattr(config, field, None) is not None:
            raise ValueError(f"{where}: {field} is not supported on MXFP4 layers; plain LoRA is (set it to None)")
    init = config.init_lora_weights
    if init not in _INITS_WITHOUT_BASE_WEIGHT:
        raise ValueError(
            f"{where}: init_lora_weights={init!r} initialises from the float base weight, which an MXFP4Linear "
            f"does not hold; use one of {list(_INITS_WITHOUT_BASE_WEIGHT)}"
        )
    if getattr(config, "fan_in_fan_out", False):
        raise ValueError(f"{where}: fan_in_fan_out=True is for Conv1D weights; MXFP4Linear is [out, in]: set it False")


def register_lora(config: Any) -> Any:
    """Register ``MXFP4Linear`` with a ``peft.LoraConfig`` (PEFT's extension point for custom layers);
    returns the config."""
    peft = _peft()
    if not isinstance(config, peft.LoraConfig):
        raise TypeError(f"register_lora takes a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({MXFP4Linear: MXFP4LoraLinear})
    return config


def lora_config(**kwargs: Any) -> Any:
    """``peft.LoraConfig(**kwargs)`` with ``MXFP4Linear`` registered, for ``peft.get_peft_model``."""
    return register_lora(_peft().LoraConfig(**kwargs))


def load_lora_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **kwargs: Any,
) -> Any:
    """``peft.PeftModel.from_pretrained`` for a model with MXFP4 layers: the adapter's saved config with
    ``MXFP4Linear`` registered again (PEFT does not save that registration)."""
    peft = _peft()
    config = peft.PeftConfig.from_pretrained(path, **{k: v for k, v in kwargs.items() if k in ("revision", "token")})
    if isinstance(config, peft.LoraConfig):
        register_lora(config)
    return peft.PeftModel.from_pretrained(
        model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
    )


def merge_and_dequantize(model: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """A float model with the adapters merged: ``merge_and_unload`` (merged layers become float), then the
    MXFP4 layers that had no adapter are dequantized and the quantization config is removed, so the result
    saves and reloads as a plain float checkpoint."""
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    if getattr(merged, "hf_quantizer", None) is not None:
        merged = merged.dequantize(dtype=dtype)  # also removes the quantization config
    else:
        from qwantize_hf.replace import dequantize_linears

        dequantize_linears(merged, dtype)
    return merged
