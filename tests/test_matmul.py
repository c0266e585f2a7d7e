"""The fused MXFP4 matmul (Triton kernels and the ``qwantize_hf::mxfp4_linear`` op) against
``dequantize_mxfp4`` + a float32 matmul.

Without a GPU the kernels run under TRITON_INTERPRET=1 (conftest.py) on small shapes,
one forced config at a time, so every code path (decode's permuted-K word path, the
in-order word path, the byte path for fp16, the CUDA-core kernel for one row, the warp-MMA
kernel with its mma written out as sums, split-K, the partial last K step) is covered on
CPU. With a GPU the same tests run compiled, plus the dispatch (which times every
candidate config once per shape), CUDA graphs and torch.compile on CUDA.
"""

from __future__ import annotations

import inspect
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from qwantize_hf import dequantize_mxfp4, quantize_mxfp4
from qwantize_hf.constants import E8M0_NAN
from qwantize_hf.kernels import matmul_dispatch as dispatch
from qwantize_hf.kernels.matmul_dispatch import gemv_config, mma_config, mxfp4_matmul_triton, tiled_config
from qwantize_hf.linear_op import mxfp4_linear, plain_eager_call
from tests.conftest import KERNEL_DEVICE, compiled_for_hopper

HAS_CUDA = torch.cuda.is_available()
MAX_REL_ERR = 1e-2

# Small tiles so the interpreter stays fast; each names the path it exercises.
CPU_CONFIGS = {
    "decode-permuted": tiled_config(16, 32, 128, 1, True, True, True, 4, 1),
    "decode-permuted-splitk": tiled_config(16, 32, 256, 3, True, True, True, 4, 1),
    "prefill-words": tiled_config(32, 32, 64, 1, False, True, False, 4, 1, group_n=2),
    "bytes-splitk": tiled_config(32, 16, 64, 2, False, False, False, 4, 1, group_n=2),
    "bytes-w-as-a": tiled_config(16, 32, 64, 1, True, False, False, 4, 1),
    # The CUDA-core kernel (any M, though dispatch gives it M <= GEMV_MAX_M): 8, 16 and 4 words a step.
    "gemv": gemv_config(16, 8, 1, 4, 1),
    "gemv-4rows": gemv_config(4, 16, 1, 4, 1),
    # Split-K with a partial last step (K = 416: splits of 24, 24 and 4 words) and with
    # empty splits (4 splits of 16-word steps over K = 160 or 96).
    "gemv-splitk": gemv_config(32, 8, 3, 4, 1),
    "gemv-splitk-empty": gemv_config(16, 16, 4, 4, 1),
    # The warp-MMA kernel (bf16 x only): 1 or 2 tiles of 16 rows per warp, 1 or 2 warps; with
    # K = 416 (52 words) and 32-word steps, split 3 has a full, a partial and an empty split.
    "mma": mma_config(1, 2, 1),
    "mma-tiles": mma_config(2, 1, 1),
    "mma-splitk": mma_config(1, 2, 3),
    "mma-x-late": mma_config(2, 2, 1, x_ahead=False),  # x loaded in the step that uses it
    # The batch configs' layout (32- and 256-row tiles of x, the weight the register operand, K split).
    "batch-splitk": tiled_config(32, 32, 128, 2, True, True, True, 4, 1),
    "batch-256rows-splitk": tiled_config(256, 16, 128, 3, True, True, True, 4, 1),
    # The dequantize + cuBLAS candidate (Triton dequantize kernel, then torch.mm/addmm).
    "dequantize": dispatch.DEQUANTIZE_CONFIG,
}
# (M, N, K, dtype, bias, block_size): K not a multiple of any BLOCK_K, N odd, M = 1,
# M not a power of two, fp16, block size 16.
CASES = [
    (1, 33, 416, torch.bfloat16, True, 32),
    (5, 17, 160, torch.float16, False, 32),
    (37, 40, 192, torch.bfloat16, True, 16),
    (3, 65, 96, torch.bfloat16, False, 32),
]


def make_inputs(m, n, k, dtype, with_bias, block_size, seed, device):
    gen = torch.Generator().manual_seed(seed)
    # Rows of different magnitudes, so blocks get many different scale bytes.
    w = torch.randn(n, k, generator=gen) * 2.0 ** torch.randint(-12, 4, (n, 1), generator=gen).float()
    packed, scales = quantize_mxfp4(w, block_size=block_size, backend="torch")
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    to = {"device": device}
    return x.to(**to), packed.to(**to), scales.to(**to), None if bias is None else bias.to(**to)


def reference(x, packed, scales, bias, block_size):
    """float32 matmul of the (exact) dequantized weight, on the CPU."""
    w = dequantize_mxfp4(packed.cpu(), scales.cpu(), block_size=block_size, dtype=torch.float32)
    out = x.cpu().float() @ w.T
    return out if bias is None else out + bias.cpu().float()


