"""The grouped MXFP4 matmul for mixture-of-experts batches (``kernels.matmul_grouped``, the routed op's
CUDA path above ``routed_op.gemv_pairs``) against each pair's expert dequantized and a float32 product.

Without a GPU the kernel runs under TRITON_INTERPRET=1 on small shapes with small tiles; with one, the
shipped config runs through the op, and CUDA graphs and torch.compile take it.
"""

from __future__ import annotations

import pytest
import torch

from qwantize_hf.constants import E8M0_NAN
from qwantize_hf.kernels.matmul_grouped import grouped_config, grouped_matmul
from qwantize_hf.kernels.matmul_tiled import tiled_config
from qwantize_hf.routed_op import gemv_pairs, mxfp4_linear_routed
from tests.conftest import KERNEL_DEVICE, compiled_for_hopper
from tests.test_routed import MAX_REL_ERR, make_inputs, reference, rel_err

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
# 16- and 32-row tiles, 128 (permuted words) or 64 (bytes) of K a step: K = 160 ends in a partial step
CPU_CONFIGS = {
    "m16": tiled_config(16, 32, 128, 1, True, True, True, 4, 1),
    "m32-bytes": tiled_config(32, 16, 64, 1, True, False, False, 4, 1),
    "m16-words-in-order": tiled_config(16, 32, 64, 1, True, True, False, 4, 1),  # bf16 words, K in order
}
# (experts, pairs, N, K, dtype, bias, block_size): experts with no pairs, groups longer than a tile,
# N odd, pairs not a power of two, fp16 (the byte path), block size 16
CASES = [
    (5, 41, 33, 160, torch.bfloat16, True, 32),
    (3, 70, 40, 96, torch.float16, False, 32),
    (9, 23, 17, 128, torch.bfloat16, True, 16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"E{c[0]}-P{c[1]}-N{c[2]}-K{c[3]}-{str(c[4])[6:]}-bs{c[6]}")
@pytest.mark.parametrize("name", list(CPU_CONFIGS))
def test_grouped_kernel_matches_each_pairs_expert(name, case):
    experts, pairs, n, k, dtype, with_bias, block_size = case
    x, ids, packed, scales, bias = make_inputs(*case, seed=10 + CASES.index(case), device=KERNEL_DEVICE)
    ids[: pairs // 2] = experts - 1  # one long group, spanning several row tiles
    out = grouped_matmul(x, ids, packed, scales, bias, block_size, config=CPU_CONFIGS[name])
    assert out.dtype == dtype and out.shape == (pairs, n) and torch.isfinite(out).all()
    assert rel_err(out, reference(x, ids, packed, scales, bias, block_size)) < MAX_REL_ERR


def test_grouped_kernel_takes_weights_that_are_not_contiguous():
    """Expert stacks sliced out of larger ones (views with other strides): the same products."""
    x, ids, packed, scales, bias = make_inputs(4, 37, 48, 128, torch.bfloat16, True, 32, seed=5, device="cpu")
    wide = {
        "packed": torch.cat([packed, packed.flip(1)], dim=1),
        "scales": torch.cat([scales, scales.flip(1)], dim=1),
        "bias": torch.cat([bias, bias.flip(1)], dim=1),
    }
    views = {name: tensor[:, : tensor.shape[1] // 2] for name, tensor in wide.items()}
    assert not any(view.is_contiguous() for view in views.values())
    on = {"device": KERNEL_DEVICE}
    out = grouped_matmul(
        x.to(**on), ids.to(**on), views["packed"].to(**on), views["scales"].to(**on), views["bias"].to(**on), 32,
        CPU_CONFIGS["m16"],
    )  # fmt: skip
    assert rel_err(out, reference(x, ids, packed, scales, bias, 32)) < MAX_REL_ERR


def test_grouped_kernel_edge_values():
    """Codes 0, +-0.5 and +-6 (the largest), scale byte 0 (2**-127), a NaN scale: the rows of the
    expert with the NaN block come back NaN in every pair routed to it, and only there."""
    x, ids, packed, scales, _ = make_inputs(4, 30, 24, 128, torch.bfloat16, False, 32, seed=3, device="cpu")
    nibbles = torch.tensor([0x0, 0x1, 0x9, 0x7, 0xF])[torch.randint(0, 5, (*packed.shape, 2))]
    packed = (nibbles[..., 0] | (nibbles[..., 1] << 4)).to(torch.uint8)
    scales[1] = 0
    scales[2, 5, 1] = E8M0_NAN
    x[:, :] = x * 2.0**100  # keeps expert 1's products out of the float32 subnormals
    on = {"device": KERNEL_DEVICE}
    out = grouped_matmul(x.to(**on), ids.to(**on), packed.to(**on), scales.to(**on), None, 32, CPU_CONFIGS["m16"])
    out = out.cpu()
    routed_to_2 = ids == 2
    assert routed_to_2.any() and torch.isnan(out[routed_to_2, 5]).all()
    keep = ~torch.isnan(out)
    assert keep.sum() == out.numel() - routed_to_2.sum()
    ref = reference(x, ids, packed, scales, None, 32).double()
    assert float((out.double()[keep] - ref[keep]).norm() / ref[keep].norm()) < MAX_REL_ERR


def test_grouped_config_takes_its_row_tile_from_the_pairs_an_expert_gets():
    assert [grouped_config(pairs, 128).kwargs["BLOCK_M"] for pairs in (256, 4096, 8192, 65536)] == [16, 32, 64, 64]
    assert grouped_config(300, 8).kwargs["BLOCK_M"] == 64


def test_op_takes_the_grouped_kernel_above_the_routed_kernels_pairs():
    assert gemv_pairs(128) == 256 and gemv_pairs(8) == 16


_COMPILE_FOR_HOPPER = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qwantize_hf.kernels.matmul_grouped import _mxfp4_grouped_kernel, grouped_config

pairs, dtype = int(sys.argv[1]), sys.argv[2]
config = grouped_config(pairs, 128)
meta = config.kwargs
constants = {"EXPERTS": 128, "HAS_BIAS": True, "BLOCK_SIZE": 32, "BLOCK_M": meta["BLOCK_M"], "BLOCK_N": meta["BLOCK_N"],
             "BLOCK_K": meta["BLOCK_K"], "WORDS": meta["WORDS"], "INTERPRET": False}
signature = {"x_ptr": "*" + dtype, "tile_expert_ptr": "*i32", "tile_row_ptr": "*i32", "expert_end_ptr": "*i32",
             "packed_ptr": "*u8", "scales_ptr": "*u8", "bias_ptr": "*" + dtype, "out_ptr": "*" + dtype, "N": "i32",
             "K": "i32", "half_k": "i32", "words_k": "i32", "blocks_k": "i32", "stride_xm": "i32", "stride_om": "i32",
             **dict.fromkeys(constants, "constexpr")}
source = ASTSource(fn=_mxfp4_grouped_kernel, signature=signature, constexprs=constants)
options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
asm = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm
print(json.dumps({"cubin": len(asm["cubin"]), "wgmma": asm["ptx"].count("wgmma.mma_async")}))
"""


@pytest.mark.parametrize("pairs", [512, 8192])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_the_shipped_configs_compile_for_hopper(pairs, dtype):
    """What the interpreter cannot check: the kernel compiles to a Hopper (sm_90) binary whose products
    are wgmma instructions, with the configs ``grouped_config`` ships, on any machine."""
    result = compiled_for_hopper(_COMPILE_FOR_HOPPER, str(pairs), dtype)
    assert result["cubin"] > 0 and result["wgmma"] > 0


@gpu
@pytest.mark.parametrize("k", [768, 2048, 2880])
def test_gpu_op_above_the_routed_pairs_matches_the_reference(k):
    """The MoE shapes (Qwen3-30B-A3B's K of 768 and 2048, GPT-OSS's 2880), through the op: pair counts
    above ``gemv_pairs`` take the grouped kernel."""
    for pairs, block_size, dtype in ((40, 32, torch.bfloat16), (300, 32, torch.float16), (1000, 16, torch.bfloat16)):
        x, ids, packed, scales, bias = make_inputs(16, pairs, 1040, k, dtype, True, block_size, pairs, "cuda")
        assert pairs > gemv_pairs(16)
        out = mxfp4_linear_routed(x, ids, packed, scales, bias, block_size)
        assert rel_err(out, reference(x, ids, packed, scales, bias, block_size)) < MAX_REL_ERR


@gpu
@pytest.mark.parametrize("pairs", [200, 5000])
def test_gpu_cuda_graph_and_compile_take_the_grouped_path(pairs):
    """No host synchronisation on the grouped path (a capture would fail on one), at a pair count
    past the sizes where torch's sort changes algorithm too."""
    x, ids, packed, scales, bias = make_inputs(8, pairs, 512, 1024, torch.bfloat16, True, 32, 1, "cuda")
    expected = mxfp4_linear_routed(x, ids, packed, scales, bias)
    compiled = torch.compile(lambda *a: mxfp4_linear_routed(*a), fullgraph=True)
    assert torch.equal(compiled(x, ids, packed, scales, bias), expected)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mxfp4_linear_routed(x, ids, packed, scales, bias)
    ids.copy_(torch.randint(0, 8, ids.shape, device="cuda"))  # new routing, other group sizes, same buffers
    graph.replay()
    assert torch.equal(captured, mxfp4_linear_routed(x, ids, packed, scales, bias))
