"""Unit tests for models/memorizing.py (Memorizing Transformer with XL and kNN memories)."""

import io

import pytest
import torch

from models.memorizing import MemorizingConfig, MemorizingTransformer, T5RelativePositionBias
from models.pkm import ProductKeyMemory, param_groups


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared machine they can lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed: int = 0, **overrides) -> MemorizingTransformer:
    torch.manual_seed(seed)
    return MemorizingTransformer(MemorizingConfig.preset("tiny", **overrides)).eval()


def _segments(num: int, b: int = 2, n: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 256, (b, n), generator=g) for _ in range(num)]


@torch.no_grad()
def _stream(model, memory, segs, **kw):
    return [model(s, memory, **kw).logits for s in segs]


@pytest.mark.parametrize("with_memory", [False, True])
@pytest.mark.parametrize("grad", [False, True])  # with grad: the fused training attention; without: SDPA
def test_causal_later_tokens_do_not_change_earlier_logits(with_memory, grad):
    model = _model()
    segs = _segments(4)
    t = 9
    changed = segs[-1].clone()
    changed[:, t:] = torch.randint(1, 256, changed[:, t:].shape, generator=torch.Generator().manual_seed(7))
    outs = []
    for last in (segs[-1], changed):
        memory = model.create_memory(2) if with_memory else None
        if with_memory:  # fill XL and kNN memories first, so every path is exercised
            _stream(model, memory, segs[:-1])
            assert memory.knn[0].sizes().min() > 0
        with torch.set_grad_enabled(grad):
            outs.append(model(last, memory).logits.detach())
    assert torch.allclose(outs[0][:, :t], outs[1][:, :t], atol=1e-5)
    assert not torch.allclose(outs[0][:, t:], outs[1][:, t:], atol=1e-3)


def spy_searches(memory) -> list[int]:
    """Count the searches of each kNN memory of a MemoryState (the real search still runs)."""
    counts = [0] * len(memory.knn)
    for i, knn in enumerate(memory.knn):
        def search(queries, topk, _i=i, _real=knn.search):
            counts[_i] += 1
            return _real(queries, topk)
        knn.search = search
    return counts


def test_add_to_memory_false_still_retrieves_but_stores_nothing():
    """add_to_memory=False searches the kNN memory as usual (same logits as a normal call: a segment never
    retrieves its own pairs) but leaves it unchanged, so the next segment sees the old memory."""
    model = _model()
    segs = _segments(5)
    frozen, normal = model.create_memory(2), model.create_memory(2)
    with torch.no_grad():
        _stream(model, frozen, segs[:3])
        _stream(model, normal, segs[:3])
        sizes = frozen.knn[0].sizes().copy()
        searches = spy_searches(frozen)
        a = model(segs[3], frozen, add_to_memory=False).logits
        b = model(segs[3], normal).logits
        assert searches == [1] and (frozen.knn[0].sizes() == sizes).all()
        assert (normal.knn[0].sizes() > sizes).all()
        assert torch.allclose(a, b, atol=1e-6)
        a, b = model(segs[4], frozen).logits, model(segs[4], normal).logits
    assert (a - b).abs().amax() > 1e-3  # the pairs it did not store are missing now


def test_knn_off_searches_nothing_and_equals_an_empty_knn_memory():
    """use_knn=False (eval_loss_no_knn) never searches the kNN memory and gives exactly the logits of the same
    XL memory with an empty kNN memory, while what kNN retrieves does change the logits; memory=None
    (eval_loss_no_memory) differs again, because the XL memory is gone too."""
    model = _model()
    segs = _segments(4)
    filled = model.create_memory(2)
    with torch.no_grad():
        _stream(model, filled, segs[:-1])
    assert filled.knn[0].sizes().min() > 0
    state = {k: v.clone() for k, v in filled.state_dict().items()}

    def restored(empty_knn: bool = False):
        memory = model.create_memory(2)
        memory.load_state_dict(state)
        if empty_knn:
            for knn in memory.knn:
                knn.clear()
        return memory

    on_memory, off_memory = restored(), restored()
    on_searches, off_searches = spy_searches(on_memory), spy_searches(off_memory)
    with torch.no_grad():
        on = model(segs[-1], on_memory).logits
        off = model(segs[-1], off_memory, use_knn=False).logits
        empty = model(segs[-1], restored(empty_knn=True)).logits
        none = model(segs[-1], None).logits
    assert on_searches == [1] and off_searches == [0]
    assert (off_memory.knn[0].sizes() == filled.knn[0].sizes()).all()  # nor added to
    assert torch.allclose(off, empty, atol=1e-5)
    assert (on - off).abs().amax() > 1e-3
    assert (off - none).abs().amax() > 1e-3
    assert (on - none).abs().amax() > 1e-3


