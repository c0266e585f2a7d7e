"""Triton kernels. Each is an optimisation of a torch function in ``qwantize_hf.format``
and is tested byte for byte against it; nothing here is imported unless Triton is used.

One kernel family a file: ``quantize`` and ``dequantize``; the fused matmul's
``matmul_gemv`` (one row, CUDA cores), ``matmul_mma`` (warp-level mma.sync) and
``matmul_tiled`` (``tl.dot``), with ``matmul_dispatch`` choosing and launching them;
``mx_decode`` holds the code and scale decoding they share. These modules import only
``constants``, ``format`` and ``backend``: never ``ops``, the custom op or anything above.
"""
