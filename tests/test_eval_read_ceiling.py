"""The read kernel of eval/kernels/bench_read_ceiling.py reads every byte once: under the interpreter on CPU,
compiled on a GPU. A config that skipped or repeated bytes would time a different read."""

import functools

import pytest
import torch

from tests.conftest import KERNEL_DEVICE, load_eval_script

brc = load_eval_script("kernels", "bench_read_ceiling.py")

INTERPRET = KERNEL_DEVICE == "cpu"


def xor_reference(t: torch.Tensor) -> int:
    return functools.reduce(lambda a, b: a ^ b, t.flatten().tolist(), 0)


@pytest.mark.parametrize("per_sm, warps, unroll, contiguous", brc.STREAM_GRID[::9] + brc.STREAM_GRID[-1:])
@pytest.mark.parametrize("n_vec", [1, 1000])  # less than a chunk; not a whole number of chunks
def test_stream_read_reads_every_vector_once(per_sm, warps, unroll, contiguous, n_vec):
    gen = torch.Generator().manual_seed(n_vec)
    buf = torch.randint(-(2**31), 2**31 - 1, (4 * n_vec,), generator=gen, dtype=torch.int32).to(KERNEL_DEVICE)
    programs = per_sm * 3  # a pretend GPU of 3 SMs
    out = torch.zeros(programs, dtype=torch.int32, device=KERNEL_DEVICE)
    brc._stream_read[(programs,)](buf, out, n_vec, INTERPRET=INTERPRET, **brc.stream_kwargs(warps, unroll, contiguous))
    want = xor_reference(buf.cpu())
    assert xor_reference(out.cpu()) == want
    assert brc.xor_all(buf) == want


def test_xor_all_of_odd_lengths():
    t = torch.tensor([5, 9, -3, 7, 1], dtype=torch.int32)
    assert brc.xor_all(t) == xor_reference(t)
    assert brc.xor_all(t[:1]) == 5
