"""Which MXFP4 matmul kernel runs a call, and its launch: ``mxfp4_matmul_triton``.

Three kernel families compute ``y = x @ dequant(W).T (+ bias)`` straight from packed codes
and scale bytes (their torch twin: ``dequantize_blocks_torch`` followed by ``F.linear``):
``matmul_gemv`` (one row of x on the CUDA cores), ``matmul_mma`` (up to 16 rows of bf16 x
through warp-level mma.sync) and ``matmul_tiled`` (``tl.dot``: decode, batch and prefill
configs). Above 16 rows a fourth candidate competes with them: ``DEQUANTIZE_CONFIG``, the
weight dequantized by the Triton kernel of ``kernels.dequantize`` into a temporary and
multiplied by cuBLAS, which wins where the product is compute-bound. The dispatch times
every config that can take a shape once, on its first call, and keeps the fastest
(eval/results/bench_matmul_h100.md); a later call with the same launch key starts that
compiled kernel directly (``RememberedLaunch``). This module decides and launches; the
kernels never import it, and it never holds tensor math of its own.

Public, for the custom op, tests and eval scripts (everything else here is private):

- ``mxfp4_matmul_triton``: the fused matmul; ``config`` forces a kernel config,
  ``workspace`` a preallocated split-K workspace.
- ``split_k_workspace``: float32 partials and zeroed counters for split-K launches.
- ``candidate_configs(m, k, x)``: the configs of every kernel that may take an [m, k] x.
- ``kernel_family(config)``: "gemv", "mma", "tiled" or "dequantize", the kernel a config is for.
- ``DEQUANTIZE_CONFIG``: the dequantize + cuBLAS candidate.
- ``chosen_config`` / ``set_chosen_config``: the dispatch's remembered choice for a call's
  operands (None: not chosen yet), and forcing or dropping it.
- ``clear_dispatch_cache()``: forget every choice and remembered launch.
- ``remembered_launch``: the ``RememberedLaunch`` kept for a call's launch key, if any.
- ``launch_key``, ``launch_args``, ``launch``: a launch's cache key, its kernel, grid and
  arguments, and one launch through Triton's own ``kernel[grid](...)``.
- ``x_with_aligned_rows``: x as the register kernels read it (rows 16-byte aligned).
- Re-exported from the family modules: the config constructors ``gemv_config``,
  ``mma_config``, ``tiled_config``, the tables ``GEMV_CONFIGS``, ``MMA_CONFIGS``,
  ``DECODE_CONFIGS``, ``BATCH_CONFIGS``, ``PREFILL_CONFIGS``, ``gemv_fits``, ``batch_fits`` and
  the row limits ``GEMV_MAX_M``, ``MMA_MAX_M``, ``DECODE_MAX_M``, ``DECODE_BLOCK_M``, ``BATCH_MAX_M``.
"""

from __future__ import annotations

import torch
import triton

from qwantize_hf.backend import batch_kernels_enabled, inline_ptx_allowed, interpreting
from qwantize_hf.constants import F4_CODES_PER_BYTE
from qwantize_hf.kernels.dequantize import dequantize_triton
from qwantize_hf.kernels.matmul_gemv import (
    GEMV_CONFIGS,
    GEMV_K_MULTIPLE,
    GEMV_MAX_M,
    gemv_config,
    gemv_fits,
    gemv_launch,
    is_gemv_config,
)
from qwantize_hf.kernels.matmul_mma import (
    MMA_CAPABILITY,
    MMA_CONFIGS,
    MMA_MAX_M,
    is_mma_config,
    mma_config,
    mma_grid,
    mma_launch,
)
from qwantize_hf.kernels.matmul_tiled import (
    BATCH_CONFIGS,
    BATCH_MAX_M,
    DECODE_BLOCK_M,
    DECODE_CONFIGS,
    DECODE_MAX_M,
    PREFILL_CONFIGS,
    batch_fits,
    tiled_config,
    tiled_launch,
)
from qwantize_hf.kernels.mx_decode import CODES_PER_WORD

