"""Test set-up: without a GPU, Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before Triton is imported, so it is set here, at
collection time, and only when no CUDA device is present (on a GPU machine the
same tests compile the kernels and run them on CUDA tensors).
"""

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def compiled_for_hopper(code: str, *args: str) -> dict | list:
    """Run ``code`` (a script that compiles kernels with ``triton.compile`` for sm_90 and prints a JSON
    line last) in a process of its own without TRITON_INTERPRET, under which kernels are not compiled;
    return that JSON. What the interpreter cannot check, on any machine."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_eval_script(*parts: str) -> types.ModuleType:
    """Import a script under eval/ (not a package) from its file, e.g. ``load_eval_script("bench_peers.py")``;
    its folder is not made importable."""
    path = Path(__file__).resolve().parents[1].joinpath("eval", *parts)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
