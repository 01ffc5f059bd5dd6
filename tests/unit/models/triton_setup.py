"""Where the Triton kernel tests run: compiled on a GPU when this machine has one, else through Triton's
CPU interpreter. Triton picks the interpreter once, when it is first imported, so importing this module
imports it with ``TRITON_INTERPRET=1`` (and then unsets it: other tests' CPU code keeps its own paths);
the ``kernel_device`` fixture sets it again around each test that runs a kernel on the CPU."""
from __future__ import annotations

import os
import sys

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU and "triton" not in sys.modules:
    _before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    finally:
        if _before is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = _before


@pytest.fixture
def kernel_device(monkeypatch) -> torch.device:
    """The device the kernels run on here: ``cuda``, or ``cpu`` with the interpreter switched on."""
    pytest.importorskip("triton")
    from models.triton_support import interpreted, kernels_run_on

    if GPU:
        device = torch.device("cuda")
    else:
        if not interpreted():
            pytest.fail("triton was imported before tests/unit/models/triton_setup.py could pick its interpreter")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
    assert kernels_run_on(device)
    return device
