"""The routed MXFP4 matmul for mixture-of-experts decode (``kernels.matmul_routed`` and the op
``qwantize_hf::mxfp4_linear_routed``) against each pair's expert dequantized and a float32 product.

Without a GPU the kernel runs under TRITON_INTERPRET=1 on small shapes with small configs; with one,
the shipped configs compile, and CUDA graphs and torch.compile take the op.
"""

from __future__ import annotations

import pytest
import torch

from qwantize_hf import dequantize_mxfp4, quantize_mxfp4
from qwantize_hf.constants import E8M0_NAN
from qwantize_hf.kernels.matmul_gemv import gemv_config
from qwantize_hf.kernels.matmul_routed import routed_config, routed_gemv
from qwantize_hf.routed_op import mxfp4_linear_routed, routed_reference
from tests.conftest import KERNEL_DEVICE, compiled_for_hopper

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
MAX_REL_ERR = 1e-2
# 8 and 16 words a step (K = 160: a partial last step; K = 96: only a partial one), 4 and 16 rows
CPU_CONFIGS = {"w8": gemv_config(16, 8, 1, 4, 1), "w16-4rows": gemv_config(4, 16, 1, 4, 1)}
# (experts, pairs, N, K, dtype, bias, block_size): N odd, pairs not a power of two, experts repeated
CASES = [
    (5, 7, 33, 160, torch.bfloat16, True, 32),
    (3, 1, 40, 96, torch.float16, False, 32),
    (4, 6, 17, 128, torch.bfloat16, True, 16),
]


def make_inputs(experts, pairs, n, k, dtype, with_bias, block_size, seed, device):
    gen = torch.Generator().manual_seed(seed)
    # each expert's rows of different magnitudes, so blocks get many scale bytes
    w = torch.randn(experts, n, k, generator=gen) * 2.0 ** torch.randint(-12, 4, (experts, n, 1), generator=gen)
    packed, scales = quantize_mxfp4(w, block_size=block_size, backend="torch")
    x = (torch.randn(pairs, k, generator=gen) * 3).to(dtype)
    ids = torch.randint(0, experts, (pairs,), generator=gen)
    bias = torch.randn(experts, n, generator=gen).to(dtype) if with_bias else None
    return tuple(None if t is None else t.to(device) for t in (x, ids, packed, scales, bias))


def reference(x, ids, packed, scales, bias, block_size):
    """float32: each pair's exact dequantized expert, on the CPU."""
    w = dequantize_mxfp4(packed.cpu(), scales.cpu(), block_size=block_size, dtype=torch.float32)[ids.cpu()]
    out = torch.bmm(x.cpu().float()[:, None, :], w.transpose(1, 2))[:, 0]
    return out if bias is None else out + bias.cpu().float()[ids.cpu()]


def rel_err(out, ref):
    """Worst relative error over the pairs' output rows (each pair's expert has its own magnitudes)."""
    return float(((out.cpu().double() - ref.double()).norm(dim=1) / ref.double().norm(dim=1)).max())


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"E{c[0]}-P{c[1]}-N{c[2]}-K{c[3]}-{str(c[4])[6:]}-bs{c[6]}")
@pytest.mark.parametrize("name", list(CPU_CONFIGS))
def test_routed_kernel_matches_each_pairs_expert(name, case):
    experts, pairs, n, k, dtype, with_bias, block_size = case
    x, ids, packed, scales, bias = make_inputs(*case, seed=CASES.index(case), device=KERNEL_DEVICE)
    out = routed_gemv(x, ids, packed, scales, bias, block_size, config=CPU_CONFIGS[name])
    assert out.dtype == dtype and out.shape == (pairs, n) and torch.isfinite(out).all()
    assert rel_err(out, reference(x, ids, packed, scales, bias, block_size)) < MAX_REL_ERR