__all__ = [
    "BATCH_CONFIGS",
    "BATCH_MAX_M",
    "DECODE_BLOCK_M",
    "DECODE_CONFIGS",
    "DECODE_MAX_M",
    "DEQUANTIZE_CONFIG",
    "GEMV_CONFIGS",
    "GEMV_MAX_M",
    "MMA_CONFIGS",
    "MMA_MAX_M",
    "PREFILL_CONFIGS",
    "RememberedLaunch",
    "batch_fits",
    "candidate_configs",
    "chosen_config",
    "clear_dispatch_cache",
    "gemv_config",
    "gemv_fits",
    "kernel_family",
    "launch",
    "launch_args",
    "launch_key",
    "mma_config",
    "mxfp4_matmul_triton",
    "remembered_launch",
    "set_chosen_config",
    "split_k_workspace",
    "tiled_config",
    "x_with_aligned_rows",
]

# Bytes: Triton specializes pointers on this alignment, and the register kernels load 16-byte vectors.
_ALIGN = 16
_WORD_CODES = CODES_PER_WORD.value

# Not a Triton kernel's config: the weight dequantized into a temporary of x's dtype, then cuBLAS.
DEQUANTIZE_CONFIG = triton.Config({"DEQUANTIZE": True, "SPLIT_K": 1})


def kernel_family(config: triton.Config) -> str:
    """The kernel ``config`` is for: "gemv" (``matmul_gemv``), "mma" (``matmul_mma``), "tiled"
    (``matmul_tiled``) or "dequantize" (``DEQUANTIZE_CONFIG``)."""
    if config.kwargs.get("DEQUANTIZE"):
        return "dequantize"
    if is_gemv_config(config):
        return "gemv"
    if is_mma_config(config):
        return "mma"
    return "tiled"


def _output_tiles(m: int, n: int, config: triton.Config) -> int:
    """Output tiles (programs per K split) of a launch of ``config`` on an [m, n] output."""
    if is_mma_config(config):
        tiles_n, _, tiles_m = mma_grid(config, m, n)
        return tiles_m * tiles_n
    if kernel_family(config) == "dequantize":
        return 0
    # A GEMV config's tiles are one row of x high.
    return triton.cdiv(m, config.kwargs.get("BLOCK_M", 1)) * triton.cdiv(n, config.kwargs["BLOCK_N"])