def rel_err(out, ref):
    """Worst relative Frobenius error over output features: the weight rows differ in scale by
    2**15, so one norm over the whole output would hide a wrong small-scale column."""
    return float(((out.cpu().float() - ref).norm(dim=0) / ref.norm(dim=0)).max())


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}-N{c[1]}-K{c[2]}-{str(c[3])[6:]}-bs{c[5]}")
@pytest.mark.parametrize("name", list(CPU_CONFIGS))
def test_kernel_config_matches_reference(name, case):
    m, n, k, dtype, with_bias, block_size = case
    seed = 100 * list(CPU_CONFIGS).index(name) + CASES.index(case)
    x, packed, scales, bias = make_inputs(m, n, k, dtype, with_bias, block_size, seed, KERNEL_DEVICE)
    if dispatch.kernel_family(CPU_CONFIGS[name]) == "mma" and dtype != torch.bfloat16:
        with pytest.raises(ValueError, match="need bf16 x"):
            mxfp4_matmul_triton(x, packed, scales, bias, block_size, config=CPU_CONFIGS[name])
        return
    out = mxfp4_matmul_triton(x, packed, scales, bias, block_size, config=CPU_CONFIGS[name])
    assert out.dtype == dtype and out.shape == (m, n)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference(x, packed, scales, bias, block_size)) < MAX_REL_ERR


def test_repeated_split_k_calls():
    """Each split-K call sums its own partials: nothing left by one call leaks into the next."""
    for cfg in (CPU_CONFIGS["decode-permuted-splitk"], CPU_CONFIGS["gemv-splitk"], CPU_CONFIGS["mma-splitk"]):
        for seed in range(3):
            x, packed, scales, bias = make_inputs(2, 33, 416, torch.bfloat16, True, 32, seed, KERNEL_DEVICE)
            out = mxfp4_matmul_triton(x, packed, scales, bias, 32, config=cfg)
            assert rel_err(out, reference(x, packed, scales, bias, 32)) < MAX_REL_ERR


@pytest.mark.parametrize("name", ["decode-permuted", "prefill-words", "bytes-splitk", "gemv", "mma"])
def test_nan_scale_gives_nan_rows(name):
    x, packed, scales, _ = make_inputs(4, 17, 128, torch.bfloat16, False, 32, seed=7, device=KERNEL_DEVICE)
    scales[5, 2] = E8M0_NAN
    out = mxfp4_matmul_triton(x, packed, scales, None, 32, config=CPU_CONFIGS[name]).cpu()
    assert torch.isnan(out[:, 5]).all()
    assert torch.isfinite(out[:, torch.arange(17) != 5]).all()


@pytest.mark.parametrize("name", list(CPU_CONFIGS))
def test_subnormal_codes_survive(name):
    """Codes 0 and +-0.5 alone: +-0.5 is the code the kernels build as a subnormal float
    (exponent field 0); a path that flushed subnormals would return zeros here."""
    gen = torch.Generator().manual_seed(5)
    nibbles = torch.tensor([0x0, 0x1, 0x9])[torch.randint(0, 3, (24, 64, 2), generator=gen)]
    packed = (nibbles[..., 0] | (nibbles[..., 1] << 4)).to(torch.uint8)
    scales = torch.randint(120, 135, (24, 4), generator=gen).to(torch.uint8)
    x = torch.randn(3, 128, generator=gen).to(torch.bfloat16)
    x, packed, scales = (t.to(KERNEL_DEVICE) for t in (x, packed, scales))
    out = mxfp4_matmul_triton(x, packed, scales, None, 32, config=CPU_CONFIGS[name])
    assert rel_err(out, reference(x, packed, scales, None, 32)) < MAX_REL_ERR


@pytest.mark.parametrize("name", ["gemv", "gemv-4rows", "mma"])
def test_gemv_rows_of_x_not_16_byte_aligned(name):
    """x rows at an odd element offset: the CUDA-core kernel reads x as aligned int32 pairs
    (16-byte vectors on the GPU), so the launcher copies such an x first; same result."""
    x, packed, scales, bias = make_inputs(3, 40, 224, torch.bfloat16, True, 32, seed=21, device=KERNEL_DEVICE)
    wide = torch.zeros(3, 225, dtype=x.dtype, device=x.device)
    wide[:, 1:] = x
    shifted = wide[:, 1:]  # row stride 225 elements, first element 2 bytes past an aligned start
    out = mxfp4_matmul_triton(shifted, packed, scales, bias, 32, config=CPU_CONFIGS[name])
    assert rel_err(out, reference(x, packed, scales, bias, 32)) < MAX_REL_ERR
    # The interpreter reads misaligned int32 without complaint, so check the copy itself.
    for view in (shifted, shifted[:1]):
        given = dispatch.x_with_aligned_rows(view)
        assert given.data_ptr() % 16 == 0 and given.stride(0) * given.element_size() % 16 == 0
        assert torch.equal(given, view)
    aligned = torch.zeros(2, 224, dtype=torch.bfloat16)
    assert dispatch.x_with_aligned_rows(aligned) is aligned  # no copy when it is not needed


