"""Unit tests for models/pkm.py (product-key memory)."""

import pytest
import torch
from torch import nn

from models.pkm import PKMConfig, ProductKeyMemory, param_groups


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared machine they can lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _layer(dim: int = 32, **kw) -> ProductKeyMemory:
    torch.manual_seed(0)
    cfg = PKMConfig(**{"num_keys": 16, "topk": 4, "heads": 2, "dim_head": 8, **kw})
    return ProductKeyMemory(dim, cfg)


def test_shapes_and_dtype():
    layer = _layer()
    x = torch.randn(3, 7, 32)
    y = layer(x)
    assert y.shape == (3, 7, 32)
    assert y.dtype == x.dtype
    assert torch.isfinite(y).all()


def _full_scores(layer: ProductKeyMemory, x: torch.Tensor) -> torch.Tensor:
    """float32 scores (T, heads, num_keys ** 2) of every product key, by brute force."""
    h, K, dh = layer.config.heads, layer.config.num_keys, layer.dim_head
    T = x.shape[0] * x.shape[1]
    q = layer.query_norm(layer.to_queries(x.reshape(T, layer.dim)).view(T, 2 * h, dh))  # (T, 2h, dh)
    keys = layer.keys.detach()
    per_head = [((q[:, i] @ keys[i])[:, :, None] + (q[:, h + i] @ keys[h + i])[:, None, :]).reshape(T, K * K)
                for i in range(h)]
    return torch.stack(per_head, dim=1)  # (T, h, K*K)


def test_bf16_autocast_matches_float32_within_bf16_error():
    """Under bf16 autocast the layer reads what float32 reads, within bf16 rounding: every slot it picks
    scores (in float32) within rounding of the k-th best (near-ties may swap), and the output equals the
    float32 softmax-weighted sum of the slots it picked, to bf16 precision; the output keeps x's dtype."""
    layer = _layer().eval()
    h, k = layer.config.heads, layer.config.topk
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1))
    T = 21
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = layer(x)
            idx16, _ = layer.select(x)
        full = _full_scores(layer, x)  # (T, h, K*K) float32
        picked = idx16.view(T, h, k)
        scores = full.gather(-1, picked)  # (T, h, k): float32 scores of the slots bf16 picked
        kth_best = full.topk(k, dim=-1).values[..., -1]  # (T, h)
        want = (layer.values.weight[picked] * scores.softmax(-1)[..., None]).sum((1, 2)).view(3, 7, 32)
    assert y16.dtype == torch.float32
    assert all(len(set(row.tolist())) == k for row in picked.view(-1, k))  # k distinct slots per head
    assert (kth_best - scores.min(-1).values).max() < 0.05  # a swap only among near-ties
    rel = (y16 - want).norm(dim=-1) / want.norm(dim=-1)  # per token
    assert rel.max() < 0.02, rel.max()


def test_dim_head_auto():
    assert PKMConfig().resolved_dim_head(512) == 128
    assert PKMConfig().resolved_dim_head(64) == 64
    layer = ProductKeyMemory(48, PKMConfig(num_keys=8, topk=2))
    assert layer.keys.shape == (2 * 4, 48, 8)
    assert layer.values.weight.shape == (64, 48)


@pytest.mark.parametrize(
    "kw", [dict(num_keys=0), dict(topk=0), dict(topk=300), dict(heads=0), dict(dim_head=0), dict(attn_dropout=1.0)]
)
def test_config_validation(kw):
    with pytest.raises(ValueError):
        PKMConfig(**kw)


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        PKMConfig(16)  # type: ignore[misc]


def test_selection_matches_brute_force():
    """Product-key top-k equals top-k over all num_keys**2 full keys, and the output is their weighted sum."""
    layer = _layer().eval()
    cfg = layer.config
    h, K, k, dh = cfg.heads, cfg.num_keys, cfg.topk, layer.dim_head
    x = torch.randn(2, 5, 32)
    idx, w = layer.select(x)
    T = 10
    q = layer.query_norm(layer.to_queries(x.reshape(T, 32)).view(T, 2 * h, dh))  # (T, 2h, dh)
    keys = layer.keys.detach()  # (2h, dh, K)
    for head in range(h):
        s1 = q[:, head] @ keys[head]  # (T, K)
        s2 = q[:, h + head] @ keys[h + head]  # (T, K)
        full = (s1[:, :, None] + s2[:, None, :]).reshape(T, K * K)  # (T, K*K)
        ref_scores, ref_idx = full.topk(k, dim=-1)
        got_idx = idx[:, head * k : (head + 1) * k]
        assert torch.equal(got_idx.sort(-1).values, ref_idx.sort(-1).values)
        assert torch.allclose(w[:, head * k : (head + 1) * k].sum(-1), torch.ones(T))
    ref_out = (layer.values.weight[idx] * w[..., None]).sum(1).view(2, 5, 32)
    assert torch.allclose(layer(x), ref_out, atol=1e-5)


def test_gradients_reach_keys_queries_values():
    layer = _layer()
    x = torch.randn(2, 6, 32, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.keys.grad is not None and layer.keys.grad.abs().sum() > 0
    assert layer.to_queries.weight.grad is not None and layer.to_queries.weight.grad.abs().sum() > 0
    vg = layer.values.weight.grad
    assert vg is not None
    touched = (vg.abs().sum(-1) > 0).sum().item()
    # only the selected slots get a gradient
    assert 0 < touched <= 2 * 6 * layer.config.heads * layer.config.topk
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_causal_tokens_independent():
    layer = _layer().eval()
    x = torch.randn(1, 8, 32)
    y = layer(x)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(1, 3, 32)
    y2 = layer(x2)
    assert torch.allclose(y[:, :5], y2[:, :5], atol=1e-6)
    assert not torch.allclose(y[:, 5:], y2[:, 5:])


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 32)
        self.pkm1 = _layer()
        self.pkm2 = _layer()
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        return self.out(self.pkm2(self.pkm1(self.inp(x))))


def test_param_groups_split():
    net = _Net()
    groups = param_groups(net, lr=1e-3, pkm_value_lr=1e-2)
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    value_ids = {id(net.pkm1.values.weight), id(net.pkm2.values.weight)}
    assert {id(p) for p in groups[1]["params"]} == value_ids
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(net.parameters()))
    assert not value_ids & {id(p) for p in groups[0]["params"]}
    # the groups feed a real optimizer, and the value table moves by the value learning rate
    opt = torch.optim.SGD(groups, lr=0.0)
    before = net.pkm1.values.weight.detach().clone()
    net(torch.randn(2, 3, 32)).sum().backward()
    grad = net.pkm1.values.weight.grad.clone()
    opt.step()
    assert torch.allclose(net.pkm1.values.weight.detach(), before - 1e-2 * grad)


def test_param_groups_without_pkm():
    net = nn.Linear(4, 4)
    groups = param_groups(net, lr=0.1, pkm_value_lr=1.0)
    assert len(groups) == 1 and len(groups[0]["params"]) == 2


def test_learns_a_lookup():
    """A PKM layer alone can fit a random token -> vector map (the values actually train)."""
    torch.manual_seed(1)
    layer = ProductKeyMemory(16, PKMConfig(num_keys=8, topk=4, heads=2, dim_head=8))
    emb = torch.randn(20, 16)
    target = torch.randn(20, 16)
    opt = torch.optim.Adam(param_groups(layer, lr=3e-3, pkm_value_lr=3e-2))
    first = None
    for _ in range(300):
        loss = (layer(emb[None]) - target[None]).square().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first