def test_routed_kernel_edge_values():
    """Zero codes, the +-0.5 codes built as subnormal floats, +-6 (the largest code), a NaN scale in one
    expert (only the pairs routed to it see NaN), scale byte 0 next to huge ones, x rows not 16-byte
    aligned, and int32 ids."""
    gen = torch.Generator().manual_seed(3)
    nibbles = torch.tensor([0x0, 0x1, 0x9, 0x7, 0xF])[torch.randint(0, 5, (4, 24, 64, 2), generator=gen)]
    packed = (nibbles[..., 0] | (nibbles[..., 1] << 4)).to(torch.uint8)
    scales = torch.randint(120, 135, (4, 24, 4), generator=gen).to(torch.uint8)
    scales[1, 3] = 0  # 2**-127
    scales[2, 5, 1] = E8M0_NAN
    x = torch.randn(6, 129, generator=gen).to(torch.bfloat16)[:, 1:]  # rows at an odd element offset
    ids = torch.tensor([0, 2, 1, 3, 0, 3], dtype=torch.int32)
    x, ids, packed, scales = (t.to(KERNEL_DEVICE) for t in (x, ids, packed, scales))
    out = routed_gemv(x, ids, packed, scales, None, 32, config=CPU_CONFIGS["w8"]).cpu()
    assert torch.isnan(out[1, 5]) and torch.isfinite(out[1, torch.arange(24) != 5]).all()
    keep = torch.tensor([0, 2, 3, 4, 5])
    assert torch.isfinite(out[keep]).all()
    assert rel_err(out[keep], reference(x, ids, packed, scales, None, 32)[keep]) < MAX_REL_ERR


def test_op_on_cpu_is_each_pairs_linear_and_checks_its_arguments():
    x, ids, packed, scales, bias = make_inputs(*CASES[0], seed=9, device="cpu")
    got = mxfp4_linear_routed(x, ids, packed, scales, bias, 32)
    assert torch.equal(got, routed_reference(x, ids, packed, scales, bias, 32))
    assert torch.equal(got, torch.ops.qwantize_hf.mxfp4_linear_routed(x, ids, packed, scales, bias, 32))
    torch.library.opcheck(torch.ops.qwantize_hf.mxfp4_linear_routed.default, (x, ids, packed, scales, bias, 32))
    with pytest.raises(ValueError, match=r"x must be \[pairs, K\] and experts \[pairs\]"):
        mxfp4_linear_routed(x, ids[:-1], packed, scales, bias, 32)
    with pytest.raises(TypeError, match="experts must be int32 or int64"):
        mxfp4_linear_routed(x, ids.float(), packed, scales, bias, 32)
    with pytest.raises(ValueError, match="must be a stack of expert weights"):
        mxfp4_linear_routed(x, ids, packed[0], scales[0], bias, 32)


def test_launches_split_the_pairs_over_grid_limits(monkeypatch):
    from qwantize_hf.kernels import matmul_routed

    monkeypatch.setattr(matmul_routed, "MAX_PAIRS_PER_LAUNCH", 3)
    x, ids, packed, scales, bias = make_inputs(*CASES[0], seed=6, device=KERNEL_DEVICE)
    out = routed_gemv(x, ids, packed, scales, bias, 32, config=CPU_CONFIGS["w8"])
    assert rel_err(out, reference(x, ids, packed, scales, bias, 32)) < MAX_REL_ERR  # 7 pairs: launches of 3, 3, 1


def test_op_compiles_forward_and_backward_as_one_graph():
    x, ids, packed, scales, bias = make_inputs(*CASES[0], seed=8, device="cpu")
    x = x.float().requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: mxfp4_linear_routed(*a, 32), fullgraph=True, backend="aot_eager")
    out = compiled(x, ids, packed, scales, bias)
    out.sum().backward()
    expected = torch.ops.qwantize_hf.mxfp4_linear_routed(x.detach(), ids, packed, scales, bias, 32)
    torch.testing.assert_close(out.detach(), expected)
    w = dequantize_mxfp4(packed, scales, dtype=torch.float32)[ids]
    torch.testing.assert_close(x.grad, w.sum(dim=1))  # d(sum of outputs)/dx = each pair's weight rows summed