def test_gemv_needs_k_a_multiple_of_32():
    """The CUDA-core kernel takes K in groups of 32 codes: block size 16 with K = 16 mod 32
    goes to the decode configs, and forcing a GEMV config there is an error naming K."""
    assert dispatch.gemv_fits(1, 224) and not dispatch.gemv_fits(1, 208) and not dispatch.gemv_fits(2, 224)
    x, packed, scales, _ = make_inputs(1, 8, 208, torch.bfloat16, False, 16, seed=22, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="K a multiple of 32, got K = 208"):
        mxfp4_matmul_triton(x, packed, scales, None, 16, config=CPU_CONFIGS["gemv"])


@pytest.mark.parametrize("name", ["mma-splitk", "mma-x-late"])
def test_mma_two_token_groups(name):
    """M = 9..16 takes the second group of 8 tokens (a second mma per k-step): with split-K, bias,
    block size 16, a NaN scale in the partial last step and an aligned x whose rows are longer than K."""
    x, packed, scales, bias = make_inputs(12, 19, 416, torch.bfloat16, True, 16, seed=31, device=KERNEL_DEVICE)
    scales[7, -1] = E8M0_NAN  # the last block: read in the partial step
    wide = torch.zeros(12, 448, dtype=x.dtype, device=x.device)
    wide[:, :416] = x
    out = mxfp4_matmul_triton(wide[:, :416], packed, scales, bias, 16, config=CPU_CONFIGS[name]).cpu()
    assert torch.isnan(out[:, 7]).all()
    keep = torch.arange(19) != 7
    assert rel_err(out[:, keep], reference(x, packed, scales, bias, 16)[:, keep]) < MAX_REL_ERR


def test_dispatch_candidates(monkeypatch):
    """Which kernels compete for a shape: the CUDA-core kernel at M = 1, the warp-MMA kernel up to
    M = 16 for bf16 x on GPUs with mma.sync, the tensor-core decode configs up to M = 16 where
    the CUDA-core kernel cannot go; above, the batch configs whose row tile suits M (up to
    BATCH_MAX_M), the prefill configs and dequantize + cuBLAS, in that order; K % 32 != 0 rules
    out both register kernels."""
    monkeypatch.setattr(dispatch, "inline_ptx_allowed", lambda device, capability: True)
    bf16, fp16 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.float16)
    candidates = dispatch.candidate_configs
    assert candidates(1, 64, bf16) == dispatch.GEMV_CONFIGS + dispatch.MMA_CONFIGS
    assert candidates(1, 64, fp16) == dispatch.GEMV_CONFIGS
    assert candidates(1, 48, bf16) == dispatch.DECODE_CONFIGS
    assert candidates(16, 64, bf16) == dispatch.MMA_CONFIGS + dispatch.DECODE_CONFIGS
    assert candidates(16, 64, fp16) == dispatch.DECODE_CONFIGS
    tail = dispatch.PREFILL_CONFIGS + (dispatch.DEQUANTIZE_CONFIG,)
    for m, rows in ((17, {32}), (32, {32}), (33, {32, 64}), (100, {64, 128}), (512, {64, 128}), (513, set())):
        batch = tuple(c for c in dispatch.BATCH_CONFIGS if c.kwargs["BLOCK_M"] in rows)
        assert candidates(m, 64, bf16) == batch + tail, m
        assert candidates(m, 48, fp16) == batch + tail, m
    assert all(any(dispatch.batch_fits(c, m) for m in range(17, 513)) for c in dispatch.BATCH_CONFIGS)
    monkeypatch.setattr(dispatch, "inline_ptx_allowed", lambda device, capability: False)  # no PTX: no mma.sync
    assert candidates(4, 64, bf16) == dispatch.DECODE_CONFIGS
    monkeypatch.setenv("QWANTIZE_HF_DEQUANTIZE_BATCHES", "1")  # above 16 rows: dequantize + cuBLAS only
    assert candidates(100, 64, bf16) == (dispatch.DEQUANTIZE_CONFIG,)
    assert candidates(16, 64, bf16) == dispatch.DECODE_CONFIGS


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's untimed choice")
def test_dispatch_without_a_config_under_the_interpreter():
    """No GPU to time candidates on: the dispatch takes the first one (here the CUDA-core kernel
    at M = 1, the tensor-core decode configs for K = 48) and remembers it, for every M of its
    power-of-two bucket."""
    for m, k, block_size in ((1, 64, 32), (3, 48, 16)):
        x, packed, scales, bias = make_inputs(m, 24, k, torch.bfloat16, True, block_size, seed=9, device="cpu")
        out = mxfp4_matmul_triton(x, packed, scales, bias, block_size)
        assert rel_err(out, reference(x, packed, scales, bias, block_size)) < MAX_REL_ERR
        chosen = dispatch.chosen_config(x, packed, scales, bias, block_size)
        assert chosen == (dispatch.GEMV_CONFIGS if m == 1 else dispatch.DECODE_CONFIGS)[0]
        bucket_top = torch.zeros(1 << max(m - 1, 0).bit_length(), k, dtype=x.dtype)  # M rounded up to a power of 2
        assert dispatch.chosen_config(bucket_top, packed, scales, bias, block_size) is chosen


