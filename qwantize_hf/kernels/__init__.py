"""Triton kernels. Each is an optimisation of a torch function in ``qwantize_hf.format``
and is tested byte for byte against it; nothing here is imported unless Triton is used."""
