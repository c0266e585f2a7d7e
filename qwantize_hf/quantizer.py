"""The transformers quantizer for ``quant_method="qwantize_mxfp4"``, and its registration.

Policy only, in the order transformers calls it: check the request, decide
which Linears become MXFP4Linear, which tensors are quantized as they load,
how big a quantized weight is, what happens after loading. The work itself
(module swaps, the load-time quantize op, dequantizing) is in ``replace.py``,
the calibration run in ``calibration.py``; this file must never touch tensor values.

Ways to quantize a float checkpoint:

* plain (``calibration=None``): each weight is quantized as it loads, so the
  bf16 model is never held whole;
* random tokens (the default, ``MXFP4Config()``): quantized as it loads, like plain;
  then seeded random token ids run through the quantized model, and each weight,
  read once more from the checkpoint, is quantized again with its input features'
  mean square activations as weights. The bf16 model is never held whole either;
* calibrated: the Linears stay ``nn.Linear`` while the weights load; once the
  model is loaded (and dispatched by accelerate, if device_map splits it) the
  calibration text runs through it and every eligible Linear is quantized with
  its input features' mean square activations as weights, then swapped. The
  bf16 model is held while calibrating. A saved calibrated model is an ordinary
  MXFP4 checkpoint whose config records the calibration; it is never rerun.
* GPTQ (``algorithm="gptq"``, with calibration): loaded the same way, then quantized
  decoder layer by decoder layer (``sequential.py``), each on the outputs of the layers
  before it, already quantized; a model loaded on the CPU has one layer at a time on
  the GPU.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from transformers.quantizers import auto as transformers_auto
from transformers.quantizers import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer

from qwantize_hf import calibration, card, coverage, expert_calibration, experts, read_back, replace, sequential
from qwantize_hf.config import QUANT_METHOD, MXFP4Config
from qwantize_hf.constants import F4_CODES_PER_BYTE
from qwantize_hf.linear import MXFP4Linear

logger = logging.getLogger(__name__)


class MXFP4HfQuantizer(HfQuantizer):
    """Quantizes eligible ``nn.Linear`` weights to MXFP4 as they load; loads stored MXFP4 bytes as they are."""

    requires_calibration = False

    def __init__(self, quantization_config: MXFP4Config, **kwargs: Any) -> None:
        # transformers hands over the user's own config object and later stores it
        # on the model; a copy keeps one model's resolved skip list out of the next.
        super().__init__(copy.deepcopy(quantization_config), **kwargs)
        self._checkpoint_files: list[str] | None = None  # the float checkpoint's, for the random-token rescale

    # 1. the request ------------------------------------------------------------------

    @property
    def calibrates(self) -> bool:
        """Whether this load holds the float model to calibrate it: a float checkpoint with a calibration
        request that is not ``rescales``'."""
        config = self.quantization_config
        return not self.pre_quantized and config.calibrates and not config.rescales_on_random_tokens

    @property
    def rescales(self) -> bool:
        """Whether this load quantizes as it loads, then once more on random-token statistics."""
        return not self.pre_quantized and self.quantization_config.rescales_on_random_tokens

    def validate_environment(self, device_map: Any = None, **kwargs: Any) -> None:
        config = self.quantization_config
        if config.dequantize and not self.pre_quantized:
            raise ValueError(
                "MXFP4Config(dequantize=True) turns an MXFP4 checkpoint back into plain Linears, but this "
                "checkpoint is not quantized; load it without quantization_config to keep it unquantized"
            )
        if config.calibration is not None and not self.pre_quantized and not config.calibrates:
            raise ValueError(
                "MXFP4Config(calibration=...) holds the record of a calibration that already ran (it says "
                "'calibrated': True), not a request; to calibrate this checkpoint pass "
                "calibration={'dataset': ..., 'tokenizer': ...}"
            )
        devices = set(device_map.values()) if isinstance(device_map, dict) else set()
        # A calibrated load reads float weights, so disk-offloaded ones are the checkpoint's own;
        # their quantized bytes are kept in memory afterwards (replace.quantize_linears_with_weights,
        # expert_calibration.install_quantized).
        if "disk" in devices and not self.pre_quantized and not self.calibrates:
            # transformers re-reads a disk-offloaded weight from the original
            # checkpoint, so the quantized bytes would be replaced by bf16 ones.
            raise ValueError(
                "quantizing on load cannot offload layers to disk (device_map puts some on 'disk'): quantize "
                "first with device_map='cpu' (or a GPU) and save_pretrained, then load that MXFP4 checkpoint "
                "with disk offload; or give max_memory enough room to avoid 'disk'"
            )
        if "meta" in {str(device) for device in devices}:
            # transformers leaves meta-placed weights unloaded: nothing could be quantized or run.
            raise ValueError(
                "device_map places some modules on 'meta', which loads no weights; quantizing needs them. "
                "Use 'cpu', a GPU or 'disk' (disk only for an already quantized MXFP4 checkpoint)"
            )
        if self.calibrates and config.algorithm == "gptq" and (len(devices) > 1 or "disk" in devices):
            raise ValueError(
                "MXFP4Config(algorithm='gptq') moves one decoder layer at a time to the GPU, so the model "
                f"must load whole on one device, but device_map spreads it over {sorted(map(str, devices))}. "
                "Load it on the CPU (no device_map, or device_map='cpu'): GPTQ then holds only one layer "
                "on the GPU at a time; or on one GPU (device_map='cuda')"
            )
        if config.dequantize and (len(devices) > 1 or "disk" in devices):
            raise ValueError(
                "MXFP4Config(dequantize=True) cannot dequantize layers that device_map offloads "
                f"(devices {sorted(map(str, devices))}); load on one device, e.g. "
                "device_map='cpu' or 'cuda'"
            )

    # 2. the skeleton, before any weight is read ---------------------------------------

    def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
        config = self.quantization_config
        config.modules_to_not_convert = replace.resolve_modules_to_not_convert(
            model, config.modules_to_not_convert, stored=self.pre_quantized, quantize_lm_head=config.quantize_lm_head
        )
        if config.base_model is None and not self.pre_quantized:
            config.base_model = replace.hub_id_or_none(getattr(model.config, "name_or_path", None))
        if self.calibrates:
            # The Linears stay nn.Linear and load their float weights; they are swapped after calibration.
            _, not_divisible = replace.linears_to_convert(
                model, block_size=config.block_size, modules_to_not_convert=config.modules_to_not_convert
            )
        else:
            not_divisible = replace.replace_linear_with_mxfp4(
                model,
                block_size=config.block_size,
                modules_to_not_convert=config.modules_to_not_convert,
                quantize_on_load=not self.pre_quantized,
            )
        # a stored checkpoint's tensor dtypes (its .safetensors headers), read once for both uses
        stored = replace.stored_dtypes(kwargs.get("checkpoint_files")) if self.pre_quantized else {}
        self._experts_names = self._prepare_experts(model, stored)
        if self.pre_quantized:
            replace.match_stored_dtypes(model, stored)
        self._checkpoint_files = kwargs.get("checkpoint_files")
        if not_divisible:
            logger.warning(
                "%d Linear layer(s) have in_features that are not a multiple of block_size %d and stay "
                "unquantized: %s. Add them to modules_to_not_convert to silence this warning.",
                len(not_divisible),
                config.block_size,
                ", ".join(not_divisible),
            )
            # Recorded in config.json, so a reload skips exactly the same layers.
            config.modules_to_not_convert = config.modules_to_not_convert + not_divisible

    def _prepare_experts(self, model: torch.nn.Module, stored: dict[str, str]) -> list[str]:
        """Fused experts modules that become MXFP4 (their scale placeholders registered); a stored checkpoint's
        experts are MXFP4 when it holds expert scales (``stored``: its tensor names; a checkpoint written
        before experts were quantized holds float experts, and they load as such)."""
        config = self.quantization_config
        if stored and not any(".experts." in key and key.endswith(experts.SCALE_SUFFIX) for key in stored):
            return []
        names = [
            name for name, module in model.named_modules()
            if experts.is_fused_experts(module) and not replace.module_matches(name, config.modules_to_not_convert)
            and experts.divisible(module, config.block_size)
        ]  # fmt: skip
        for name in names:
            if self.calibrates:  # they load float, and are quantized per expert after the calibration text
                continue
            module = model.get_submodule(name)
            experts.prepare_for_loading(module, block_size=config.block_size, stored=self.pre_quantized)
        if names:
            self._experts_implementation = getattr(model.config, "_experts_implementation", None)
        return names

    # 3. while weights load -----------------------------------------------------------

    def param_needs_quantization(self, model: torch.nn.Module, param_name: str, **kwargs: Any) -> bool:
        """The float weight of an MXFP4Linear or of MXFP4 experts that waits for one (a calibrated load's
        experts and Linears load float, and are quantized after the calibration text); stored bytes load as
        they are."""
        if self.pre_quantized:
            return False
        module_name, _, tensor_name = param_name.rpartition(".")
        module = model.get_submodule(module_name)
        if experts.awaits_quantization(module, tensor_name):
            return True
        return not self.calibrates and tensor_name == "weight" and replace.awaits_quantization(module)

    # transformers 5.24+: a converter that builds a weight from checkpoint tensors builds its scale alike
    serialized_names = {"weight": ["weight", "weight" + experts.SCALE_SUFFIX]}

    def update_weight_conversions(self, weight_conversions: Any, model: torch.nn.Module | None = None) -> Any:
        # transformers 5.17 calls it with the conversions alone, later versions with the model too
        if model is None:
            return super().update_weight_conversions(weight_conversions)
        return super().update_weight_conversions(weight_conversions, model)

    def param_element_size(self, model: torch.nn.Module, param_name: str, param: torch.Tensor) -> float:
        """Bytes per element as loaded, so device_map='auto' plans with 4-bit codes, not bf16."""
        if self.param_needs_quantization(model, param_name):
            return 1 / F4_CODES_PER_BYTE  # the scales are a uint8 tensor of their own
        return param.element_size()

    def get_quantize_ops(self) -> replace.QuantizeOnLoad:
        return replace.QuantizeOnLoad(self)

    # 4. after loading ----------------------------------------------------------------

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
        # transformers calls this after model.eval() and after accelerate has dispatched a split
        # device_map (5.17 and 5.24 alike), so the calibration forward runs as the user's would.
        if self._experts_names and not self.calibrates:  # before any forward (the random-token pass runs them)
            self._use_mxfp4_experts(model)
        head = self._untie_head(model)
        if self.calibrates:
            self._calibrate_and_quantize(model)
        elif self.rescales:
            self._rescale_on_random_tokens(model, head)
        if head is not None and not isinstance(model.get_submodule(head), MXFP4Linear):
            # rtn without statistics (or the random-token pass fell back): the head as the method quantizes it
            config = self.quantization_config
            replace.quantize_linears_with_weights(
                model, {head: None}, block_size=config.block_size, scale_method=config.scale_method
            )
        replace.check_all_quantized(model)
        if self.quantization_config.quantize_lm_head and not self.pre_quantized:
            name = replace.output_head_name(model)
            if name is None or not isinstance(model.get_submodule(name), MXFP4Linear):
                self.quantization_config.quantize_lm_head = False  # the record says what the checkpoint holds
        if self.pre_quantized:
            for name in self._experts_names:
                experts.check_shapes(name, model.get_submodule(name))
            replace.check_stored_tensors_loaded(model)
            replace.view_stored_bytes(model)
            replace.check_stored_scales(model)
        if self.pre_quantized and self.quantization_config.dequantize:
            # the dtype the rest of the model was loaded in, as transformers' own dequantize uses
            self._dequantize(model, model.config.dtype)
            return
        self._mxfp4_names = read_back.mxfp4_module_names(model)
        self._report_coverage(model)
        card.upload_card_with_push_to_hub(model)

    def _use_mxfp4_experts(self, model: torch.nn.Module) -> None:
        experts.record_scale_conversions(model)
        experts.use_implementation(model, self._experts_names)

    def _report_coverage(self, model: torch.nn.Module) -> None:
        config = self.quantization_config
        report = coverage.coverage(model, config.modules_to_not_convert, config.block_size)
        logger.info("%s: %s", QUANT_METHOD, report.summary())
        for line in report.warnings():
            logger.warning("%s: %s", QUANT_METHOD, line)
        if not report.mxfp4:
            logger.warning(
                "%s: no layer of this model became MXFP4, so it is not an MXFP4 model and save_pretrained will "
                "refuse to label it one; load it without quantization_config instead",
                QUANT_METHOD,
            )

    def _untie_head(self, model: torch.nn.Module) -> str | None:
        """With ``quantize_lm_head``, a head tied to the input embeddings is not in the checkpoint under
        its own name, so it stayed float through the load: untie it (the embeddings stay float) and
        return its name, for the quantization that follows. None when there is nothing to untie."""
        config = self.quantization_config
        if self.pre_quantized or not config.quantize_lm_head:
            return None
        name = replace.output_head_name(model)
        if name is None or name not in replace.tied_module_names(model):
            return None
        module = model.get_submodule(name)
        if module.in_features % config.block_size or module.weight.device.type == "meta":
            why = (
                "its weight is offloaded (load on one device to quantize it)"
                if module.weight.device.type == "meta"
                else f"in_features {module.in_features} is not a multiple of block_size {config.block_size}"
            )
            logger.warning("MXFP4Config(quantize_lm_head=True): %s stays unquantized: %s", name, why)
            return None
        head, embeddings = replace.untie_output_head(model)
        # both were listed only because they were tied
        config.modules_to_not_convert = [m for m in config.modules_to_not_convert if m not in (head, embeddings)]
        weight = model.get_submodule(head).weight
        logger.warning(
            "MXFP4Config(quantize_lm_head=True): %s shares its weight with %s; it is untied and quantized, and "
            "the embeddings stay %s (MXFP4 embeddings are not supported), so a saved checkpoint holds both "
            "(%.2f MB more than the tied float weight alone)",
            head,
            embeddings,
            weight.dtype,
            weight.numel() * config.bits_per_weight / 8 / 1e6,
        )
        return head

    def _calibrate_and_quantize(self, model: torch.nn.Module) -> None:
        from transformers.utils.logging import is_progress_bar_enabled

        config = self.quantization_config
        names = calibration.eligible_linear_names(
            model, config.block_size, config.modules_to_not_convert, quantize_lm_head=config.quantize_lm_head
        )
        sequences, record = calibration.calibration_inputs(config.calibration, model)
        routed: dict[str, tuple[int, int]] = {}
        if config.algorithm == "gptq":
            quantized = sequential.gptq_sequential(
                model,
                sequences,
                names,
                block_size=config.block_size,
                scale_method=config.scale_method,
                damping=config.gptq["damping"],
                act_order=config.gptq["act_order"],
                true_sequential=config.gptq["true_sequential"],
                tune_norms=config.gptq["tune_norms"],
                end_to_end_norms=config.gptq["end_to_end_norms"],
                progress=logger.info,
                experts_names=self._experts_names,
                routed_counts=routed,
            )
            for name in self._experts_names:
                module = model.get_submodule(name)
                expert_calibration.install_quantized(module, quantized.pop(name), block_size=config.block_size)
            for name, (packed, scales) in quantized.items():
                replace.swap_in_mxfp4(model, name, packed, scales, block_size=config.block_size)
        else:
            progress = is_progress_bar_enabled()
            with expert_calibration.routed_inputs(
                model, self._experts_names, expert_calibration.RoutedMeanSquares
            ) as statistics:
                if names or not self._experts_names:  # (no Linear and no experts: it raises, naming why)
                    stats = calibration.collect_activation_stats(model, sequences, names, progress=progress)
                else:  # only experts to calibrate
                    stats = {}
                    calibration.run_sequences(model, sequences, progress=progress)
            replace.quantize_linears_with_weights(model, stats, block_size=config.block_size)
            for name in self._experts_names:
                module = model.get_submodule(name)
                result, count = expert_calibration.quantize_routed_rtn(
                    module, statistics[name], block_size=config.block_size, name=name
                )
                expert_calibration.install_quantized(module, result, block_size=config.block_size)
                routed[name] = (count, result[experts.PROJECTIONS[0]][0].shape[0])
        if self._experts_names:
            self._use_mxfp4_experts(model)
            with_tokens, total = (sum(counts) for counts in zip(*routed.values()))
            record.update(expert_calibration.experts_record(with_tokens, total))
            fallback = "data-free mse scales" if config.algorithm == "rtn" else f"{config.scale_method} without GPTQ"
            logger.info("%s: %d of %d experts received calibration tokens (the others: %s)",
                        config.algorithm, with_tokens, total, fallback)  # fmt: skip
        # From here on the config describes the calibration; it no longer holds the tokenizer or texts.
        config.calibration = record
        tokens, dataset = record["calibration_tokens"], record["dataset"]
        logger.info("%s: calibrated %d Linear layers on %d tokens of %s", config.algorithm, len(names), tokens, dataset)

    def _rescale_on_random_tokens(self, model: torch.nn.Module, float_head: str | None = None) -> None:
        """``float_head``: an untied head, still float (it was never in the checkpoint under its name): it
        is quantized from memory with its statistics, the others from the checkpoint."""
        from transformers.utils.logging import is_progress_bar_enabled

        config = self.quantization_config
        names = read_back.mxfp4_module_names(model)
        if not names and float_head is None:
            config.calibration = None  # nothing was quantized: the coverage report says why
            return
        try:
            read_weight = read_back.float_weight_reader(
                self._checkpoint_files, model, names, block_size=config.block_size, dtype=model.dtype
            )
        except read_back.FloatWeightsUnavailable as why:
            logger.warning(
                "MXFP4Config: the random-token statistics need each float weight read again from the checkpoint, "
                "and %s; the weights keep the scales of plain mse (config.json records no calibration). Pass "
                "calibration=None to ask for that, or save the float model with save_pretrained first",
                why,
            )
            config.calibration = None
            return
        sequences, record = calibration.calibration_inputs(config.calibration, model)
        heads = [float_head] if float_head is not None else []
        stats = calibration.collect_activation_stats(
            model, sequences, names + heads, progress=is_progress_bar_enabled()
        )
        head_stats = {head: stats.pop(head) for head in heads}
        read_back.requantize_linears(model, stats, read_weight, block_size=config.block_size, dtype=model.dtype)
        if head_stats:
            replace.quantize_linears_with_weights(model, head_stats, block_size=config.block_size)
        config.calibration = record

    def _dequantize(self, model: torch.nn.Module, dtype: torch.dtype | str | None = None) -> torch.nn.Module:
        if isinstance(dtype, str):  # config.dtype as config.json spells it
            dtype = getattr(torch, dtype)
        count = replace.dequantize_linears(model, dtype)
        fused = [name for name, module in model.named_modules() if experts.is_mxfp4_experts(module)]
        for name in fused:
            experts.dequantize(model.get_submodule(name), dtype or torch.bfloat16)
        if fused:  # float experts again: the implementation they were loaded with
            model.set_experts_implementation(getattr(self, "_experts_implementation", None) or "eager")
        logger.info("dequantized %d MXFP4Linear layers and %d experts modules", count, len(fused))
        card.remove_card_hook(model)
        return model

    # 5. what the model can do --------------------------------------------------------

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def get_state_dict_and_metadata(self, model: torch.nn.Module) -> tuple[dict | None, dict]:
        # save_pretrained asks for this first: refuse a model whose MXFP4 layers became float since loading
        # (a LoRA adapter merged into them), which a checkpoint labelled MXFP4 would store unreadably
        if not any(replace.stored_pairs(module) for module in model.modules()):
            raise ValueError(
                "no layer of this model is MXFP4 (nothing was quantized, or every MXFP4 layer became float), so "
                f"a checkpoint labelled {QUANT_METHOD} would be a lie: save it without quantization "
                "(model.dequantize() first), or load it without quantization_config"
            )
        skip = self.quantization_config.modules_to_not_convert
        floats = [
            name for name in getattr(self, "_mxfp4_names", ())
            if isinstance(_submodule_or_none(model, name), torch.nn.Linear) and not replace.module_matches(name, skip)
        ]  # fmt: skip
        if floats:
            raise ValueError(
                f"{len(floats)} layer(s) loaded as MXFP4Linear are float now (first {floats[0]}; a merged LoRA "
                "adapter?), and a checkpoint labelled MXFP4 cannot hold them. Save a float model with "
                "qwantize_hf.lora.merge_and_dequantize(peft_model) (or model.dequantize()), or unmerge the "
                "adapter and save it alone with peft_model.save_pretrained"
            )
        return None, {}

    @property
    def is_trainable(self) -> bool:
        # adapters train on the frozen MXFP4 base: the op has autograd for its input (linear_op.py) and
        # PEFT LoRA wraps MXFP4Linear through qwantize_hf.lora; the codes and scales never train
        return True

    @property
    def is_compileable(self) -> bool:
        # MXFP4Linear's product is a torch.library custom op with a fake implementation
        # (qwantize_hf/linear_op.py): torch.compile traces it and CUDA graphs capture it.
        return True


