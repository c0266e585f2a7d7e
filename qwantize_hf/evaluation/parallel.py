"""Data parallelism for the eval: processes started by ``accelerate launch`` or ``torchrun`` share the windows.

Each process scores every ``world_size``-th window; one all-reduce of a float64
vector sums the NLL, the token counts and how often each position was scored,
and ``combine_sums`` refuses a result unless every position was scored exactly
once, as one process scores it. This file must never change what is scored:
the combined result equals ``nll.token_nll`` over all windows.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qwantize_hf.evaluation import nll
from qwantize_hf.evaluation.nll import PerplexityResult, Window, scored_positions


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
        return nll.token_nll(model, input_ids, windows, progress=progress, desc=desc)
    import torch.distributed as dist

    start = time.perf_counter()
    shard = shard_windows(windows, parallel.rank, parallel.world_size)
    if shard:
        local = nll.token_nll(model, input_ids, shard, progress=progress and parallel.is_main, desc=desc)
    else:  # more processes than windows
        local = PerplexityResult(0.0, 0, torch.zeros(0, dtype=torch.long), 0.0)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    check_same_text_length(input_ids, windows, device)
    vector = local_sums(local, input_ids)
    if device is not None:  # NCCL reduces CUDA tensors only
        vector = vector.to(device)
    dist.all_reduce(vector, op=dist.ReduceOp.SUM)
    return combine_sums(vector, windows, input_ids, time.perf_counter() - start)


def check_same_text_length(input_ids: torch.Tensor, windows: Sequence[Window], device: torch.device | None) -> None:
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