def test_op_gradient_is_each_pairs_transposed_product():
    x, ids, packed, scales, bias = make_inputs(*CASES[0], seed=4, device="cpu")
    x = x.float().requires_grad_()
    bias = bias.float().requires_grad_()
    out = mxfp4_linear_routed(x, ids, packed, scales, bias, 32)
    grad = torch.randn_like(out)
    out.backward(grad)
    w = dequantize_mxfp4(packed, scales, dtype=torch.float32)[ids]
    torch.testing.assert_close(x.grad, torch.bmm(grad[:, None, :], w)[:, 0])
    torch.testing.assert_close(bias.grad, torch.zeros_like(bias).index_add_(0, ids, grad))


@gpu
@pytest.mark.parametrize("k", [768, 2048, 2880])
def test_gpu_shipped_configs_match_the_reference(k):
    """The MoE shapes the configs were picked for (Qwen3-30B-A3B's 768 and 2048, GPT-OSS's 2880)."""
    for pairs, block_size in ((1, 32), (8, 32), (16, 16)):
        x, ids, packed, scales, bias = make_inputs(16, pairs, 1040, k, torch.bfloat16, True, block_size, pairs, "cuda")
        out = mxfp4_linear_routed(x, ids, packed, scales, bias, block_size)
        assert rel_err(out, reference(x, ids, packed, scales, bias, block_size)) < MAX_REL_ERR
        assert routed_config(k).kwargs["SPLIT_K"] == 1


@gpu
def test_gpu_cuda_graph_and_compile_take_the_op():
    x, ids, packed, scales, bias = make_inputs(8, 8, 512, 1024, torch.bfloat16, True, 32, 1, "cuda")
    expected = mxfp4_linear_routed(x, ids, packed, scales, bias)
    compiled = torch.compile(lambda *a: mxfp4_linear_routed(*a), fullgraph=True)
    assert torch.equal(compiled(x, ids, packed, scales, bias), expected)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mxfp4_linear_routed(x, ids, packed, scales, bias)
    ids.copy_(torch.flip(ids, (0,)))  # new routing, same buffers
    graph.replay()
    assert torch.equal(captured, mxfp4_linear_routed(x, ids, packed, scales, bias))


_COMPILE_FOR_HOPPER = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qwantize_hf.kernels.matmul_routed import _mxfp4_routed_gemv_kernel, routed_config

k, dtype = int(sys.argv[1]), sys.argv[2]
constants = {"HAS_BIAS": True, "BLOCK_SIZE": 32, **routed_config(k).kwargs, "PTX_MUL": True, "PTX_LOAD": True,
             "INTERPRET": False}
signature = {"x_ptr": "*" + dtype, "experts_ptr": "*i64", "packed_ptr": "*u8", "scales_ptr": "*u8",
             "bias_ptr": "*" + dtype, "out_ptr": "*" + dtype, "N": "i32", "words_k": "i32", "blocks_k": "i32",
             "stride_xm": "i32", "stride_om": "i32", **dict.fromkeys(constants, "constexpr")}
source = ASTSource(fn=_mxfp4_routed_gemv_kernel, signature=signature, constexprs=constants)
config = routed_config(k)
options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
asm = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm
print(json.dumps({"cubin": len(asm["cubin"]), "vector_loads": asm["ptx"].count("ld.global.nc.v4")}))
"""


@pytest.mark.parametrize("k", [768, 2048])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_the_shipped_configs_compile_for_hopper(k, dtype):
    """What the interpreter cannot check: the kernel with its inline-PTX loads and multiplies compiles
    to a Hopper (sm_90) binary with each config ``routed_config`` ships, on any machine (the GPU tests
    run it)."""
    result = compiled_for_hopper(_COMPILE_FOR_HOPPER, str(k), dtype)
    assert result["cubin"] > 0 and result["vector_loads"] > 0