def _submodule_or_none(model: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


# --------------------------------------------------------------------------- registration


def _is_ours(registered: type, ours: type) -> bool:
    # After importlib.reload the class is a new object with the same module and name.
    return (registered.__module__, registered.__qualname__) == (ours.__module__, ours.__qualname__)


def _register_once(mapping: dict[str, type], cls: type, public_register: Any) -> None:
    registered = mapping.get(QUANT_METHOD)
    if registered is None:
        public_register(QUANT_METHOD)(cls)
    elif _is_ours(registered, cls):
        mapping[QUANT_METHOD] = cls  # a reload: point at the fresh class
    else:
        raise RuntimeError(
            f"quant_method {QUANT_METHOD!r} is already registered with transformers by "
            f"{registered.__module__}.{registered.__qualname__}; uninstall the package that registers it"
        )


def register() -> None:
    """Register MXFP4Config and MXFP4HfQuantizer with transformers; safe to call again."""
    _register_once(transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, MXFP4Config, register_quantization_config)
    _register_once(transformers_auto.AUTO_QUANTIZER_MAPPING, MXFP4HfQuantizer, register_quantizer)
    # transformers lets only the config types in this tuple take loading-time fields
    # (our `dequantize`) from the config passed to from_pretrained of a quantized
    # checkpoint; there is no public call to join it.
    kept = tuple(t for t in transformers_auto.LOADING_ATTRIBUTES_CONFIG_TYPES if not _is_ours(t, MXFP4Config))
    transformers_auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*kept, MXFP4Config)