def test_op_matches_dequantize_then_linear_with_leading_dims():
    x, packed, scales, bias = make_inputs(6, 24, 96, torch.bfloat16, True, 32, seed=3, device="cpu")
    x = x.reshape(2, 3, 96)
    out = mxfp4_linear(x, packed, scales, bias)
    expected = F.linear(x, dequantize_mxfp4(packed, scales, dtype=torch.bfloat16), bias)
    assert out.shape == (2, 3, 24) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)


def _stacked_inputs(experts, m, n, k, dtype, device, seed):
    """A stack of ``experts`` weights (packed/scales/bias) and x [experts, m, k]."""
    parts = [make_inputs(m, n, k, dtype, True, 32, seed=seed + e, device=device) for e in range(experts)]
    return tuple(torch.stack([p[i] for p in parts]) for i in range(4))


@pytest.mark.parametrize("with_bias", [True, False])
def test_op_on_a_stack_of_weights_is_each_weight_on_its_own_rows(with_bias):
    x, packed, scales, bias = _stacked_inputs(3, 5, 24, 96, torch.bfloat16, "cpu", seed=30)
    bias = bias if with_bias else None
    out = mxfp4_linear(x, packed, scales, bias)
    assert out.shape == (3, 5, 24) and out.dtype == torch.bfloat16
    for e in range(3):
        torch.testing.assert_close(out[e], mxfp4_linear(x[e], packed[e], scales[e], None if bias is None else bias[e]))
    torch.library.opcheck(torch.ops.qwantize_hf.mxfp4_linear.default, (x, packed, scales, bias, 32))


def test_op_on_a_stack_rejects_rows_that_do_not_match_the_stack():
    x, packed, scales, bias = _stacked_inputs(2, 4, 16, 64, torch.bfloat16, "cpu", seed=40)
    with pytest.raises(ValueError, match=r"x must have shape \[2, rows, 64\]"):
        mxfp4_linear(x[0], packed, scales)
    with pytest.raises(ValueError, match=r"x must have shape \[2, rows, 64\]"):
        mxfp4_linear(x[:1], packed, scales)
    with pytest.raises(ValueError, match=r"bias must have shape \(2, 16\)"):
        mxfp4_linear(x, packed, scales, bias[0])
    with pytest.raises(ValueError, match="scales must have shape"):
        mxfp4_linear(x, packed, scales[:1])


def test_op_rejects_bad_shapes_with_a_fix():
    x, packed, scales, bias = make_inputs(2, 8, 64, torch.bfloat16, True, 32, seed=4, device="cpu")
    with pytest.raises(ValueError, match="input features"):
        mxfp4_linear(x[:, :32], packed, scales)
    with pytest.raises(ValueError, match="another block_size"):
        mxfp4_linear(x, packed, scales, block_size=16)
    with pytest.raises(ValueError, match="bias must have shape"):
        mxfp4_linear(x, packed, scales, bias[:4])
    with pytest.raises(TypeError, match="uint8"):
        mxfp4_linear(x, packed.to(torch.int16), scales)


def test_opcheck_fake_and_schema():
    x, packed, scales, bias = make_inputs(3, 8, 64, torch.bfloat16, True, 32, seed=5, device="cpu")
    torch.library.opcheck(torch.ops.qwantize_hf.mxfp4_linear.default, (x, packed, scales, bias, 32))
    torch.library.opcheck(torch.ops.qwantize_hf.mxfp4_linear.default, (x, packed, scales, None, 32))


def test_eager_call_bypasses_the_dispatcher_with_the_same_result():
    x, packed, scales, bias = make_inputs(3, 8, 64, torch.bfloat16, True, 32, seed=7, device="cpu")
    assert plain_eager_call(x, packed, scales, bias)
    assert torch.equal(
        mxfp4_linear(x, packed, scales, bias), torch.ops.qwantize_hf.mxfp4_linear(x, packed, scales, bias, 32)
    )


