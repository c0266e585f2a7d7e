"""Registration with transformers, in fresh processes: reimport/reload, and loading without the plugin.

Each check runs in a subprocess so that what one process registered (or did not
register) cannot leak into another test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM
from transformers.quantizers import auto as transformers_auto

import qwantize_hf
from qwantize_hf import MXFP4Config
from qwantize_hf.quantizer import MXFP4HfQuantizer
from tests.tiny_models import FAMILIES, save_random_model

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "HF_HUB_OFFLINE": "1",
        },
    )


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("registration")
    source = save_random_model(FAMILIES["llama"](), root / "bf16")
    AutoModelForCausalLM.from_pretrained(source, quantization_config=MXFP4Config()).save_pretrained(root / "q")
    return root / "q"


def test_loading_without_the_plugin_fails_loudly(mxfp4_checkpoint):
    result = run_python(
        f"""
        import sys
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(mxfp4_checkpoint)!r})
        assert "qwantize_hf" not in sys.modules
        print("LOADED")
        """
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "LOADED" not in output, output
    # transformers names the unknown method, then refuses every packed weight's shape
    assert "Unknown quantization type, got qwantize_mxfp4" in output
    assert "mlp.up_proj.weight " in output and "MISMATCH" in output and "ignore_mismatched_sizes" in output


def test_import_twice_and_reload_then_load(mxfp4_checkpoint):
    result = run_python(
        f"""
        import importlib
        import qwantize_hf
        import qwantize_hf as again
        import qwantize_hf.config, qwantize_hf.quantizer
        importlib.reload(qwantize_hf.config)
        importlib.reload(qwantize_hf.quantizer)
        importlib.reload(qwantize_hf)
        qwantize_hf.quantizer.register()
        from transformers.quantizers import auto
        assert auto.AUTO_QUANTIZER_MAPPING["qwantize_mxfp4"] is qwantize_hf.quantizer.MXFP4HfQuantizer
        assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["qwantize_mxfp4"] is qwantize_hf.MXFP4Config
        assert [t.__name__ for t in auto.LOADING_ATTRIBUTES_CONFIG_TYPES].count("MXFP4Config") == 1
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(mxfp4_checkpoint)!r})
        assert type(model.model.layers[0].mlp.up_proj).__name__ == "MXFP4Linear"
        plain = AutoModelForCausalLM.from_pretrained(
            {str(mxfp4_checkpoint)!r}, quantization_config=qwantize_hf.MXFP4Config(dequantize=True)
        )
        assert type(plain.model.layers[0].mlp.up_proj).__name__ == "Linear"
        print("OK")
        """
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


def test_registered_classes_are_ours():
    assert transformers_auto.AUTO_QUANTIZER_MAPPING["qwantize_mxfp4"] is MXFP4HfQuantizer
    assert transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["qwantize_mxfp4"] is MXFP4Config
    assert MXFP4Config in transformers_auto.LOADING_ATTRIBUTES_CONFIG_TYPES


def test_registration_refuses_a_foreign_owner(monkeypatch):
    class OtherQuantizer(MXFP4HfQuantizer):
        pass

    monkeypatch.setitem(transformers_auto.AUTO_QUANTIZER_MAPPING, "qwantize_mxfp4", OtherQuantizer)
    with pytest.raises(RuntimeError, match="already registered with transformers by .*OtherQuantizer"):
        qwantize_hf.quantizer.register()


def test_builtin_mxfp4_is_untouched():
    # GPT-OSS's "mxfp4" stays transformers' own
    assert transformers_auto.AUTO_QUANTIZER_MAPPING["mxfp4"] is not MXFP4HfQuantizer
    assert transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["mxfp4"] is not MXFP4Config