def test_knn_memory_receives_pairs_leaving_the_xl_window():
    model = _model()  # tiny: XL window 8 on layers (1, 2), memorizing layer 2, segments of 16
    memory = model.create_memory(2)
    counts = []
    with torch.no_grad():
        for s in _segments(3):
            model(s, memory)
            counts.append(int(memory.knn[0].counts[0]))
    assert counts == [8, 24, 40]  # 16 - 8, then 8 + 16 - 8 per segment
    assert memory.xl[0].shape == (2, 8, 2, 16) and memory.xl_valid[0].all()
    # stored keys are unit vectors (cosine-similarity attention)
    norms = memory.knn[0].keys[0, :40].float().norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = MemorizingTransformer(MemorizingConfig.preset("tiny")).train()
    tokens = torch.randint(1, 256, (2, 17))
    x, y = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(120):
        loss = model(x, None, labels=y).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5.0 and loss.item() < 0.5, (first, loss.item())


def test_training_steps_with_memory_and_pkm():
    torch.manual_seed(0)
    model = MemorizingTransformer(MemorizingConfig.preset("tiny", pkm_layers=(3,))).train()
    assert isinstance(model.ffs[2], ProductKeyMemory)
    groups = param_groups(model, lr=1e-3, pkm_value_lr=1e-2)
    assert len(groups) == 2 and groups[1]["params"][0] is model.ffs[2].values.weight
    opt = torch.optim.Adam(groups)
    memory = model.create_memory(2)
    for s in _segments(4, seed=3):
        out = model(s[:, :-1], memory, labels=s[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        assert model.ffs[2].values.weight.grad.abs().sum() > 0
        assert model.attns[1].scale.grad is not None and model.attns[1].to_q.weight.grad.abs().sum() > 0
        opt.step()
    assert torch.isfinite(out.loss)


def test_pad_labels_are_ignored():
    model = _model()
    x = _segments(1)[0]
    y = x.clone()
    y[:, 8:] = 0  # pad_id
    out = model(x, None, labels=y)
    logits = out.logits[:, :8].reshape(-1, 256)
    want = torch.nn.functional.cross_entropy(logits, y[:, :8].reshape(-1))
    assert torch.allclose(out.loss, want, atol=1e-6)


@pytest.mark.parametrize("when", ["doc_ended", "new_doc"])
def test_clearing_a_row_makes_it_start_afresh(when):
    """After its document ends, a row behaves exactly like a row with a brand-new memory; others don't."""
    model = _model()
    segs = _segments(4)
    memory = model.create_memory(2)
    ended = torch.tensor([True, False])
    with torch.no_grad():
        _stream(model, memory, segs[:2])
        if when == "doc_ended":
            model(segs[2], memory, doc_ended=ended)
            assert memory.knn[0].sizes()[0] == 0 and memory.knn[0].sizes()[1] > 0
            assert not memory.xl_valid[0][0].any() and memory.xl_valid[0][1].all()
            got = model(segs[3], memory).logits
        else:
            model(segs[2], memory)
            got = model(segs[3], memory, new_doc=ended).logits
        fresh = model(segs[3], model.create_memory(2)).logits
        kept = model.create_memory(2)
        _stream(model, kept, segs[:3])
        uncleared = model(segs[3], kept).logits
    assert torch.allclose(got[0], fresh[0], atol=1e-5)  # row 0 forgot everything
    assert torch.allclose(got[1], uncleared[1], atol=1e-5)  # row 1 kept its memory
    assert not torch.allclose(got[1], fresh[1], atol=1e-4)


@pytest.mark.parametrize("backend", ["exact", "ivf", "faiss"])
def test_state_dict_round_trip_gives_identical_logits(backend):
    kw = dict(knn_backend=backend, knn_faiss_min_entries=16, max_knn_memories=48)
    model = _model(**kw)
    segs = _segments(6)
    memory = model.create_memory(2)
    with torch.no_grad():
        _stream(model, memory, segs[:4])  # 8 + 3*16 = 56 > 48 pairs: the memory has wrapped
    if backend != "exact":
        assert memory.knn[0]._indexes[0] is not None
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "memory": memory.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    restored = MemorizingTransformer(MemorizingConfig.preset("tiny", **kw)).eval()  # other random init
    restored.load_state_dict(ckpt["model"])
    memory2 = restored.create_memory(2)
    memory2.load_state_dict(ckpt["memory"])
    a = _stream(model, memory, segs[4:])
    b = _stream(restored, memory2, segs[4:])
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # a memory cleared instead of restored gives other logits (so the check above means something)
    memory3 = restored.create_memory(2)
    with torch.no_grad():
        c = restored(segs[4], memory3).logits
    assert not torch.allclose(a[0], c, atol=1e-4)


def _stream_logits(segs, autocast: bool = False, **overrides) -> tuple[list[torch.Tensor], list[float], object]:
    """Logits and losses of streaming segs through a fresh memory (same weights for any memory settings)."""
    model = _model(**overrides)
    memory = model.create_memory(segs[0].shape[0])
    logits, losses = [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for s in segs:
            out = model(s, memory, labels=s)
            logits.append(out.logits.float())
            losses.append(out.loss.item())
    return logits, losses, memory


@pytest.mark.parametrize("backend", ["ivf", "faiss"])
def test_ivf_backend_scanning_every_list_gives_the_exact_logits(backend):
    """With every IVF list probed (nprobe >= lists; small rows are scanned whole anyway), the IVF backends
    retrieve what exact search retrieves, across index builds and retraining: identical logits."""
    segs = _segments(6, n=32)
    kw = dict(max_knn_memories=256, knn_faiss_min_entries=32, knn_nprobe=64)
    exact, _, _ = _stream_logits(segs, knn_backend="exact", **kw)
    ivf, _, memory = _stream_logits(segs, knn_backend=backend, **kw)
    index = memory.knn[0]._indexes[0]
    assert index is not None and index.nlist > 1  # searches really went through a multi-list IVF index
    for step, (a, b) in enumerate(zip(exact, ivf)):
        assert torch.allclose(a, b, atol=1e-5), f"segment {step}"


def test_bf16_autocast_close_to_float32():
    """Under bf16 autocast with bf16 kNN storage the streamed logits stay within bf16 error of float32."""
    segs = _segments(6)
    ref, ref_losses, _ = _stream_logits(segs, max_knn_memories=128)
    bf16, losses, memory = _stream_logits(segs, autocast=True, max_knn_memories=128, knn_storage_dtype="bfloat16")
    assert memory.knn[0].keys.dtype == torch.bfloat16 and memory.knn[0].sizes().min() > 0
    for step, (a, b) in enumerate(zip(ref, bf16)):
        assert (a - b).norm() / a.norm() < 0.02, f"segment {step}"
    assert max(abs(a - b) for a, b in zip(ref_losses, losses)) < 0.01


def test_relative_position_bias_counts_xl_positions():
    rel = T5RelativePositionBias(heads=1, scale=1.0, num_buckets=8, max_distance=32)
    with torch.no_grad():
        rel.relative_attention_bias.weight.copy_(torch.arange(8.0)[:, None])
    bias = rel(2, 6, torch.device("cpu"))[0, 0]  # the 2 queries are the last 2 of 6 key positions
    assert bias[0].tolist() == [4.0, 3.0, 2.0, 1.0, 0.0, 0.0]  # distances 4..0; the future key shares bucket 0
    assert bias[1].tolist() == [4.0, 4.0, 3.0, 2.0, 1.0, 0.0]  # distances 5 and 4 share the first log bucket
    far = rel(1, 100, torch.device("cpu"))[0, 0, 0]
    assert far[0] == 7.0 and far[-1] == 0.0  # distance 99 > max_distance: last bucket


def test_presets_and_validation():
    readme = MemorizingConfig.preset("readme")
    assert (readme.dim, readme.depth, readme.memorizing_layers, readme.max_knn_memories) == (512, 8, (4, 5), 65536)
    assert (readme.num_retrieved_memories, readme.xl_memory_layers, readme.xl_max_memories) == (32, (2, 3, 4, 5), 512)
    assert readme.num_tokens == 256 and readme.knn_memory_config().dim == 64
    with pytest.raises(ValueError):
        MemorizingConfig.preset("huge")
    with pytest.raises(ValueError):
        MemorizingConfig.preset("tiny", not_a_field=1)
    for bad in (dict(memorizing_layers=(0,)), dict(depth=2, memorizing_layers=(3,)), dict(xl_max_memories=-1),
                dict(attn_dropout=1.5), dict(knn_backend="annoy"), dict(pkm_layers=(1, 1))):
        with pytest.raises(ValueError):
            MemorizingConfig(**bad)
    with pytest.raises(TypeError):
        MemorizingConfig(256)  # type: ignore[misc]
    model = _model()
    with pytest.raises(ValueError):
        model(torch.zeros(3, 4, dtype=torch.long), model.create_memory(2))


@pytest.mark.parametrize("knn", [False, True])
def test_fused_attention_matches_reference(knn):
    """The fused attention (with the memory merged via log-sum-exp) equals one plain softmax, grads too."""
    from models.knn_memory import KNNMemory, KNNMemoryConfig
    from models.memorizing import Attention

    torch.manual_seed(0)
    b, n, L, dim, h, d = 2, 6, 4, 16, 2, 8
    attn = Attention(dim, h, d, 0.0, knn=knn, num_retrieved=3)
    mem = None
    if knn:
        mem = KNNMemory(b, KNNMemoryConfig(dim=d, capacity=32, backend="exact"))
        keys = torch.nn.functional.normalize(torch.randn(b, 5, d), dim=-1)
        mem.add(keys, torch.randn(b, 5, d))
        mem.clear([1])  # row 1 retrieves nothing: its memory scores are all masked
    x = torch.randn(b, n, dim)
    xl = torch.randn(b, L, 2, d)
    table = torch.randn(1, h, n, L + n, requires_grad=True)
    causal = torch.ones(n, L + n, dtype=torch.bool).triu(L + 1)
    results = []
    for reference in (False, True):
        attn.zero_grad()
        xx = x.clone().requires_grad_()
        bias = table.masked_fill(causal, float("-inf"))
        out, _ = attn(xx, bias, xl, mem, reference=reference)
        (out * torch.linspace(-1, 1, dim)).sum().backward()
        grads = [xx.grad, table.grad.clone()] + [p.grad.clone() for p in attn.parameters()]
        results.append((out.detach(), grads))
        table.grad = None
    (o1, g1), (o2, g2) = results
    assert torch.allclose(o1, o2, atol=1e-5)
    for a, c in zip(g1, g2):
        assert torch.allclose(a, c, rtol=1e-3, atol=1e-5)
    assert g1[1].abs().sum() > 0  # the relative bias learns


def test_relative_position_bias_matches_pairwise_lookup():
    rel = T5RelativePositionBias(heads=3, scale=2.0, num_buckets=32, max_distance=128)
    n, S = 7, 40
    got = rel(n, S, torch.device("cpu"))
    q_pos = torch.arange(S - n, S)
    offsets = torch.arange(S)[None, :] - q_pos[:, None]  # (n, S)
    want = rel.relative_attention_bias(rel.bucket(offsets)).permute(2, 0, 1).unsqueeze(0) * 2.0
    assert torch.equal(got, want)
