"""MXFP4Config: what a user asks for and what config.json records, validated.

This file holds the configuration and nothing else: no module replacement, no
tensor math, no registration (quantizer.py registers it with transformers).
Every field here is written to ``config.json`` under ``quantization_config``
and read back from it, so a checkpoint says how it was made.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import logging
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from qwantize_hf.calibration import CALIBRATED, dataset_name, tokenizer_name
from qwantize_hf.constants import BITS_PER_WEIGHT, BLOCK_SIZES, DEFAULT_BLOCK_SIZE
from qwantize_hf.methods import DEFAULT_ALGORITHM, DEFAULT_SCALE_METHOD, RANDOM_TOKENS, algorithm, scale_method

logger = logging.getLogger(__name__)

QUANT_METHOD = "qwantize_mxfp4"  # the built-in "mxfp4" belongs to GPT-OSS
PACKAGE_VERSION = "0.1.0"  # qwantize_hf.__version__
# config.json names the package that wrote it, so a reader without qwantize_hf learns what to install:
# transformers' own message for an unknown quant_method says nothing of it.
WRITER_FIELD = "quantizer"
WRITER = {
    "package": "qwantize_hf",
    "version": PACKAGE_VERSION,
    "to_load": "pip install qwantize_hf, then import qwantize_hf before from_pretrained",
}
# Version of the on-disk layout: `<module>.weight` uint8 [N, K/2] (element 2i in
# the low nibble), `<module>.weight_scale` uint8 [N, K/block_size] (UE8M0),
# `<module>.bias` unchanged. Bump it whenever that layout changes meaning.
FORMAT_VERSION = 1

# `calibration` keys, named as transformers' GPTQConfig names its own: `dataset` (a list
# of texts, a local text file, or a `datasets` name) and `tokenizer` (an object, or a
# name/path for AutoTokenizer) make a request; the token budget and sequence length
# have defaults. After the run the quantizer replaces the request by a record of what
# was used, marked `calibrated: true`; that record is what config.json holds.
CALIBRATION_DEFAULTS = {"calibration_tokens": 32768, "calibration_seq_len": 1024}
# calibration's default: statistics on random token ids where the method weights its search
# (scale_method="mse", algorithm="rtn"), none otherwise; None asks for none.
CALIBRATION_AUTO = "auto"
CALIBRATION_KEYS = ("dataset", "tokenizer", *CALIBRATION_DEFAULTS)
# from_dict's private keyword: the config.json fields this version does not know.
_FROM_CONFIG_JSON = "_unknown_config_json_fields"
# GPTQ's settings (algorithm="gptq"): the damping added to the Hessian's diagonal, as a share of
# its mean; columns in order of decreasing Hessian diagonal; each group of a layer's Linears
# calibrated on inputs that carry the error of the groups before it; each decoder layer's norm
# weights fitted to the float layer's outputs after it is quantized; then all of them at once, end
# to end, to the float model's next-token distributions.
GPTQ_DEFAULTS = {  # sequential.gptq_sequential's
    "damping": 0.01,
    "act_order": True,
    "true_sequential": False,
    "tune_norms": True,
    "end_to_end_norms": True,
}


class MXFP4Config(QuantizationConfigMixin):
    """Quantize every eligible ``nn.Linear`` to MXFP4 (4-bit E2M1 codes, one UE8M0 scale per block).

    Args:
        block_size: elements per scale along the input dimension, 32 (4.25 bits/weight) or 16 (4.5).
        scale_method: ``"mse"`` (least squared error, default; weighted by activations with
            ``calibration``), ``"naive"`` (OCP MX) or ``"even"``.
        modules_to_not_convert: module names (or dotted suffixes of them) to keep unquantized, in
            addition to ``lm_head`` (unless ``quantize_lm_head``), the model's
            ``_keep_in_fp32_modules`` and tied modules, which stay unquantized. config.json
            records the whole list the model was quantized with.
        quantize_lm_head: also quantize the output head (``lm_head``), which stays float by default
            (it is the most sensitive Linear; the eval measures what quantizing it costs). A head
            tied to the input embeddings is untied: it gets an MXFP4 weight of its own and the
            embeddings stay float, so the checkpoint stores both. GPTQ quantizes it last, on the
            final norm's outputs.
        dequantize: at load time, turn a quantized checkpoint back into a plain model of
            ``nn.Linear`` layers holding ``dequantize(quantize(W))``.
        base_model: the Hub id the weights were quantized from (filled in on load when known).
        scales_from: who chose the stored scales when another tool did (an imported checkpoint, e.g.
            GPT-OSS as published); None (default, and not written to config.json): this library, by
            ``scale_method``. With it set, ``scale_method`` only says how new weights would be quantized.
        calibration: activation-aware scales (``scale_method="mse"`` or ``algorithm="gptq"``):
            every block's scale is searched with each element's squared error weighted by its
            input feature's mean square activation on calibration tokens. A dict with ``dataset``
            (a list of texts, a local text file, a ``datasets`` name, or ``"random-tokens"``:
            token ids drawn uniformly from the model's vocabulary with a fixed seed, no text and
            no tokenizer), ``tokenizer`` (a tokenizer or its name/path; not with
            ``"random-tokens"``), ``calibration_tokens`` (budget, default 32768) and
            ``calibration_seq_len`` (default 1024). With a text the model loads unquantized and
            the bf16 model is held while the text runs through it. ``"random-tokens"`` holds no
            float model: each weight is quantized as it loads, the random tokens run through the
            quantized model, and each weight is read once more from the (safetensors) checkpoint
            and quantized with its statistics. ``"auto"`` (default): ``{"dataset":
            "random-tokens"}`` for ``scale_method="mse"`` with ``algorithm="rtn"`` (it needs no
            data and beats every per-weight rule measured on perplexity, ``eval/results``), none
            for the rules that weigh nothing; None: none, each weight quantized by itself as it
            loads (plain ``mse``: the least squared error of the weight). config.json records
            what was used, never the text or tokenizer.
        algorithm: ``"rtn"`` (default: each weight rounded to the nearest code at its block's
            scale) or ``"gptq"``: error feedback through the Hessian of each Linear's calibration
            inputs, each block's scale chosen inside the loop by ``scale_method`` with the
            Hessian's weights, decoder layers quantized one at a time on the outputs of the
            quantized layers before them. ``"gptq"`` needs ``calibration``.
        gptq: GPTQ's settings, a dict with ``damping`` (share of the Hessian's mean diagonal
            added to it, default 0.01), ``act_order`` (columns in order of decreasing Hessian
            diagonal, default True), ``true_sequential`` (each group of a layer's Linears
            calibrated after the groups before it are quantized, default False: one
            calibration pass a layer), ``tune_norms`` (default True: after each decoder
            layer is quantized, its normalization weights, which stay bf16, are fitted so its
            outputs on the quantized model's hidden states match the float layer's on the
            float model's) and ``end_to_end_norms`` (default True: then all the norm weights
            at once, to the float model's next-token distributions, backpropagating through
            the whole quantized model; see ``qwantize_hf.sequential``).
        format_version: the checkpoint layout version; a checkpoint from a newer layout is refused.
    """

    def __init__(
        self,
        block_size: int = DEFAULT_BLOCK_SIZE,
        scale_method: str = DEFAULT_SCALE_METHOD,
        modules_to_not_convert: list[str] | None = None,
        quantize_lm_head: bool = False,
        dequantize: bool = False,
        base_model: str | None = None,
        scales_from: str | None = None,
        calibration: dict[str, Any] | str | None = CALIBRATION_AUTO,
        algorithm: str = DEFAULT_ALGORITHM,
        gptq: dict[str, Any] | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(
                f"MXFP4Config is for quant_method {QUANT_METHOD!r}, got {quant_method!r}; "
                "load that checkpoint with the quantization config of its own method"
            )
        unknown = sorted(kwargs.pop(_FROM_CONFIG_JSON, None) or ())
        if kwargs:
            # A keyword the caller typed: refuse it, or a typo would quantize with a default.
            names = sorted(self._field_names())
            close = {key: difflib.get_close_matches(key, names, n=1) for key in kwargs}
            hints = "; ".join(f"{key!r}: did you mean {match[0]!r}?" for key, match in close.items() if match)
            raise TypeError(
                f"MXFP4Config got unknown argument(s) {sorted(kwargs)}" + (f" ({hints})" if hints else "")
                + f"; the arguments are {names}"
            )
        if unknown:
            # A newer qwantize_hf may write fields this version does not know. They
            # cannot change the bytes (format_version guards that), so they are dropped.
            logger.warning("MXFP4Config: ignoring unknown fields %s of config.json (written by a newer qwantize_hf?)",
                           unknown)
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.block_size = block_size
        self.scale_method = scale_method
        if isinstance(modules_to_not_convert, str):
            raise TypeError(
                f"modules_to_not_convert must be a list of module names, got the string {modules_to_not_convert!r}; "
                f"write [{modules_to_not_convert!r}]"
            )
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        self.quantize_lm_head = quantize_lm_head
        self.dequantize = dequantize
        self.base_model = base_model
        self.scales_from = scales_from
        # Our own dict: defaults are filled in and the quantizer swaps a request for a record.
        self.calibration = dict(calibration) if isinstance(calibration, dict) else calibration
        self.algorithm = algorithm
        self.gptq = dict(gptq) if isinstance(gptq, dict) else gptq
        self.post_init()

    @classmethod
    def _field_names(cls) -> list[str]:
        return [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "kwargs")]

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Read config.json's ``quantization_config``: fields this version does not know are dropped
        with a warning (a newer qwantize_hf wrote them), unlike unknown keyword arguments."""
        known = set(cls._field_names())
        fields = {key: value for key, value in config_dict.items() if key in known}
        # WRITER_FIELD says who wrote the file; a save writes this version's own
        fields[_FROM_CONFIG_JSON] = [key for key in config_dict if key not in known and key != WRITER_FIELD]
        return super().from_dict(fields, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def post_init(self) -> None:
        """Raise ValueError/TypeError naming the bad field and the accepted values."""
        if self.scales_from is not None and (not isinstance(self.scales_from, str) or not self.scales_from.strip()):
            raise TypeError(f"scales_from must be None or a non-empty string naming a tool, got {self.scales_from!r}")
        if not isinstance(self.format_version, int) or isinstance(self.format_version, bool):
            raise TypeError(f"format_version must be an int, got {self.format_version!r}")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint uses qwantize_mxfp4 format_version {self.format_version}, but this "
                f"qwantize_hf reads up to {FORMAT_VERSION}; upgrade qwantize_hf (pip install -U qwantize_hf)"
            )
        if self.format_version < 1:
            raise ValueError(f"format_version must be >= 1, got {self.format_version}")
        if type(self.block_size) is not int or self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size!r}")
        scale_method(self.scale_method)
        needs_calibration = algorithm(self.algorithm).needs_calibration
        if self.modules_to_not_convert is not None and not all(
            isinstance(name, str) and name for name in self.modules_to_not_convert
        ):
            raise TypeError(
                "modules_to_not_convert must be a list of module names such as ['lm_head'], "
                f"got {self.modules_to_not_convert!r}"
            )
        if not isinstance(self.quantize_lm_head, bool):
            raise TypeError(f"quantize_lm_head must be True or False, got {self.quantize_lm_head!r}")
        if self.quantize_lm_head and "lm_head" in (self.modules_to_not_convert or ()):
            raise ValueError(
                "quantize_lm_head=True asks for lm_head quantized, but modules_to_not_convert lists 'lm_head'; "
                "drop one of them"
            )
        if not isinstance(self.dequantize, bool):
            raise TypeError(f"dequantize must be True or False, got {self.dequantize!r}")
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise TypeError(f"base_model must be a Hub id string or None, got {self.base_model!r}")
        if self.calibration == CALIBRATION_AUTO:
            takes_weights = scale_method(self.scale_method).takes_weights and not needs_calibration
            self.calibration = {"dataset": RANDOM_TOKENS} if takes_weights else None
        if self.calibration is not None and not isinstance(self.calibration, dict):
            raise TypeError(
                f"calibration must be a dict, {CALIBRATION_AUTO!r} or None, got {type(self.calibration).__name__}"
            )
        if self.calibration is not None:
            self._check_calibration()
        elif needs_calibration:
            raise ValueError(
                f"algorithm={self.algorithm!r} needs calibration text: pass "
                "calibration={'dataset': texts, 'tokenizer': tokenizer} (see MXFP4Config's docstring)"
            )
        self._check_gptq()

    def _check_gptq(self) -> None:
        if self.gptq is None:
            if self.algorithm == "gptq":
                self.gptq = dict(GPTQ_DEFAULTS)
            return
        if not isinstance(self.gptq, dict):
            raise TypeError(f"gptq must be a dict of GPTQ settings or None, got {type(self.gptq).__name__}")
        if self.algorithm != "gptq":
            raise ValueError(f"gptq={self.gptq!r} sets GPTQ's options, but algorithm is {self.algorithm!r}; "
                             "pass algorithm='gptq' or drop gptq")
        unknown = sorted(set(self.gptq) - set(GPTQ_DEFAULTS))
        if unknown:
            raise ValueError(f"gptq has unknown key(s) {unknown}; the keys are {list(GPTQ_DEFAULTS)}")
        for key, default in GPTQ_DEFAULTS.items():
            self.gptq.setdefault(key, default)
        damping = self.gptq["damping"]
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 < damping < 1:
            raise ValueError(f"gptq['damping'] must be a number in (0, 1), e.g. 0.01, got {damping!r}")
        for key in ("act_order", "true_sequential", "tune_norms", "end_to_end_norms"):
            if not isinstance(self.gptq[key], bool):
                raise TypeError(f"gptq[{key!r}] must be True or False, got {self.gptq[key]!r}")

    def _check_calibration(self) -> None:
        calibration = self.calibration
        # A record (read back from config.json) may carry more than a request's keys.
        unknown = sorted(set(calibration) - {*CALIBRATION_KEYS, CALIBRATED})
        if unknown and not calibration.get(CALIBRATED):
            raise ValueError(f"calibration has unknown key(s) {unknown}; the keys are {list(CALIBRATION_KEYS)}")
        if self.algorithm == "rtn" and not scale_method(self.scale_method).takes_weights:
            raise ValueError(
                f"calibration weights the least-squares scale search, which scale_method={self.scale_method!r} "
                "does not do; use MXFP4Config(scale_method='mse', calibration=...), algorithm='gptq', "
                "or drop calibration"
            )
        for key, default in CALIBRATION_DEFAULTS.items():
            value = calibration.setdefault(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"calibration[{key!r}] must be a positive int, got {value!r}")
        tokens, seq_len = calibration["calibration_tokens"], calibration["calibration_seq_len"]
        if tokens < seq_len:
            raise ValueError(
                f"calibration_tokens {tokens} is fewer than one sequence of calibration_seq_len {seq_len}; "
                "raise calibration_tokens or lower calibration_seq_len"
            )
        if calibration.get(CALIBRATED):
            return  # a record read back from config.json: it describes, it is not run again
        dataset = calibration.get("dataset")
        if dataset is None:
            raise ValueError(
                "calibration needs a 'dataset': a list of texts, the path of a local text file, or a "
                "`datasets` name, e.g. calibration={'dataset': texts, 'tokenizer': tokenizer}"
            )
        if dataset == RANDOM_TOKENS:
            if calibration.get("tokenizer") is not None:
                raise ValueError(
                    f"calibration['dataset'] = {RANDOM_TOKENS!r} draws token ids from the model's vocabulary and "
                    "takes no tokenizer; drop calibration['tokenizer'] (or give a text to tokenize)"
                )
            return
        if isinstance(dataset, (list, tuple)):
            if not all(isinstance(text, str) for text in dataset):
                raise TypeError("calibration['dataset'] given as a list must hold only strings (the texts)")
            if not "".join(dataset).strip():
                raise ValueError("calibration['dataset'] is empty: the texts hold no characters but whitespace")
        elif not isinstance(dataset, str):
            raise TypeError(
                "calibration['dataset'] must be a list of texts, a text file path or a `datasets` name, "
                f"got {type(dataset).__name__}"
            )
        elif not dataset.strip():
            raise ValueError("calibration['dataset'] is an empty string; give texts, a text file or a `datasets` name")
        tokenizer = calibration.get("tokenizer")
        if tokenizer is None or (isinstance(tokenizer, str) and not tokenizer.strip()):
            raise ValueError(
                "calibration needs a 'tokenizer' to turn the dataset into tokens: pass the model's tokenizer "
                "(AutoTokenizer.from_pretrained(model_id)) or its name/path, e.g. "
                "calibration={'dataset': texts, 'tokenizer': model_id}"
            )
        if not isinstance(tokenizer, str) and not callable(tokenizer):
            raise TypeError(f"calibration['tokenizer'] must be a tokenizer or its name/path, got {tokenizer!r}")

    @property
    def calibrates(self) -> bool:
        """True when this config asks for a calibration run (not a record of one that ran)."""
        return self.calibration is not None and not self.calibration.get(CALIBRATED)

    @property
    def rescales_on_random_tokens(self) -> bool:
        """A calibration run that needs no float model held: ``rtn`` on random token ids. Each weight
        is quantized as it loads, then once more, read again from the checkpoint, with the
        statistics the quantized model gives on the random tokens."""
        return self.calibrates and self.algorithm == "rtn" and self.calibration["dataset"] == RANDOM_TOKENS

    @property
    def bits_per_weight(self) -> float:
        """4 bits of code plus one 8-bit scale per block: 4.25 for block 32, 4.5 for block 16."""
        return BITS_PER_WEIGHT[self.block_size]

    def get_loading_attributes(self) -> dict[str, Any]:
        """Fields a user may change when loading an already quantized checkpoint."""
        return {"dequantize": self.dequantize}

    def to_dict(self) -> dict[str, Any]:
        # Not super().to_dict(): that deep-copies every field, the tokenizer and texts too.
        config = {}
        for key, value in self.__dict__.items():
            if key == "dequantize":
                continue  # a request for this load, not a property of the stored bytes
            if key == "scales_from" and value is None:
                continue  # written only for imported scales
            if key == "calibration" and value is not None:
                value = calibration_summary(value)
            config[key] = copy.deepcopy(value)
        config[WRITER_FIELD] = dict(WRITER)
        return config

    def __iter__(self):
        yield from self.to_dict().items()

    def __deepcopy__(self, memo: dict[int, Any]) -> MXFP4Config:
        # The request's tokenizer and texts are inputs that are only read: share them.
        for key in ("dataset", "tokenizer"):
            value = (self.calibration or {}).get(key)
            if value is not None and not isinstance(value, str):
                memo[id(value)] = value
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone


def calibration_summary(calibration: dict[str, Any]) -> dict[str, Any]:
    """The JSON form of ``calibration``: a record as it is; a request described, without text or tokenizer."""
    if calibration.get(CALIBRATED):
        return dict(calibration)
    summary = {key: calibration.get(key) for key in CALIBRATION_KEYS}
    if summary["dataset"] is not None:
        summary["dataset"] = dataset_name(summary["dataset"])
    if summary["tokenizer"] is not None:
        summary["tokenizer"] = tokenizer_name(summary["tokenizer"])
    return summary