def test_calls_that_need_the_registered_op_still_get_it():
    x, packed, scales, bias = make_inputs(3, 8, 64, torch.bfloat16, True, 32, seed=8, device="cpu")
    x.requires_grad_(True)
    assert not plain_eager_call(x, packed, scales, bias)  # autograd sees the op and its formula
    out = mxfp4_linear(x, packed, scales, bias)
    assert "mxfp4_linear" in type(out.grad_fn).__name__
    out.sum().backward()  # tests/test_linear_grad.py checks the values
    assert x.grad is not None
    with torch.no_grad():
        assert plain_eager_call(x, packed, scales, bias)
    plain_x = x.detach()
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(plain_x)
        assert not plain_eager_call(fake, mode.from_tensor(packed), mode.from_tensor(scales), None)
        assert mxfp4_linear(fake, mode.from_tensor(packed), mode.from_tensor(scales)).shape == (3, 8)
    meta = x.detach().to("meta")
    assert not plain_eager_call(meta, packed.to("meta"), scales.to("meta"), None)


class _TinyMXFP4(torch.nn.Module):
    def __init__(self, packed, scales, bias):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    def forward(self, x):
        return torch.relu(mxfp4_linear(x, self.packed, self.scales, self.bias)) * 2


def test_torch_compile_fullgraph_cpu():
    x, packed, scales, bias = make_inputs(4, 16, 64, torch.bfloat16, True, 32, seed=6, device="cpu")
    module = _TinyMXFP4(packed, scales, bias)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), module(x))


# --------------------------------------------------------------------------- GPU only

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("m", [1, 3, 16, 17, 100, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_autotuned_dispatch_matches_reference(m, dtype):
    x, packed, scales, bias = make_inputs(m, 1031, 1184, dtype, True, 32, seed=m, device="cuda")
    out = mxfp4_linear(x, packed, scales, bias)
    assert rel_err(out, reference(x, packed, scales, bias, 32)) < MAX_REL_ERR


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 5, 40])
def test_gpu_op_on_a_stack_of_weights_matches_the_reference(m):
    x, packed, scales, bias = _stacked_inputs(3, m, 520, 256, torch.bfloat16, "cuda", seed=50 + m)
    out = mxfp4_linear(x, packed, scales, bias)
    expected = torch.stack([reference(x[e], packed[e], scales[e], bias[e], 32) for e in range(3)])
    assert out.shape == (3, m, 520)
    assert rel_err(out, expected) < MAX_REL_ERR


@gpu
@pytest.mark.parametrize(("m", "dtype"), [(1, torch.bfloat16), (4, torch.bfloat16), (4, torch.float16)])
def test_gpu_autotuned_choice_is_remembered_and_reused(m, dtype):
    """M = 1 chooses between the CUDA-core and the warp-MMA kernels, M = 2..16 between the
    warp-MMA kernel and the tensor-core decode configs; fp16 x never gets the warp-MMA kernel."""
    x, packed, scales, bias = make_inputs(m, 2048, 512, dtype, True, 32, seed=13 + m, device="cuda")
    dispatch.set_chosen_config(x, packed, scales, bias, 32, None)
    first = mxfp4_matmul_triton(x, packed, scales, bias, 32)  # tunes, launches the best, remembers it
    families = {1: dispatch.GEMV_CONFIGS + dispatch.MMA_CONFIGS, 4: dispatch.MMA_CONFIGS + dispatch.DECODE_CONFIGS}[m]
    if dtype == torch.float16:
        families = dispatch.GEMV_CONFIGS if m == 1 else dispatch.DECODE_CONFIGS
    assert dispatch.chosen_config(x, packed, scales, bias, 32) in families
    again = mxfp4_matmul_triton(x, packed, scales, bias, 32)  # launches the remembered config directly
    assert torch.equal(first, again)
    assert rel_err(again, reference(x, packed, scales, bias, 32)) < MAX_REL_ERR


