"""Adapters between qwantize_hf checkpoints and other runtimes' checkpoint layouts.

They live inside the package (not in a top-level ``integrations/`` folder) so
that ``pip install qwantize_hf`` ships them and the ``qwantize-convert`` CLI can
import them. Each adapter only renames, validates and re-labels tensors: none
of them quantizes or dequantizes anything.
"""
