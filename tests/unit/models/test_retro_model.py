"""Unit tests for models/retro.py: shapes, the chunk-shift causality rule, training, prefixes, PKM."""

from __future__ import annotations

import math

import pytest
import torch

from models.retro import RETRO, RetroConfig, retro_config

C = 4  # tiny preset chunk size
K = 2  # neighbors per chunk
V = 64  # tiny preset vocabulary


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model's ops are far too small to gain from threads; on a busy machine they only wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(**overrides) -> RETRO:
    torch.manual_seed(0)
    # a larger init than the default makes every dependency visible well above float32 noise
    model = RETRO(retro_config("tiny", **{"init_std": 0.2, **overrides}))
    return model.eval()


def _batch(b: int = 2, n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, V, (b, n), generator=g)  # (b, n)
    retrieved = torch.randint(1, V, (b, n // C, K, 2 * C), generator=g)  # (b, R, k, 2c)
    return seq, retrieved


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


SAME = 1e-5  # float32 noise bound for "unchanged"
CHANGED = 1e-3  # a real dependency moves the logits by far more than this


def test_shapes_with_and_without_retrieval():
    model = _model()
    seq, retrieved = _batch()
    assert model(seq, retrieved).shape == (2, 16, V)
    assert model(seq).shape == (2, 16, V)
    assert model(seq, retrieved[:, :, 0]).shape == (2, 16, V)  # (b, R, L): one neighbor
    assert model.next_token_logits(seq[:, :7], retrieved[:, :1]).shape == (2, V)
    full = torch.cat((seq, seq[:, :1]), dim=1)  # n + 1 tokens: inputs and labels
    loss = model(full, retrieved, return_loss=True)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss2 = model(seq, retrieved, labels=full[:, 1:])
    assert torch.allclose(loss, loss2)


def test_bad_retrieved_shape_raises():
    model = _model()
    seq, retrieved = _batch()
    with pytest.raises(ValueError):
        model(seq, retrieved[:, :3])  # 16 tokens have 4 completed chunks
    with pytest.raises(ValueError):
        model(seq[:, :9], retrieved[:, :3])  # 9 tokens have 2 completed chunks
    with pytest.raises(ValueError):
        model(torch.randint(1, V, (1, 65)))  # longer than max_seq_len


@pytest.mark.parametrize("deepnet,impl", [(False, "sdpa"), (True, "sdpa"), (False, "matmul")])
def test_no_token_sees_its_future(deepnet: bool, impl: str):
    model = _model(use_deepnet=deepnet, attn_impl=impl)
    seq, retrieved = _batch(b=1)
    n, R = seq.shape[1], retrieved.shape[1]
    with torch.no_grad():
        base = model(seq, retrieved)[0]  # (n, V)
        # row p changes token p only: later tokens never change earlier logits, a token changes its own
        later = seq.repeat(n, 1)  # (n, n)
        idx = torch.arange(n)
        later[idx, idx] = (later[idx, idx] % (V - 1)) + 1
        out = model(later, retrieved.expand(n, -1, -1, -1))  # (n, n, V)
        for p in range(n):
            assert _max_diff(out[p, :p], base[:p]) < SAME, f"position < {p} saw token {p}"
            assert _max_diff(out[p, p], base[p]) > CHANGED, f"token {p} does not see itself"
        # row j changes the neighbors of chunk j only: visible from the chunk's last token, (j+1)*c - 1, on
        other = retrieved.repeat(R, 1, 1, 1)  # (R, R, k, 2c)
        g = torch.Generator().manual_seed(7)
        for j in range(R):
            other[j, j] = torch.randint(1, V, other[j, j].shape, generator=g)
        out = model(seq.expand(R, -1), other)  # (R, n, V)
        for j in range(R):
            first = (j + 1) * C - 1
            assert _max_diff(out[j, :first], base[:first]) < SAME, f"tokens before {first} saw chunk {j}"
            assert _max_diff(out[j, first], base[first]) > CHANGED, f"token {first} ignores chunk {j}"


def test_first_tokens_attend_to_nothing():
    model = _model()
    seq, retrieved = _batch()
    with torch.no_grad():
        with_r, without = model(seq, retrieved), model(seq)
    assert _max_diff(with_r[:, : C - 1], without[:, : C - 1]) < SAME
    assert _max_diff(with_r[:, C - 1:], without[:, C - 1:]) > CHANGED


def test_switching_retrieval_off_changes_logits():
    """The ablation is real: with neighbors, every token from the first chunk's last one on reads them, so
    its logits differ from those without neighbors (None) and from those with all-padding neighbors."""
    model = _model()
    seq, retrieved = _batch()
    with torch.no_grad():
        with_r = model(seq, retrieved)
        none = model(seq)
        pads = model(seq, torch.zeros_like(retrieved))
        other = model(seq, (retrieved % (V - 1)) + 1)  # other neighbor tokens
    for off in (none, pads, other):
        assert _max_diff(with_r[:, : C - 1], off[:, : C - 1]) < SAME  # nothing to read yet
        per_position = (with_r - off).abs().amax(dim=(0, 2))  # (n,)
        assert (per_position[C - 1:] > CHANGED).all(), per_position


def _zero_null_values(model: RETRO) -> None:
    """Make CCA's learned "nothing" contribute nothing: its null value vectors become zero."""
    for layer in model.decoder:
        if layer.cca is not None:
            with torch.no_grad():
                layer.cca.fn.attn.null_kv[1].zero_()


def test_padding_neighbors_are_masked_out_of_cca():
    """Padding tokens carry no information: a padding neighbor slot is the same as one neighbor fewer, a
    padding continuation the same as a neighbor of c tokens, and a chunk whose neighbors are all padding
    reads only CCA's learned null key/value (with a zero null value: exactly the no-retrieval logits)."""
    model = _model()
    seq, retrieved = _batch()
    with torch.no_grad():
        one = model(seq, retrieved[:, :, :1])  # (b, R, 1, 2c)
        padded_slot = torch.cat((retrieved[:, :, :1], torch.zeros_like(retrieved[:, :, :1])), dim=2)
        assert _max_diff(model(seq, padded_slot), one) < SAME
        no_cont = retrieved.clone()
        no_cont[..., C:] = 0
        assert _max_diff(model(seq, no_cont), model(seq, retrieved[..., :C])) < SAME
        # the pad id is what is masked: any other token in the same place is read
        assert _max_diff(model(seq, padded_slot + (padded_slot == 0)), one) > CHANGED

        pads = torch.zeros_like(retrieved)
        all_pad, none = model(seq, pads), model(seq)
        assert torch.isfinite(all_pad).all()
        assert _max_diff(all_pad[:, : C - 1], none[:, : C - 1]) < SAME
        assert _max_diff(all_pad[:, C - 1:], none[:, C - 1:]) > CHANGED  # the learned null value is added
        _zero_null_values(model)
        assert _max_diff(model(seq, pads), none) < SAME


def test_attention_impls_agree():
    seq, retrieved = _batch()
    retrieved[:, 1, 0, 5:] = 0  # some padding, so the masked paths run too
    with torch.no_grad():
        a = _model(attn_impl="sdpa")(seq, retrieved)
        b = _model(attn_impl="matmul")(seq, retrieved)
    assert _max_diff(a, b) < 1e-4


@pytest.mark.parametrize("impl", ["sdpa", "matmul"])
def test_prefix_matches_longer_sequence(impl: str):
    model = _model(attn_impl=impl)
    seq, retrieved = _batch()
    with torch.no_grad():
        full = model(seq, retrieved)  # (b, 16, V)
        for n in (1, 2, 3, 4, 5, 7, 8, 10, 13, 15):  # around and between chunk boundaries (c = 4)
            part = model(seq[:, :n], retrieved[:, : n // C])
            assert part.shape == (2, n, V)
            assert _max_diff(part, full[:, :n]) < SAME, f"prefix of {n} tokens"
            nxt = model.next_token_logits(seq[:, :n], retrieved[:, : n // C])
            assert _max_diff(nxt, full[:, n - 1]) < SAME


def _overfit(model: RETRO, steps: int, use_retrieval: bool = True) -> tuple[float, float]:
    model.train()
    seq, retrieved = _batch(n=17)
    retrieved = retrieved[:, :4]  # 16 inputs -> 4 chunks
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(seq, retrieved if use_retrieval else None, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = RETRO(retro_config("tiny"))
    first, last = _overfit(model, steps=80)
    assert last < 0.25 * first, (first, last)


def test_training_without_retrieval():
    torch.manual_seed(0)
    model = RETRO(retro_config("tiny"))
    first, last = _overfit(model, steps=40, use_retrieval=False)
    assert last < 0.6 * first, (first, last)


def _copy_batch(g: torch.Generator, b: int, vocab: int, c: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token sequences whose chunk j has one neighbor: chunk j itself and its continuation, chunk j+1.

    So every label from position c - 1 on sits in the neighbors the model may read there (perfect retrieval),
    and nothing else predicts it (the tokens are uniform)."""
    seq = torch.randint(1, vocab, (b, n + 1 + c), generator=g)  # one chunk past the end: the last continuation
    retrieved = torch.stack([seq[:, j * c: (j + 2) * c] for j in range(n // c)], dim=1)[:, :, None]  # (b, R, 1, 2c)
    return seq[:, : n + 1], retrieved


def test_copy_task_retrieval_lowers_the_loss():
    """A few dozen steps on a copy task (the neighbor holds the next chunk's text) teach CCA to copy: on fresh
    sequences the loss with the neighbors is well below the loss without them, which stays at chance."""
    vocab, c, n, steps = 32, 2, 16, 60
    torch.manual_seed(0)
    model = RETRO(retro_config("tiny", num_tokens=vocab, chunk_size=c))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        seq, retrieved = _copy_batch(g, 32, vocab, c, n)
        loss = model(seq, retrieved, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    seq, retrieved = _copy_batch(torch.Generator().manual_seed(2), 64, vocab, c, n)  # unseen sequences
    with torch.no_grad():
        with_r = model(seq, retrieved, return_loss=True).item()
        pads = model(seq, torch.zeros_like(retrieved), return_loss=True).item()
        none = model(seq, None, return_loss=True).item()
    chance = math.log(vocab - 1)  # tokens are uniform over 1..vocab-1
    assert abs(pads - chance) < 0.25 and abs(none - chance) < 0.25, (pads, none, chance)
    assert with_r < pads - 0.4 and with_r < none - 0.4, (with_r, pads, none)


def test_loss_ignores_pad_labels():
    model = _model()
    seq, retrieved = _batch(n=17)
    retrieved = retrieved[:, :4]
    padded = seq.clone()
    padded[:, -5:] = 0  # padded document tail: those labels must not count
    loss = model(padded, retrieved, return_loss=True)
    logits = model(padded[:, :-1], retrieved)
    labels = padded[:, 1:]
    keep = labels != 0
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert torch.allclose(loss, expected, atol=1e-5)


def test_rmsnorm_matches_torch():
    from models.retro import RMSNorm

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 24, generator=g, requires_grad=True)
    ours, ref = RMSNorm(24, eps=1e-6), torch.nn.RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(24, generator=g))
        ref.weight.copy_(ours.weight)
    gy = torch.randn(3, 5, 24, generator=g)
    y1, y2 = ours(x), ref(x)
    assert torch.allclose(y1, y2, atol=1e-6)
    g1 = torch.autograd.grad(y1, (x, ours.weight), gy)
    g2 = torch.autograd.grad(y2, (x, ref.weight), gy)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(x).dtype == torch.bfloat16


def test_cross_entropy_matches_torch():
    from models.retro import cross_entropy

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(150, 37, generator=g, requires_grad=True)  # 150 rows: blocks of 64 and a remainder
    labels = torch.randint(0, 37, (150,), generator=g)
    labels[::7] = 0
    ours = cross_entropy(logits, labels, 0)
    (grad_ours,) = torch.autograd.grad(ours * 3.0, logits)
    ref = torch.nn.functional.cross_entropy(logits, labels, ignore_index=0)
    (grad_ref,) = torch.autograd.grad(ref * 3.0, logits)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(grad_ours, grad_ref, atol=1e-7)
    assert cross_entropy(logits, torch.zeros_like(labels), 0).item() == 0.0  # nothing to predict


def test_bf16_autocast_close_to_float32():
    model = _model(init_std=0.02)
    seq, retrieved = _batch(n=17)
    retrieved = retrieved[:, :4]
    loss32 = model(seq, retrieved, return_loss=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = model(seq, retrieved, return_loss=True)
    loss16.backward()
    assert torch.isfinite(loss16)
    assert abs(loss16.item() - loss32.item()) < 0.05
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_pkm_replaces_feed_forward():
    from models.pkm import PKMConfig, ProductKeyMemory

    pkm = PKMConfig(num_keys=8, topk=4, heads=2, dim_head=8)
    model = _model(pkm_layers=(2,), pkm=pkm)
    pkms = [m for m in model.modules() if isinstance(m, ProductKeyMemory)]
    assert len(pkms) == 1 and model.decoder[1].ff.fn is pkms[0]
    seq, retrieved = _batch(n=17)
    retrieved = retrieved[:, :4]
    model.train()
    loss = model(seq, retrieved, return_loss=True)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pkms[0].parameters())
    # still causal with a memory layer
    model.eval()
    with torch.no_grad():
        base = model(seq[:, :16], retrieved)
        later = seq[:, :16].clone()
        later[:, 9] = (later[:, 9] % (V - 1)) + 1
        out = model(later, retrieved)
    assert _max_diff(out[:, :9], base[:, :9]) < SAME
    assert _max_diff(out[:, 9], base[:, 9]) > CHANGED
    # settings as a dict (TOML), and a default PKMConfig when only layers are named
    assert retro_config("tiny", pkm_layers=(1,), pkm={"num_keys": 8, "topk": 4}).pkm == PKMConfig(num_keys=8, topk=4)
    with pytest.raises(ValueError):
        retro_config("tiny", pkm_layers=(1,), pkm={"no_such_field": 1})
    assert len([m for m in _model(pkm_layers=(1, 3)).modules() if isinstance(m, ProductKeyMemory)]) == 2


def test_config_validation_and_presets():
    assert retro_config("readme").dec_cross_attn_layers == (3, 6, 9, 12)
    assert retro_config("readme").num_tokens == 30522
    assert retro_config("paper_172m").dec_cross_attn_layers == (6, 9, 12)
    assert retro_config("tiny", dec_cross_attn_layers=[3, 1]).dec_cross_attn_layers == (1, 3)
    bad = [
        dict(dec_cross_attn_layers=(13,)),
        dict(dec_cross_attn_layers=(0,)),
        dict(enc_cross_attn_layers=(3,), enc_depth=2),
        dict(chunk_size=0),
        dict(rotary_dim=7),
        dict(rotary_dim=128, dim_head=64),
        dict(dec_attn_dropout=1.0),
        dict(pad_id=-1),
        dict(heads=True),
        dict(pkm_layers=(2, 2)),
        dict(attn_impl="flash"),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            RetroConfig(**kw)
    with pytest.raises(ValueError):
        retro_config("nope")
    with pytest.raises(ValueError):
        retro_config("tiny", not_a_field=1)
    with pytest.raises(TypeError):
        RetroConfig(64)  # keyword-only


def test_default_attention_kernel_is_auto():
    """A config that names no kernel lets the model pick one per device ("auto"), in every attention layer."""
    assert RetroConfig().attn_impl == "auto"
    model = RETRO(retro_config("tiny"))
    impls = {m.impl for m in model.modules() if hasattr(m, "impl")}
    assert impls == {"auto"}


@pytest.mark.parametrize("impl", ["auto", "sdpa", "matmul"])
def test_attend_matches_a_softmax_reference(impl: str):
    """Every kernel choice computes softmax(q k^T / sqrt(d)) v with masked keys and the causal rule."""
    from models.retro import attend

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    mask = torch.rand(2, 5, generator=g) > 0.4
    mask[:, 0] = True  # every query keeps a key
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(8)  # (2, 3, 5, 5)
    masked = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    causal = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    want_masked = masked.softmax(-1) @ v.double()
    want_causal = causal.softmax(-1) @ v.double()
    got_masked = attend(q, k, v, key_mask=mask, impl=impl)
    got_causal = attend(q, k, v, causal=True, impl=impl)
    assert _max_diff(got_masked.double(), want_masked) < 1e-5
    assert _max_diff(got_causal.double(), want_causal) < 1e-5


def _greedy(model: RETRO, prompt: torch.Tensor, steps: int, table: torch.Tensor, cached: bool) -> list[int]:
    """Greedy decoding with "retrieval" at chunk boundaries: a completed chunk's neighbors are rows of table
    picked by the chunk's tokens (a deterministic function of the chunk, as a real index is)."""
    tokens = prompt.tolist()
    cache = model.new_cache() if cached else None
    fed = 0
    for _ in range(steps):
        n = len(tokens)
        chunks = [table[int(sum(tokens[j * C:(j + 1) * C])) % len(table)] for j in range(n // C)]
        ret = torch.stack(chunks)[None] if chunks else None  # (1, R, k, 2c)
        if cached:
            logits = model.extend(cache, torch.tensor([tokens[fed:]]), ret)
            fed = n
        else:
            logits = model.next_token_logits(torch.tensor([tokens]), ret)
        tokens.append(int(logits[0].argmax()))
    return tokens


@pytest.mark.parametrize("impl", ["sdpa", "matmul"])
def test_cached_decoding_gives_the_uncached_logits_and_tokens(impl: str):
    """extend() with a key/value cache computes one position per token, yet gives the logits of recomputing the
    whole sequence: from a one-token start or a prefill across chunk boundaries, with padded neighbors too, and
    greedy decoding picks the same tokens over several chunks of retrieval."""
    model = _model(attn_impl=impl)
    seq, retrieved = _batch(n=30)
    retrieved = torch.cat((retrieved, retrieved[:, :3]), dim=1)  # 7 chunks for 30 tokens
    retrieved[0, 2, 1, 3:] = 0  # padding: the masked paths run
    retrieved[1, 4, 1] = 0  # a neighbor slot that is all padding
    for prefill in (1, 3, 4, 9):
        cache = model.new_cache()
        got = [model.extend(cache, seq[:, :prefill], retrieved[:, : prefill // C])]
        got += [model.extend(cache, seq[:, n - 1:n], retrieved[:, : n // C]) for n in range(prefill + 1, 31)]
        want = [model.next_token_logits(seq[:, :n], retrieved[:, : n // C]) for n in range(prefill, 31)]
        assert max(_max_diff(a, b) for a, b in zip(got, want)) < SAME, f"prefill {prefill}"
        assert cache.length == 30 and cache.chunks == 7
    table = torch.randint(1, V, (16, K, 2 * C), generator=torch.Generator().manual_seed(5))
    prompt = seq[0, :6]
    assert _greedy(model, prompt, 40, table, cached=True) == _greedy(model, prompt, 40, table, cached=False)
    with pytest.raises(ValueError):
        model.extend(cache, seq[:, :64], retrieved)  # past max_seq_len


def test_compiled_blocks_match_eager_without_graph_breaks():
    """compile_blocks(): each residual block compiles to one graph (fullgraph: no host synchronisation or other
    graph break inside a block) and gives the eager loss and gradients under bf16 autocast, with padded
    neighbors. The aot_eager backend traces exactly what inductor compiles (forward and backward graphs) but
    skips code generation: inductor's C++ build of even the tiny model takes minutes on a 2-core CPU."""
    model = _model(init_std=0.02)
    model.train()
    seq, retrieved = _batch(n=17)
    retrieved = retrieved[:, :4]
    retrieved[0, 1, 1, 3:] = 0
    names = [name for name, _ in model.named_parameters()]

    def loss_and_grads():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(seq, retrieved, return_loss=True)
        return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))

    eager, eager_grads = loss_and_grads()
    model.compile_blocks(backend="aot_eager", fullgraph=True, dynamic=False)
    compiled, compiled_grads = loss_and_grads()
    assert [name for name, _ in model.named_parameters()] == names  # checkpoints keep their keys
    assert abs(compiled.item() - eager.item()) < 1e-3, (compiled, eager)
    for g1, g2 in zip(eager_grads, compiled_grads):
        assert _max_diff(g1, g2) <= 1e-2 * g1.abs().max().item() + 1e-6


def test_activation_checkpointing_gives_the_same_gradients():
    model = _model()
    model.train()
    seq, retrieved = _batch(n=17)
    retrieved = retrieved[:, :4]
    grads = []
    for on in (False, True):
        model.activation_checkpointing = on
        loss = model(seq, retrieved, return_loss=True)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    assert all(_max_diff(a, b) < SAME for a, b in zip(*grads))


def test_summed_loss_and_fused_rms_norm():
    """reduction="sum" is the mean times the label count (what the trainer weights across workers), and the
    F.rms_norm path (GPU, torch.compile) computes what the CPU kernel computes."""
    from models.retro import RMSNorm, cross_entropy, rms_norm

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(150, 37, generator=g)
    labels = torch.randint(0, 37, (150,), generator=g)
    labels[::7] = 0
    total = cross_entropy(logits, labels, 0, reduction="sum")
    assert torch.allclose(total, cross_entropy(logits, labels, 0) * (labels != 0).sum(), rtol=1e-6)
    with pytest.raises(ValueError):
        cross_entropy(logits, labels, 0, reduction="none")
    norm = RMSNorm(37, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(37, generator=g))
    assert torch.allclose(rms_norm(logits, norm.weight, 1e-6, torch.float32), norm(logits), atol=1e-6)
