"""The product-key memory's Triton value read (models/triton_pkm.py) against ``F.embedding_bag``: outputs,
weight and table gradients (gradcheck in float64), and the PKM layer taking it where it runs. The kernels
run compiled on a GPU, else in Triton's CPU interpreter."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.pkm import PKMConfig, ProductKeyMemory
from tests.unit.models.triton_setup import kernel_device  # noqa: F401  (a fixture)


def test_weighted_gather_passes_gradcheck_in_float64(kernel_device):  # noqa: F811
    """Rows read by several (token, slot) pairs, rows read by none: both gradients match finite differences."""
    from models.triton_pkm import weighted_gather

    g = torch.Generator().manual_seed(0)
    indices = torch.tensor([[0, 2, 2, 4], [1, 2, 0, 0], [4, 4, 3, 2]], device=kernel_device)  # row 5 unread
    weights = torch.randn(3, 4, generator=g, dtype=torch.float64).to(kernel_device).requires_grad_()
    table = torch.randn(6, 3, generator=g, dtype=torch.float64).to(kernel_device).requires_grad_()
    assert torch.autograd.gradcheck(lambda w, t: weighted_gather(indices, w, t), (weights, table))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_gather_equals_embedding_bag(kernel_device, dtype):  # noqa: F811
    """Output, weight gradient and table gradient equal ``F.embedding_bag``'s in float32 on the same stored
    table (a bf16 table's results rounded once to bf16); a width that is not a multiple of a column block."""
    from models.triton_pkm import weighted_gather

    g = torch.Generator().manual_seed(1)
    T, J, R, dim = 9, 12, 30, 40
    indices = torch.randint(0, R, (T, J), generator=g).to(kernel_device)
    weights = torch.rand(T, J, generator=g).to(kernel_device).requires_grad_()
    table = torch.randn(R, dim, generator=g).to(dtype).to(kernel_device).requires_grad_()
    grad = torch.randn(T, dim, generator=g).to(dtype).to(kernel_device)
    out = weighted_gather(indices, weights, table)
    out.backward(grad)

    w_ref = weights.detach().clone().requires_grad_()
    t_ref = table.detach().float().requires_grad_()
    ref = F.embedding_bag(indices, t_ref, mode="sum", per_sample_weights=w_ref)
    ref.backward(grad.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: one rounding of values of magnitude ~5
    assert out.dtype == dtype and table.grad.dtype == dtype
    assert torch.allclose(out.float(), ref, atol=tol * 5, rtol=tol)
    assert torch.allclose(weights.grad, w_ref.grad, atol=1e-4, rtol=1e-5)  # float32 sums either way
    assert torch.allclose(table.grad.float(), t_ref.grad, atol=tol * 5, rtol=tol)
    assert torch.all(table.grad[torch.bincount(indices.flatten(), minlength=R) == 0] == 0)


def test_pkm_layer_reads_through_the_kernels(kernel_device, monkeypatch):  # noqa: F811
    """Where the kernels run, the PKM layer's forward and backward go through them and give the
    ``EmbeddingBag`` path's output and parameter gradients."""
    import models.triton_pkm as triton_pkm

    calls = []
    gather = triton_pkm.weighted_gather
    monkeypatch.setattr(triton_pkm, "weighted_gather", lambda *a: calls.append(1) or gather(*a))
    torch.manual_seed(0)
    layer = ProductKeyMemory(32, PKMConfig(num_keys=8, topk=4, heads=2, dim_head=8)).to(kernel_device)
    x = torch.randn(2, 5, 32, device=kernel_device)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        layer.zero_grad()
        y = layer(x)
        (y * torch.arange(32, device=kernel_device)).sum().backward()
        return y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}

    y, grads = run()
    assert calls, "the layer did not use the Triton kernels"
    if kernel_device.type == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")  # the CPU path: F.embedding_bag
    else:
        monkeypatch.setattr("models.pkm.kernels_run_on", lambda device: False)
    y_ref, grads_ref = run()
    assert len(calls) == 1
    assert torch.allclose(y, y_ref, atol=1e-5)
    for name, g in grads.items():
        assert torch.allclose(g, grads_ref[name], atol=1e-5), name