def test_launch_key_is_at_least_as_fine_as_tritons_specialization():
    """A remembered launch (``RememberedLaunch``, GPU only) is reused for every call with its launch
    key, so calls with equal keys must get the same compiled kernel and grid from Triton: for
    random sizes, offsets, row strides, bias dtypes and every shipped config, equal keys give
    equal specializations by Triton's own specialization function."""
    specialize = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    def view(numel, dtype, offset, shape):
        return torch.zeros(numel + 16, dtype=dtype)[offset : offset + numel].view(shape)

    def specialization(kernel, args, kwargs):
        params = inspect.signature(kernel.fn).parameters.values()  # kernel: a JIT or interpreted function
        values = dict(zip((p.name for p in params), args))
        values.update(kwargs)
        return tuple(
            ("constexpr", values[p.name])
            if "constexpr" in str(p.annotation)
            else specialize(BaseBackend, values[p.name], False, True, True)
            for p in params
        )

    rng = random.Random(0)
    configs = (
        dispatch.GEMV_CONFIGS
        + dispatch.MMA_CONFIGS
        + dispatch.DECODE_CONFIGS
        + dispatch.BATCH_CONFIGS
        + dispatch.PREFILL_CONFIGS
    )
    seen, keys = {}, set()
    for _ in range(150):
        m, n, k = rng.choice([1, 2, 3, 16]), rng.choice([16, 17, 32]), rng.choice([64, 96])
        dtype = rng.choice([torch.bfloat16, torch.float16])
        pad, start = rng.choice([0, 2, 4, 8, 16]), rng.choice([0, 1, 2, 4, 8])
        x = view(m * (k + pad), dtype, start, (m, k + pad))[:, :k]
        packed = torch.zeros(n, k // 2, dtype=torch.uint8)
        scales = view(n * (k // 32), torch.uint8, rng.choice([0, 1, 16]), (n, k // 32))
        bias = rng.choice(
            [None, view(n, dtype, rng.choice([0, 1, 8]), (n,)), view(n, torch.float32, rng.choice([0, 1, 4]), (n,))]
        )
        operands = (x, packed, scales, bias, torch.empty(m, n, dtype=dtype), 32, None)
        key = dispatch.launch_key(x, packed, scales, bias, 32)
        keys.add(key)
        for config in configs:
            try:
                kernel, grid, args, kwargs = dispatch.launch_args(config, *operands)
            except ValueError:  # a register kernel and fp16 x
                continue
            launch = (specialization(kernel, args, kwargs), grid, kernel.fn.__name__)
            assert seen.setdefault((key, str(config)), launch) == launch, (key, config)
    assert len(keys) > 50  # the draws do reach many keys


# (M, x dtype, config): one of each kernel family, split-K ones among them, and the
# tensor-core kernel's two-axis grid.
LAUNCHER_CASES = [
    (1, torch.bfloat16, dispatch.GEMV_CONFIGS[0]),
    (4, torch.bfloat16, mma_config(2, 4, 2)),
    (16, torch.bfloat16, mma_config(1, 4, 1, x_ahead=False)),
    (3, torch.float16, dispatch.DECODE_CONFIGS[0]),
    (16, torch.float16, dispatch.DECODE_CONFIGS[3]),
]


@gpu
@pytest.mark.parametrize(("m", "dtype", "config"), LAUNCHER_CASES, ids=str)
def test_gpu_remembered_launch_matches_a_triton_launch(m, dtype, config, monkeypatch, request):
    """A dispatched call with the launch key of an earlier one starts that call's compiled
    kernel directly (``RememberedLaunch``): the same bytes as Triton's launch of the chosen config,
    on new values too, on a side stream and on the capturing stream of a CUDA graph; other
    launch keys get launchers of their own; none is used once its choice is dropped."""
    x, packed, scales, bias = make_inputs(m, 1040, 1536, dtype, True, 32, seed=m, device="cuda")
    dispatch.set_chosen_config(x, packed, scales, bias, 32, config)  # the dispatch's choice, forced
    request.addfinalizer(lambda: dispatch.set_chosen_config(x, packed, scales, bias, 32, None))
    first = mxfp4_matmul_triton(x, packed, scales, bias, 32)  # through Triton, remembered
    launcher = dispatch.remembered_launch(x, packed, scales, bias, 32)
    assert isinstance(launcher, dispatch.RememberedLaunch) and launcher.config is config
    assert torch.equal(first, mxfp4_matmul_triton(x, packed, scales, bias, 32, config=config))
    triton_launch = dispatch.launch
    launched = []

    def recorded_launch(config, *operands):
        launched.append(config)
        return triton_launch(config, *operands)

    def no_triton_launch(*args):
        raise AssertionError("a remembered launch went through Triton's launch")

    monkeypatch.setattr(dispatch, "launch", no_triton_launch)
    assert torch.equal(mxfp4_matmul_triton(x, packed, scales, bias, 32), first)
    x_new = torch.randn_like(x)
    again = mxfp4_matmul_triton(x_new, packed, scales, bias, 32)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = mxfp4_matmul_triton(x, packed, scales, bias, 32)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mxfp4_matmul_triton(x, packed, scales, bias, 32)
    graph.replay()
    monkeypatch.setattr(dispatch, "launch", recorded_launch)
    assert torch.equal(again, mxfp4_matmul_triton(x_new, packed, scales, bias, 32, config=config))
    assert torch.equal(on_side, first) and torch.equal(captured, first)

    # Other launch keys (same choice): each first call goes through Triton and leaves a launcher of its own.
    unaligned_scales = torch.empty(scales.numel() + 1, dtype=torch.uint8, device="cuda")[1:]
    unaligned_scales = unaligned_scales.view(scales.shape).copy_(scales)
    wide_x = torch.zeros(m, 1536 + 4, dtype=dtype, device="cuda")[:, :1536].copy_(x)  # rows 8 bytes off 16
    for args in ((x, packed, unaligned_scales, bias), (wide_x, packed, scales, bias)):
        launched.clear()
        one = mxfp4_matmul_triton(*args, 32)
        assert launched == [config]
        other = dispatch.remembered_launch(*args, 32)
        assert isinstance(other, dispatch.RememberedLaunch) and other is not launcher
        monkeypatch.setattr(dispatch, "launch", no_triton_launch)
        assert torch.equal(mxfp4_matmul_triton(*args, 32), one)
        monkeypatch.setattr(dispatch, "launch", recorded_launch)
        assert rel_err(one, reference(*args, 32)) < MAX_REL_ERR

    # A dropped choice is made again, through Triton's launches, and a new launcher replaces the old one.
    assert dispatch.chosen_config(x, packed, scales, bias, 32) is config
    dispatch.set_chosen_config(x, packed, scales, bias, 32, None)
    launched.clear()
    out = mxfp4_matmul_triton(x, packed, scales, bias, 32)
    assert launched and dispatch.chosen_config(x, packed, scales, bias, 32) is not None
    assert dispatch.remembered_launch(x, packed, scales, bias, 32) is not launcher
    assert rel_err(out, reference(x, packed, scales, bias, 32)) < MAX_REL_ERR


@gpu
@pytest.mark.parametrize("config", dispatch.MMA_CONFIGS, ids=str)
def test_gpu_every_shipped_mma_config(config):
    """Every shipped warp-MMA config, compiled: one and two groups of 8 tokens, block size 16,
    scale byte 0 (2**-127: the scaled codes are bf16 subnormals) and a NaN scale."""
    for m, block_size in ((1, 32), (8, 16), (9, 32), (16, 16)):
        x, packed, scales, bias = make_inputs(m, 1040, 1536, torch.bfloat16, True, block_size, seed=m, device="cuda")
        scales[3] = 0
        scales[5, 4] = E8M0_NAN
        x[:, :] = x * 2.0**100  # keeps row 3's products out of the float32 subnormals
        out = mxfp4_matmul_triton(x, packed, scales, bias, block_size, config=config).cpu()
        assert torch.isnan(out[:, 5]).all()
        keep = torch.arange(1040) != 5
        ref = reference(x, packed, scales, bias, block_size)[:, keep].double()  # norms of ~1e33 outputs: float64
        err = ((out[:, keep].double() - ref).norm(dim=0) / ref.norm(dim=0)).max()
        assert err < MAX_REL_ERR, (m, block_size, float(err))


@gpu
@pytest.mark.parametrize("config", dispatch.BATCH_CONFIGS + dispatch.PREFILL_CONFIGS + (dispatch.DEQUANTIZE_CONFIG,))
def test_gpu_every_shipped_config_above_16_rows(config):
    """Every shipped config for M > 16, compiled: M not a multiple of its row tile, odd N, K not
    a multiple of its BLOCK_K, bf16 and fp16, block size 16, scale byte 0 and a NaN scale."""
    for m, dtype, block_size in ((17, torch.bfloat16, 32), (45, torch.float16, 32), (130, torch.bfloat16, 16)):
        x, packed, scales, bias = make_inputs(m, 1031, 1184, dtype, True, block_size, seed=m, device="cuda")
        scales[3] = 0
        scales[5, 4] = E8M0_NAN
        out = mxfp4_matmul_triton(x, packed, scales, bias, block_size, config=config).cpu()
        assert torch.isnan(out[:, 5]).all()
        keep = torch.arange(1031) != 5
        assert rel_err(out[:, keep], reference(x, packed, scales, bias, block_size)[:, keep]) < MAX_REL_ERR


@gpu
def test_gpu_dequantize_forced_at_decode_size_runs_and_is_not_remembered():
    """``DEQUANTIZE_CONFIG`` is no Triton launch: forced for a decode-size call it runs, and no
    remembered launch is made of it."""
    x, packed, scales, bias = make_inputs(4, 1040, 512, torch.bfloat16, True, 32, seed=13, device="cuda")
    dispatch.clear_dispatch_cache()
    dispatch.set_chosen_config(x, packed, scales, bias, 32, dispatch.DEQUANTIZE_CONFIG)
    for _ in range(2):
        out = mxfp4_matmul_triton(x, packed, scales, bias, 32)
        assert rel_err(out, reference(x, packed, scales, bias, 32)) < MAX_REL_ERR
    assert dispatch.remembered_launch(x, packed, scales, bias, 32) is None
    dispatch.clear_dispatch_cache()


@gpu
def test_gpu_capture_of_an_unchosen_batch_shape_runs_dequantize():
    """A first call above 16 rows inside CUDA-graph capture cannot time candidates: it runs
    dequantize + cuBLAS, chooses nothing, and the next call outside capture chooses."""
    x, packed, scales, bias = make_inputs(48, 1040, 512, torch.bfloat16, True, 32, seed=12, device="cuda")
    dispatch.set_chosen_config(x, packed, scales, bias, 32, None)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = mxfp4_linear(x, packed, scales, bias)
    graph.replay()
    assert rel_err(static_out, reference(x, packed, scales, bias, 32)) < MAX_REL_ERR
    assert dispatch.chosen_config(x, packed, scales, bias, 32) is None
    mxfp4_linear(x, packed, scales, bias)
    assert dispatch.chosen_config(x, packed, scales, bias, 32) is not None


@gpu
def test_gpu_cuda_graph_replay_matches_eager():
    x, packed, scales, bias = make_inputs(2, 4096, 1024, torch.bfloat16, True, 32, seed=11, device="cuda")
    expected = mxfp4_linear(x, packed, scales, bias)  # also chooses the config, outside the capture
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = mxfp4_linear(static_x, packed, scales, bias)
    for seed in range(3):
        static_x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
        graph.replay()
        assert rel_err(static_out, reference(static_x, packed, scales, bias, 32)) < MAX_REL_ERR
    static_x.copy_(x)
    graph.replay()
    torch.testing.assert_close(static_out, expected)


@gpu
def test_gpu_torch_compile_matches_eager():
    x, packed, scales, bias = make_inputs(8, 512, 256, torch.bfloat16, True, 32, seed=12, device="cuda")
    module = _TinyMXFP4(packed, scales, bias)
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(x), module(x))


# Run in a fresh process: the first launch of each kernel (and the choice of its config) must
# happen inside torch.compile's CUDA-graph warm-up, where every tensor allocated comes from the
# graph pool. A tensor kept alive past the call (a cached buffer, say) then fails the pool check.
# The candidates are cut to split-K ones at M = 4, so that a split-K workspace is allocated there.
_REDUCE_OVERHEAD_SCRIPT = """
import torch
from qwantize_hf import quantize_mxfp4
from qwantize_hf.kernels import matmul_dispatch as dispatch
from qwantize_hf.linear_op import mxfp4_linear
from tests.test_matmul import reference, rel_err, MAX_REL_ERR

dispatch.MMA_CONFIGS = (dispatch.mma_config(2, 4, 2),)
dispatch.DECODE_CONFIGS = tuple(c for c in dispatch.DECODE_CONFIGS if c.kwargs["SPLIT_K"] > 1)

w = torch.randn(3072, 1536, device="cuda") * 0.02
packed, scales = quantize_mxfp4(w)
bias = torch.randn(3072, device="cuda", dtype=torch.bfloat16)
step = torch.compile(lambda x: mxfp4_linear(x, packed, scales, bias), mode="reduce-overhead", fullgraph=True)
for m in (1, 4):  # the CUDA-core or warp-MMA kernel; split-K warp-MMA or tensor-core configs
    for seed in range(4):  # warm-up, capture, replays
        x = torch.randn(m, 1536, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)).bfloat16()
        out = step(x).clone()
        assert rel_err(out, reference(x, packed, scales, bias, 32)) < MAX_REL_ERR, (m, seed)
print("ok")
"""


@gpu
def test_gpu_reduce_overhead_compile_in_fresh_process():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-c", _REDUCE_OVERHEAD_SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


_COMPILE_BATCH_CONFIGS_FOR_HOPPER = """
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qwantize_hf.kernels.matmul_tiled import BATCH_CONFIGS, _mxfp4_matmul_kernel

results = []
for config in BATCH_CONFIGS:
    constants = {**config.kwargs, "HAS_BIAS": True, "BLOCK_SIZE": 32, "INTERPRET": False}
    signature = {"x_ptr": "*bf16", "packed_ptr": "*u8", "scales_ptr": "*u8", "bias_ptr": "*bf16", "out_ptr": "*bf16",
                 "partial_ptr": "*fp32", "counter_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "half_k": "i32",
                 "words_k": "i32", "blocks_k": "i32", "stride_xm": "i32", "stride_om": "i32",
                 **dict.fromkeys(constants, "constexpr")}
    source = ASTSource(fn=_mxfp4_matmul_kernel, signature=signature, constexprs=constants)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    results.append({"shared": compiled.metadata.shared, "wgmma": compiled.asm["ptx"].count("wgmma.mma_async")})
print(json.dumps(results))
"""


def test_the_batch_configs_compile_for_hopper():
    """What the interpreter cannot check: every shipped batch config compiles to a Hopper (sm_90) binary
    whose products are wgmma instructions, within the H100's 227 KiB of shared memory a block."""
    results = compiled_for_hopper(_COMPILE_BATCH_CONFIGS_FOR_HOPPER)
    assert len(results) == len(dispatch.BATCH_CONFIGS)
    assert all(r["wgmma"] > 0 and r["shared"] <= 227 * 1024 for r in results), results
