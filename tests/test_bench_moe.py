"""eval/bench_moe.py's smoke run on the CPU (``--device cpu --small``): every variant, ours forced down
each path among them, is checked against the fake-quant reference and timed, and the table comes out whole."""

from __future__ import annotations

import sys

from tests.conftest import load_eval_script

bench_moe = load_eval_script("bench_moe.py")


def test_small_cpu_run_checks_and_times_every_variant(tmp_path, monkeypatch):
    out = tmp_path / "moe.md"
    argv = ["bench_moe.py", "--device", "cpu", "--small", "--tokens", "1", "8", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench_moe.main()
    text = out.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| tokens |"))
    for name in ("bf16 eager", "ours (auto)", "ours routed-gemv", "ours grouped", "ours loop"):
        assert name in header
    rows = [line for line in text.splitlines() if line.startswith(("| 1 |", "| 8 |"))]
    assert len(rows) == 2 and all(" e |" in row for row in rows)  # eager on the CPU
    assert "worst relative error" in text
