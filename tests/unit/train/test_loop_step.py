"""One optimizer step of the training loop: --grad-clip bounds the update, 0 turns clipping off."""
from __future__ import annotations

import torch

from pipelines.train.loop import optimizer_step


def _step(grad_clip: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One plain-SGD step (lr 1) from zero with gradient ``scale * (3, 4)``: the update is minus the used gradient."""
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0]) * scale  # norm 5 * scale
    optimizer_step(torch.nn.ParameterList([p]), torch.optim.SGD([p], lr=1.0), grad_clip)
    return p.detach().clone(), p.grad


def test_grad_clip_scales_the_gradient_to_the_bound():
    moved, grad = _step(grad_clip=1.0, scale=2.0)  # norm 10 -> clipped to 1
    assert torch.allclose(moved, -torch.tensor([0.6, 0.8]), atol=1e-6)
    assert grad is None  # gradients are cleared after the step


def test_small_gradients_and_clip_off_are_untouched():
    moved, _ = _step(grad_clip=100.0, scale=2.0)  # norm 10 under the bound
    assert torch.allclose(moved, -torch.tensor([6.0, 8.0]))
    moved, _ = _step(grad_clip=0.0, scale=2.0)  # --grad-clip 0: off
    assert torch.allclose(moved, -torch.tensor([6.0, 8.0]))
