"""Whether this process can run the project's Triton kernels on a device, without importing Triton where
it cannot (CPU-only installs never import it; Triton is an optional dependency).

Triton decides once, when it is imported, whether its kernels are compiled for GPUs or run by its CPU
interpreter (``TRITON_INTERPRET=1``): the tests use the interpreter to check the kernels without a GPU.
So a kernel runs on CUDA tensors when Triton was imported compiled, and on CPU tensors only when it was
imported interpreted and ``TRITON_INTERPRET=1`` is still set (the tests set it only around their calls,
so that other CPU code keeps its own paths).
"""
from __future__ import annotations

import os
from typing import Callable

import torch


def interpreted() -> bool:
    """Whether the imported Triton runs kernels in its CPU interpreter (False without Triton)."""
    try:
        import triton.language as tl
    except ImportError:
        return False
    return type(tl.standard.max).__name__ == "InterpretedFunction"


def kernels_run_on(device: torch.device) -> bool:
    """Whether the Triton kernels of :mod:`models` can take tensors on ``device`` in this process."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
    elif device.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return interpreted() == (device.type == "cpu")


def jit(fn: Callable) -> Callable:
    """``triton.jit`` in the mode Triton was imported in, whatever ``TRITON_INTERPRET`` says now: a kernel
    module imported later (the tests unset the variable between tests) still matches Triton's own
    library functions, which a kernel calls."""
    if interpreted():
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)
