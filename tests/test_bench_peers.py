"""eval/bench_peers.py's smoke run on the CPU (``--device cpu --small``): bf16 and ours are checked and
timed on a 64x64 weight, every peer gets its one ``skip`` line, and the markdown and JSON come out whole."""

from __future__ import annotations

import json

from tests.conftest import load_eval_script

bench_peers = load_eval_script("bench_peers.py")


def test_small_cpu_run_writes_the_tables_and_skips_the_peers(tmp_path, capsys):
    out, records = tmp_path / "x.md", tmp_path / "x.json"
    bench_peers.main(["--device", "cpu", "--small", "--out", str(out), "--json", str(records)])
    text = out.read_text()
    assert "### N x K = 64x64" in text and "### Summary" in text
    header = "| M | bf16 us | ours us | ours x bf16 |"
    assert header in text
    rows = [line for line in text.splitlines() if line.startswith(("| 1 |", "| 17 |"))]
    assert len(rows) == 4  # M = 1 and 17, in the shape's table and in the summary
    for row in rows[:2]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] != "-" and cells[2] not in ("-", "wrong")  # bf16 and ours timed
        assert cells[-1] == "torch (cpu)"  # ours' kernel: the op's torch path on the CPU
        assert cells[4:-1] == ["-"] * 8  # every peer's column: skipped
    for peer in bench_peers.PEERS:
        assert f"skip {peer}: " in text  # installed or not, peers don't run on the CPU
    assert "wrong" not in text.replace("`wrong`", "")
    data = json.loads(records.read_text())
    checked = [r for r in data["records"] if r["status"] == "ok"]
    assert {(r["variant"], r["m"]) for r in checked} == {(v, m) for v in ("bf16", "ours") for m in (1, 17)}
    assert all(r["err"] < bench_peers.OWN_BOUND for r in checked)
    assert "skip bnb-nf4: " in capsys.readouterr().out


def test_merge_renders_earlier_runs_as_one_report(tmp_path):
    first, merged = tmp_path / "a.json", tmp_path / "m.md"
    bench_peers.main(["--device", "cpu", "--small", "--ms", "1", "--json", str(first)])
    bench_peers.main(["--merge", str(first), str(first), "--out", str(merged)])
    text = merged.read_text()
    assert text.count("### N x K = 64x64") == 1 and text.count("skip bnb-nf4: ") == 1  # one table, notes once
    assert "| 1 | " in text and "--merge" in text