def x_with_aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` for the CUDA-core and warp-MMA kernels, which read it 16 bytes at a time (as int32
    pairs of elements): its rows must start 16-byte aligned. A fresh copy's do (K % 32 == 0); a
    decode step's x is small."""
    if x.data_ptr() % _ALIGN or (x.shape[0] > 1 and x.stride(0) * x.element_size() % _ALIGN):
        return torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)
    return x


def _m_bucket(m: int) -> int:
    """The dispatch's key for M: one choice per power of two, so new prompt lengths don't choose again."""
    return 1 << max(m - 1, 0).bit_length()


def split_k_workspace(
    m: int, n: int, configs: tuple[triton.Config, ...], device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Float32 partials and zeroed arrival counters for split-K launches of ``configs`` on an [m, n] output."""
    max_split = max(cfg.kwargs["SPLIT_K"] for cfg in configs)
    if max_split == 1:
        # A split-1 launch touches neither buffer: None for both (Triton compiles the launch
        # without them), so no allocation and no memset of counters. Not a cached placeholder
        # either: a tensor allocated during CUDA-graph warm-up belongs to the graph's memory
        # pool, and torch.compile's CUDA graphs refuse live pool tensors they do not track.
        return None, None
    most_tiles = max(_output_tiles(m, n, c) for c in configs)
    partial = torch.empty(max_split * m * n, dtype=torch.float32, device=device)
    counters = torch.zeros(most_tiles, dtype=torch.int32, device=device)
    return partial, counters


def mxfp4_matmul_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: int,
    config: triton.Config | None = None,
    workspace: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """``x [M, K] @ dequant(packed [N, K/2], scales [N, K/block_size]).T + bias`` in ``x.dtype``.

    ``x`` (bf16 or fp16) must be contiguous along K, ``packed`` and ``scales`` contiguous;
    shapes are assumed checked (see ``qwantize_hf.linear_op``). ``config`` forces one kernel
    config (benchmarks, tests: a ``GEMV_CONFIGS`` one runs the CUDA-core kernel, an
    ``MMA_CONFIGS`` one the warp-MMA kernel, others the tensor-core one). None picks by M,
    once per shape (``_choose``): the fastest config of the kernels that can take it.
    ``workspace``: (float32 split-K partials, zeroed int32 arrival counters) to use instead of
    fresh ones, large enough for every config that may run (``split_k_workspace``); for
    benchmarks that time the kernel alone. The kernel leaves the counters at zero again.
    """
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        # Triton launches on the current device, and _choose's timing runs there too.
        with torch.cuda.device(x.device):
            return mxfp4_matmul_triton(x, packed, scales, bias, block_size, config, workspace)
    m, k = x.shape
    n = packed.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    if packed.data_ptr() % _ALIGN:
        packed = packed.clone()  # word loads need a 16-byte aligned start; a fresh allocation has one
    operands = (x, packed, scales, bias, out, block_size, workspace)
    # Remembered launches (RememberedLaunch) are for dispatched calls of decode sizes on a GPU,
    # where host time counts and M takes few values (a launch key per exact M).
    if config is not None or workspace is not None or not x.is_cuda or m > DECODE_MAX_M:
        launch(config or _dispatch(operands), *operands)
        return out
    # The choice is made once per key (_dispatch), and a call whose arguments look like an
    # earlier one's, to Triton's specialization, starts that call's compiled kernel directly,
    # with no tuning or argument binding on the way.
    key = launch_key(x, packed, scales, bias, block_size)
    launcher = _LAUNCHERS.get(key)
    if launcher is not None and _CHOSEN.get(launcher.choice_key) is launcher.config:
        launcher(x, packed, scales, bias, out)
        return out
    config = _dispatch(operands)
    made = launch(config, *operands)
    if made is not None and (launcher is not None or key not in _LAUNCHERS):  # None: not a Triton launch
        # None under a Triton this was not tested with: never tried again.
        _LAUNCHERS[key] = RememberedLaunch.make(made, config, _choice_key(x, packed, bias, block_size))
    return out


def launch_key(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, block_size: int
) -> tuple:
    """The remembered launches' key: everything a launch's compiled kernel depends on but the
    config (chosen per ``_choice_key``, which this determines): exact sizes and x's row stride,
    and the dtype and 16-byte alignment of each tensor (Triton specializes pointers on it). The
    output and split-K buffers are fresh allocations (aligned), ``packed`` aligned by the caller."""
    m, k = x.shape
    aligned = (
        x.data_ptr() % _ALIGN == 0,
        scales.data_ptr() % _ALIGN == 0,
        bias is None or bias.data_ptr() % _ALIGN == 0,
    )
    dtypes = (x.dtype, packed.dtype, scales.dtype, None if bias is None else bias.dtype)
    return (m, packed.shape[0], k, x.stride(0), block_size, aligned, dtypes, x.device)


def _choice_key(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, block_size: int) -> tuple:
    """``_CHOSEN``'s key for these operands."""
    m, k = x.shape
    return (_m_bucket(m), packed.shape[0], k, bias is not None, block_size, x.dtype, x.device)


def _dispatch(operands) -> triton.Config:
    """The config ``_choose`` chose for these operands' key, choosing it on first use."""
    x, packed, _, bias, _, block_size, _ = operands
    key = _choice_key(x, packed, bias, block_size)
    config = _CHOSEN.get(key)
    if config is None:
        if x.shape[0] > DECODE_MAX_M and x.is_cuda and torch.cuda.is_current_stream_capturing():
            # No timing inside a CUDA graph's capture. Above the decode sizes the dequantize +
            # cuBLAS candidate needs no choice (and compiles one small kernel at most): the graph
            # runs it, and the choice waits for a call outside capture (decode sizes refuse
            # instead, in _choose).
            return DEQUANTIZE_CONFIG
        config = _CHOSEN[key] = _choose(operands)
    return config


def chosen_config(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, block_size: int
) -> triton.Config | None:
    """The config the dispatch chose for calls like ``mxfp4_matmul_triton(x, packed, scales, bias,
    block_size)`` (one choice per power-of-two bucket of M, N, K, bias or not, block size, x's
    dtype and device), or None while no such call has chosen one."""
    return _CHOSEN.get(_choice_key(x, packed, bias, block_size))


def set_chosen_config(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: int,
    config: triton.Config | None,
) -> None:
    """Make the dispatch run ``config`` for calls like these operands, untimed; None drops the
    choice, so the next such call times the candidates again (and replaces its remembered launch)."""
    key = _choice_key(x, packed, bias, block_size)
    if config is None:
        _CHOSEN.pop(key, None)
    else:
        _CHOSEN[key] = config


def clear_dispatch_cache() -> None:
    """Forget every choice and every remembered launch: each shape chooses again on its next call."""
    _CHOSEN.clear()
    _LAUNCHERS.clear()


def remembered_launch(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, block_size: int
) -> RememberedLaunch | None:
    """The launch a dispatched GPU call with these operands' launch key remembered, or None
    (no such call yet, or a Triton version the launcher was not tested with)."""
    return _LAUNCHERS.get(launch_key(x, packed, scales, bias, block_size))


def candidate_configs(m: int, k: int, x: torch.Tensor) -> tuple[triton.Config, ...]:
    """The configs of every kernel that may take an [m, k] x (``x``: its dtype and device)."""
    mma = m <= MMA_MAX_M and k % GEMV_K_MULTIPLE == 0 and x.dtype == torch.bfloat16
    mma = mma and inline_ptx_allowed(x.device, MMA_CAPABILITY)  # its plain-op twin is for the interpreter
    if gemv_fits(m, k):
        return GEMV_CONFIGS + (MMA_CONFIGS if mma else ())
    if m <= DECODE_MAX_M:
        return (MMA_CONFIGS if mma else ()) + DECODE_CONFIGS
    if not batch_kernels_enabled():
        return (DEQUANTIZE_CONFIG,)
    # The fused kernels first: under the interpreter the first candidate runs, untimed.
    return tuple(c for c in BATCH_CONFIGS if batch_fits(c, m)) + PREFILL_CONFIGS + (DEQUANTIZE_CONFIG,)


_CHOOSE_REPEATS = 40
_HOST_COVER_CYCLES = 400_000  # GPU clock cycles (about 0.2 ms) per candidate: its flush and launch on the host


def _choose(operands) -> triton.Config:
    """The fastest config for these operands' shape, timed as whole calls (a fresh split-K
    workspace included) with a cold L2, as in a model's forward pass, where a layer's weight
    has left L2 before it is read again. The candidates take turns, each after an L2 flush
    that only reads (Triton's autotuner flushes by writing, and the write-back of the
    flush then competes with the timed kernel), and each gets the median of its times.
    A config that fails to build or run here (registers, shared memory, PTX) is skipped.
    Under the interpreter (CPU tensors) the first candidate that runs is taken, untimed."""
    x = operands[0]
    m, k = x.shape
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"mxfp4 matmul: the first call for an input of {m} rows and {k} features ({x.dtype}) with this "
            "weight shape came inside CUDA-graph capture, where its kernel cannot be chosen (that times the "
            "candidates). Call the model once on inputs of the same shape before capturing (a warm-up step), "
            "as torch.compile's CUDA graphs do."
        )
    candidates, failures = [], []
    for config in candidate_configs(m, k, x):
        try:
            launch(config, *operands)  # compiles it
        except Exception as exc:  # does not fit this GPU, or its PTX does not build for it: skipped
            failures.append(f"{config}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        candidates.append(config)
    if not candidates:
        raise RuntimeError("mxfp4 matmul: no kernel config could run here:\n" + "\n".join(failures))
    if len(candidates) == 1 or not x.is_cuda:
        return candidates[0]
    try:
        size = 2 * torch.cuda.get_device_properties(x.device).L2_cache_size
        flush = torch.empty(size // 4, dtype=torch.int32, device=x.device)
    except torch.cuda.OutOfMemoryError:
        flush = None  # timed with whatever L2 holds: a worse choice, not a failed call
    times = [[] for _ in candidates]
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in candidates]
    for _ in range(_CHOOSE_REPEATS):
        # The GPU spins while the host queues a round, so no launch waits on the host: a
        # kernel of a few microseconds takes less time than its launch takes on the host,
        # and timed back to back with the host in the loop, host time would decide.
        torch.cuda._sleep(_HOST_COVER_CYCLES * len(candidates))
        for i, config in enumerate(candidates):
            if flush is not None:
                flush.amax()
            events[i][0].record()
            launch(config, *operands)
            events[i][1].record()
        events[-1][1].synchronize()
        for i in range(len(candidates)):
            times[i].append(events[i][0].elapsed_time(events[i][1]))
    medians = [sorted(t)[len(t) // 2] for t in times]
    return candidates[medians.index(min(medians))]


def launch(
    config: triton.Config,
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    block_size: int,
    workspace: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> tuple:
    """One launch of ``config`` on ``mxfp4_matmul_triton``'s operands, through Triton's own launch.
    Returns the launch: the kernel, grid, arguments, keyword arguments, and what Triton's
    launch returned (on a GPU, the compiled kernel); for ``DEQUANTIZE_CONFIG``, which is not
    one launch, None."""
    if kernel_family(config) == "dequantize":
        weight = dequantize_triton(packed, scales, block_size, x.dtype)
        if bias is None:
            torch.mm(x, weight.t(), out=out)
        else:
            torch.addmm(bias.to(x.dtype), x, weight.t(), out=out)
        return None
    kernel, grid, args, kwargs = launch_args(config, x, packed, scales, bias, out, block_size, workspace)
    return kernel, grid, args, kwargs, kernel[grid](*args, **kwargs)


def launch_args(
    config: triton.Config,
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    block_size: int,
    workspace: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> tuple:
    """The kernel, grid, arguments and keyword arguments of a launch of ``config`` on these operands."""
    m, k = x.shape
    n = packed.shape[0]
    family = kernel_family(config)
    if family == "gemv" and k % GEMV_K_MULTIPLE:
        raise ValueError(f"the CUDA-core (GEMV) configs need K a multiple of {GEMV_K_MULTIPLE}, got K = {k}")
    if family == "mma" and (k % GEMV_K_MULTIPLE or x.dtype != torch.bfloat16):
        raise ValueError(
            f"the warp-MMA configs need bf16 x and K a multiple of {GEMV_K_MULTIPLE}, got {x.dtype} and K = {k}"
        )
    if family != "tiled":
        x = x_with_aligned_rows(x)
    # Split-K arrival counters, one per output tile, fresh for every call: a buffer shared
    # between calls would be shared by calls on concurrent streams too.
    if workspace is None:
        partial, counters = split_k_workspace(m, n, (config,), x.device)
    else:
        partial, counters = workspace
        split = config.kwargs["SPLIT_K"]
        if split > 1 and (partial.numel() < split * m * n or counters.numel() < _output_tiles(m, n, config)):
            raise ValueError(f"workspace too small for {config}: make it with split_k_workspace for every config")
    common = (x, packed, scales, bias if bias is not None else out, out, partial, counters, m, n)
    kwargs = {"HAS_BIAS": bias is not None, "BLOCK_SIZE": block_size, "INTERPRET": interpreting()}
    if family == "tiled":
        args = (*common, k, k // F4_CODES_PER_BYTE, k // _WORD_CODES, k // block_size, x.stride(0), n)
        kernel, grid, extra = tiled_launch(config, m, n)
    else:
        args = (*common, k // _WORD_CODES, k // block_size, x.stride(0), n)
        kernel, grid, extra = (gemv_launch if family == "gemv" else mma_launch)(config, m, n, x.device)
    kwargs.update(extra)
    kwargs.update(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    return kernel, grid, args, kwargs


# The tensors every kernel takes first: x, packed, scales, bias (or out), out, split-K partials and counters.
_TENSOR_ARGS = 7


# Triton versions whose compiled kernels' launcher RememberedLaunch calls the way JITFunction.run does.
_LAUNCHER_TRITON = ("3.6",)


class RememberedLaunch:
    """A dispatched call's launch, remembered: the compiled kernel of its config, started through
    the launcher Triton compiled for it, with the arguments in the order Triton's own launch
    passes them. ``kernel[grid](...)`` binds and specializes every argument on every call; in
    eager decoding that host time is most of a call's (eval/kernels/bench_op_overhead.py). A
    launcher is kept per exact launch key (sizes, x's row stride, and the dtype and 16-byte
    alignment of every tensor: finer than Triton's specialization, see the tests, so the
    compiled kernel is the one Triton would pick); per call only the tensors change. Like the
    dispatch's choice, what a first call read from the environment (QWANTIZE_HF_NO_INLINE_PTX,
    Triton's debug knobs) holds for later calls with its key; Triton's pre-run hooks and its
    check that the kernels' global constants did not change are skipped (these kernels have
    neither). ``config`` and ``choice_key`` say which choice it was made for: it is used only
    while the dispatch's choice for that key is still ``config``."""

    __slots__ = ("choice_key", "config", "_compiled", "_grid", "_fixed", "_rows16", "_split", "_device", "_stream")

    @classmethod
    def make(cls, made: tuple, config: triton.Config, choice_key: tuple) -> RememberedLaunch | None:
        """A launcher for a launch ``launch`` just made on a GPU (``made``, what it returned), or
        None under a Triton version not in ``_LAUNCHER_TRITON`` (the dispatch then launches through Triton)."""
        kernel, grid, args, kwargs, compiled = made
        if not triton.__version__.startswith(_LAUNCHER_TRITON):
            return None
        values = dict(zip(kernel.arg_names, args))
        values.update(kwargs)
        self = cls()
        self.choice_key = choice_key
        self.config = config
        self._compiled = compiled
        self._grid = (*grid, 1, 1)[:3]  # the tensor-core kernel's grid has two axes
        self._fixed = tuple(values[name] for name in kernel.arg_names[_TENSOR_ARGS:])
        self._rows16 = kernel_family(config) != "tiled"
        self._split = config.kwargs["SPLIT_K"]
        self._device = args[0].device
        # Triton's own way to the current stream (torch's raw stream handle, for a device index).
        get_stream = triton.runtime.driver.active.get_current_stream
        index = self._device.index
        self._stream = lambda: get_stream(index)
        return self

    def __call__(self, x, packed, scales, bias, out) -> None:
        m, n = out.shape
        if self._rows16:
            x = x_with_aligned_rows(x)
        if self._split > 1:
            partial, counters = split_k_workspace(m, n, (self.config,), self._device)
        else:
            partial = counters = None
        args = (x, packed, scales, bias if bias is not None else out, out, partial, counters, *self._fixed)
        compiled, grid = self._compiled, self._grid
        stream = self._stream()
        hooks = triton.knobs.runtime
        compiled.run(
            grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
            compiled.launch_metadata(grid, stream, *args), hooks.launch_enter_hook, hooks.launch_exit_hook, *args,
        )  # fmt: skip


# (M bucket, N, K, bias?, block size, dtype, device) -> the config ``_choose`` chose for it.
_CHOSEN: dict[tuple, triton.Config] = {}
# mxfp4_matmul_triton's launch key -> the launcher of its last dispatched call with that key.
_LAUNCHERS: dict[tuple, RememberedLaunch | None] = {}
