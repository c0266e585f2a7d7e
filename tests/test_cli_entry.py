"""The console scripts' entry points (``qwantize_cli``): they parse before torch and transformers load."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)  # fmt: skip


def test_help_and_bad_arguments_answer_without_torch_or_transformers():
    done = run_python("""
        import sys
        import qwantize_cli
        for main, argv in ((qwantize_cli.eval_main, ["--help"]), (qwantize_cli.eval_main, ["--tokens", "x"]),
                           (qwantize_cli.convert_main, ["--help"]), (qwantize_cli.convert_main, ["nope"])):
            try:
                main(argv)
            except SystemExit as exit:
                print("exit", exit.code)
        print("heavy", sorted(m for m in ("torch", "transformers") if m in sys.modules))
        print("package left uninitialized", "qwantize_hf" not in sys.modules)
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("exit 0") == 2 and done.stdout.count("exit 2") == 2, done.stdout
    assert "usage: qwantize-eval" in done.stdout and "--calibration-tokens" in done.stdout
    assert "invalid int value: 'x'" in done.stderr and "invalid choice: 'nope'" in done.stderr
    assert "heavy []" in done.stdout and "package left uninitialized True" in done.stdout


def test_after_parsing_the_package_initializes_and_registers(tmp_path):
    # a real command: the package's __init__ runs (registering the quantizer) before the work
    done = run_python(f"""
        import sys
        import qwantize_cli
        source, out = {str(tmp_path / "missing")!r}, {str(tmp_path / "out")!r}
        code = qwantize_cli.convert_main(["to-compressed-tensors", source, out])
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        import qwantize_hf
        registered = "qwantize_mxfp4" in AUTO_QUANTIZER_MAPPING
        print("code", code, "registered", registered, hasattr(qwantize_hf, "MXFP4Config"))
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "code 1 registered True True" in done.stdout
    assert "has no config.json" in done.stderr
