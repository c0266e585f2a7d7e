"""Data-parallel perplexity: windows split across processes, NLL summed once, the single-process result.

The last test really launches two CPU processes with ``accelerate launch``
(gloo backend) and compares their perplexities with one process's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwantize_hf import evaluation
from qwantize_hf.evaluation.parallel import check_same_text_length
from tests.test_perplexity import TEXT, byte_tokenizer, tiny_llama
from tests.tiny_models import COMMON, VOCAB, save_random_model

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the split


@pytest.mark.parametrize(("n", "context_length", "stride"), [(300, 32, 16), (97, 16, 16), (50, 64, 8)])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shards_partition_the_windows(n, context_length, stride, world_size):
    windows = evaluation.sliding_windows(n, context_length, stride)
    shards = [evaluation.shard_windows(windows, rank, world_size) for rank in range(world_size)]
    assert sorted((w for shard in shards for w in shard), key=lambda w: w.begin) == windows
    assert sum(len(shard) for shard in shards) == len(windows)
    # round robin: no process gets more than one window more than another
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_refuses_a_rank_outside_the_group():
    windows = evaluation.sliding_windows(100, 16, 8)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        evaluation.shard_windows(windows, 2, 2)


# --------------------------------------------------------------------------- the sum (the all-reduce, done by hand)


def scored_by_shards(model, ids, windows, world_size):
    """What each process would contribute: its ``local_sums`` vector."""
    vectors = []
    for rank in range(world_size):
        shard = evaluation.shard_windows(windows, rank, world_size)
        if shard:
            local = evaluation.token_nll(model, ids, shard, progress=False)
        else:
            local = evaluation.PerplexityResult(0.0, 0, torch.zeros(0, dtype=torch.long), 0.0)
        vectors.append(evaluation.local_sums(local, ids))
    return vectors


@pytest.mark.parametrize("world_size", [2, 3, 16])
def test_summed_shards_equal_one_process(world_size):
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(5))
    windows = evaluation.sliding_windows(len(ids), 40, 16)
    single = evaluation.token_nll(model, ids, windows, progress=False)
    summed = torch.stack(scored_by_shards(model, ids, windows, world_size)).sum(0)
    combined = evaluation.combine_sums(summed, windows, ids, wall_time_s=0.0)
    assert combined.tokens_scored == single.tokens_scored == len(ids) - 1
    assert torch.equal(combined.positions, single.positions)
    assert combined.perplexity == pytest.approx(single.perplexity, rel=1e-12)


def test_a_window_scored_twice_or_never_is_refused():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (120,), generator=torch.Generator().manual_seed(6))
    windows = evaluation.sliding_windows(len(ids), 32, 16)
    first, second = scored_by_shards(model, ids, windows, 2)
    with pytest.raises(RuntimeError, match=r"exactly once.*too often: \[\]; never: \[32, 33,"):
        evaluation.combine_sums(first, windows, ids, wall_time_s=0.0)  # the second process's windows are missing
    with pytest.raises(RuntimeError, match=r"exactly once.*too often: \[1, 2,"):
        evaluation.combine_sums(first + second + first, windows, ids, wall_time_s=0.0)


def test_processes_holding_other_token_ids_are_refused():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (120,), generator=torch.Generator().manual_seed(7))
    windows = evaluation.sliding_windows(len(ids), 32, 16)
    first, _ = scored_by_shards(model, ids, windows, 2)
    other_ids = ids.clone()
    other_ids[100] = (other_ids[100] + 1) % VOCAB  # the second process read a different text
    _, second = scored_by_shards(model, other_ids, windows, 2)
    with pytest.raises(RuntimeError, match="other token ids"):
        evaluation.combine_sums(first + second, windows, ids, wall_time_s=0.0)


# --------------------------------------------------------------------------- devices


def test_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert evaluation.data_parallel() is None
    assert evaluation.process_device("auto", None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert evaluation.process_device("cpu", None) == torch.device("cpu")


def test_each_process_takes_the_gpu_of_its_local_rank():
    parallel = evaluation.DataParallel(rank=3, world_size=4, local_rank=1)
    assert evaluation.process_device("cuda", parallel) == torch.device("cuda", 1)
    assert evaluation.process_device("cpu", parallel) == torch.device("cpu")
    with pytest.raises(ValueError, match="would put all 4 processes on one GPU"):
        evaluation.process_device("cuda:0", parallel)


# --------------------------------------------------------------------------- two real processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_eval_folder(tmp_path_factory):
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("dp-tiny-llama")
    save_random_model(LlamaConfig(**COMMON), folder)
    byte_tokenizer().save_pretrained(folder)
    (folder / "eval.txt").write_text(TEXT)
    return folder


def test_two_processes_under_accelerate_launch_give_the_single_process_perplexity(tiny_eval_folder, tmp_path):
    folder = tiny_eval_folder
    args = [
        "--model", str(folder), "--text", str(folder / "eval.txt"), "--methods", "naive", "mse",
        "--tokens", "400", "--context-length", "64", "--stride", "32", "--dtype", "float32",
        "--no-card", "--no-progress", "--name", "dp",
    ]  # fmt: skip
    single = evaluation.run_comparison(
        evaluation.RunSettings(
            model=str(folder), text=[str(folder / "eval.txt")], methods=["naive", "mse"], tokens=400,
            context_length=64, stride=32, dtype="float32", device="auto", progress=False,
        )
    )  # fmt: skip
    # accelerate launches several processes on CPU only through its multi-GPU launcher (torchrun);
    # `--cpu --num_processes 2` starts one. With no GPU, each process joins a gloo group.
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
    ]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # keep where the rest comes from
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}
    command = [*launch, str(REPO / "eval" / "perplexity.py"), *args, "--output-dir", str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count("wrote ") == 1, "only the main process writes outputs"
    parallel = json.loads((tmp_path / "dp.json").read_text())
    assert parallel["processes"] == 2 and single["processes"] == 1
    assert parallel["tokens_scored"] == single["tokens_scored"] == 400
    assert [m["method"] for m in parallel["methods"]] == ["bf16", "naive", "mse"]
    for got, expected in zip(parallel["methods"], single["methods"]):
        assert got["tokens_scored"] == expected["tokens_scored"]
        assert got["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6), got["method"]
    assert "windows shared by 2 data-parallel processes" in (tmp_path / "dp.md").read_text()


def _length_check_worker(rank: int, init_file: str, errors: list) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ids = torch.arange(100 + 7 * rank)  # the two processes tokenized different texts
        windows = evaluation.sliding_windows(ids.numel(), 32, 16)
        try:
            check_same_text_length(ids, windows, None)
        except RuntimeError as error:
            errors.append(str(error))
    finally:
        dist.destroy_process_group()


def test_processes_with_different_texts_fail_together_instead_of_hanging(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        errors = manager.list()
        mp.spawn(_length_check_worker, args=(str(tmp_path / "init"), errors), nprocs=2, join=True)
        assert len(errors) == 2 and all("different lengths" in error for error in errors)
