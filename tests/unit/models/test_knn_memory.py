"""Unit tests for models/knn_memory.py: a per-row FIFO kNN memory checked against a brute-force reference."""

import numpy as np
import pytest
import torch

from models.knn_ivf import ListScanRowIndex
from models.knn_memory import KNNMemory, KNNMemoryConfig
from tests.unit.models.triton_setup import kernel_device  # noqa: F401  (a fixture)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared machine they can lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Reference:
    """The obvious memory: per row a list of (id, key, value), oldest first, capped at capacity."""

    def __init__(self, rows: int, capacity: int):
        self.capacity = capacity
        self.rows = [[] for _ in range(rows)]
        self.next_id = [0] * rows

    def add(self, keys, values, mask=None):
        for r in range(keys.shape[0]):
            for j in range(keys.shape[1]):
                if mask is not None and not bool(mask[r, j]):
                    continue
                self.rows[r].append((self.next_id[r], keys[r, j].clone(), values[r, j].clone()))
                self.next_id[r] += 1
            self.rows[r] = self.rows[r][-self.capacity :]

    def clear(self, rows):
        for r in rows:
            self.rows[r] = []
            self.next_id[r] = 0

    def search(self, r, q, k):
        """ids (Q, k) of the top-k entries by inner product (-1 pads), best first."""
        entries = self.rows[r]
        out = torch.full((q.shape[0], k), -1, dtype=torch.long)
        if not entries:
            return out
        keys = torch.stack([e[1] for e in entries]).float()
        ids = torch.tensor([e[0] for e in entries])
        top = (q.float() @ keys.T).topk(min(k, len(entries)), dim=-1).indices
        out[:, : top.shape[1]] = ids[top]
        return out

    def lookup(self, r, i):
        for e in self.rows[r]:
            if e[0] == i:
                return e
        return None


def _check(mem: KNNMemory, ref: Reference, q: torch.Tensor, k: int):
    res = mem.search(q, k)
    for r in range(mem.num_rows):
        want = ref.search(r, q[r], k)
        got = res.ids[r]
        assert torch.equal(got, want), f"row {r}: ids differ"
        assert torch.equal(res.mask[r], want >= 0)
        for qi in range(q.shape[1]):
            for j in range(k):
                i = int(got[qi, j])
                if i < 0:
                    assert res.keys[r, qi, j].abs().sum() == 0 and res.values[r, qi, j].abs().sum() == 0
                    continue
                e = ref.lookup(r, i)
                assert e is not None, "returned an entry that is not in the memory"
                assert torch.equal(res.keys[r, qi, j], e[1]) and torch.equal(res.values[r, qi, j], e[2])


def test_exact_matches_reference_across_eviction_and_clearing():
    torch.manual_seed(0)
    R, C, d, k = 3, 40, 8, 5
    mem = KNNMemory(R, KNNMemoryConfig(dim=d, capacity=C, backend="exact"))
    ref = Reference(R, C)
    q = torch.randn(R, 6, d)
    _check(mem, ref, q, k)  # empty memory: nothing found
    for step in range(25):
        n = [3, 7, 17, 1, 45][step % 5]  # 45 > capacity: only the last 40 stay
        keys, values = torch.randn(R, n, d), torch.randn(R, n, d)
        mask = torch.rand(R, n) > 0.3 if step % 3 == 0 else None
        mem.add(keys, values, mask)
        ref.add(keys, values, mask)
        if step % 7 == 6:
            mem.clear([step % R])
            ref.clear([step % R])
        assert list(mem.sizes()) == [len(x) for x in ref.rows]
        _check(mem, ref, q, k)


def test_fewer_entries_than_k_are_masked():
    mem = KNNMemory(2, KNNMemoryConfig(dim=4, capacity=16, backend="exact"))
    mem.add(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    res = mem.search(torch.randn(2, 5, 4), 8)
    assert res.mask.sum(-1).eq(3).all()
    assert (res.ids[~res.mask] == -1).all()
    assert res.keys.shape == (2, 5, 8, 4)


@pytest.mark.parametrize("backend", ["exact", "ivf"])
def test_query_leading_dims_are_kept(backend):
    """Queries (rows, heads, tokens, d) get, at [r, h, t], exactly the hits of the same query searched flat as
    (rows, heads * tokens, d), and those are the brute-force top-k of the row."""
    torch.manual_seed(0)
    R, H, T, d, k = 2, 3, 5, 4, 2
    mem = KNNMemory(R, KNNMemoryConfig(dim=d, capacity=64, backend=backend, faiss_min_entries=32))
    ref = Reference(R, 64)
    keys, values = torch.randn(R, 50, d), torch.randn(R, 50, d)
    mem.add(keys, values)
    ref.add(keys, values)
    assert (mem._indexes[0] is not None) == (backend == "ivf")
    q = torch.randn(R, H, T, d)
    res = mem.search(q, k)
    flat = mem.search(q.reshape(R, H * T, d), k)
    assert res.keys.shape == (R, H, T, k, d) and res.values.shape == (R, H, T, k, d)
    assert res.mask.shape == res.ids.shape == (R, H, T, k)
    assert torch.equal(res.ids, flat.ids.view(R, H, T, k))
    assert torch.equal(res.mask, flat.mask.view(R, H, T, k))
    assert torch.equal(res.keys, flat.keys.view(R, H, T, k, d))
    assert torch.equal(res.values, flat.values.view(R, H, T, k, d))
    for r in range(R):
        assert torch.equal(res.ids[r].reshape(H * T, k), ref.search(r, q[r].reshape(H * T, d), k))
    rows = torch.arange(R)[:, None, None, None]
    assert torch.equal(res.keys, keys[rows, res.ids]) and torch.equal(res.values, values[rows, res.ids])


@pytest.mark.parametrize("backend", ["exact", "ivf", "faiss"])
def test_stored_key_finds_itself_after_ten_capacities(backend):
    """Keys added long ago are evicted; the newest keys are always findable, never a stale one."""
    torch.manual_seed(1)
    R, C, d = 2, 256, 16
    cfg = KNNMemoryConfig(dim=d, capacity=C, backend=backend, faiss_min_entries=64, nprobe=64)
    mem = KNNMemory(R, cfg)
    first = torch.nn.functional.normalize(torch.randn(R, 32, d), dim=-1)
    mem.add(first, first * 2)
    res = mem.search(first, 1)
    assert torch.equal(res.ids[..., 0], torch.arange(32).expand(R, 32))
    assert torch.equal(res.values[..., 0, :], first * 2)
    last = None
    for _ in range(10 * C // 32):
        last = torch.nn.functional.normalize(torch.randn(R, 32, d), dim=-1)
        mem.add(last, last * 3)
    assert (mem.counts == 32 + 10 * C).all()
    res = mem.search(last, 1)
    assert res.mask.all()
    assert torch.equal(res.keys[..., 0, :], last)
    assert torch.equal(res.values[..., 0, :], last * 3)
    expected_ids = 32 + 10 * C - 32 + torch.arange(32)
    assert torch.equal(res.ids[..., 0], expected_ids.expand(R, 32))
    # the very first keys were evicted: whatever comes back must be live (id in the last C)
    res = mem.search(first, 4)
    assert res.mask.all()
    assert (res.ids >= 32 + 10 * C - C).all()


@pytest.mark.parametrize("how", ["indices", "bool"])
def test_clear_empties_exactly_the_chosen_rows(how):
    torch.manual_seed(2)
    R, C, d = 4, 64, 8
    mem = KNNMemory(R, KNNMemoryConfig(dim=d, capacity=C, backend="exact"))
    keys = torch.randn(R, 20, d)
    mem.add(keys, keys)
    before = mem.search(keys, 3)
    chosen = [1, 3]
    mem.clear(chosen if how == "indices" else torch.tensor([False, True, False, True]))
    assert list(mem.sizes()) == [20, 0, 20, 0]
    after = mem.search(keys, 3)
    for r in range(R):
        if r in chosen:
            assert not after.mask[r].any() and after.keys[r].abs().sum() == 0
        else:
            assert torch.equal(after.ids[r], before.ids[r]) and torch.equal(after.keys[r], before.keys[r])
    # a cleared row starts again from id 0 and finds only its new entries
    new = torch.randn(R, 5, d)
    mem.add(new, new)
    res = mem.search(new, 1)
    assert torch.equal(res.ids[1, :, 0], torch.arange(5))
    assert torch.equal(res.keys[1, :, 0], new[1])


@pytest.mark.parametrize(
    "backend,codec,storage",
    [("ivf", "flat", "float32"), ("ivf", "flat", "bfloat16"), ("faiss", "flat", "float32"), ("faiss", "sq8", "float32")],
)
def test_ivf_recall_against_exact(backend, codec, storage):
    """IVF paths vs exact search on clustered data, across eviction and a clear."""
    rng = torch.Generator().manual_seed(3)
    R, C, d, k = 2, 8192, 32, 16
    centers = torch.randn(64, d, generator=rng)

    def sample(n):
        x = centers[torch.randint(0, 64, (R, n), generator=rng)] + 0.5 * torch.randn(R, n, d, generator=rng)
        return torch.nn.functional.normalize(x, dim=-1)

    cfg = dict(dim=d, capacity=C, faiss_min_entries=2048, nprobe=8, storage_dtype=storage)
    approx = KNNMemory(R, KNNMemoryConfig(backend=backend, ivf_codec=codec, **cfg))
    exact = KNNMemory(R, KNNMemoryConfig(backend="exact", **cfg))
    for step in range(12):  # 12 * 1024 = 1.5 capacities: eviction happens
        keys = sample(1024)
        approx.add(keys, -keys)
        exact.add(keys, -keys)
        if step == 4:
            approx.clear([0])
            exact.clear([0])
    assert approx._indexes[0] is not None and approx._indexes[1] is not None
    q = sample(512)
    a, e = approx.search(q, k), exact.search(q, k)
    assert a.mask.all()
    # every IVF hit is a live entry with the right key and value
    live_lo = torch.as_tensor(approx.counts - C).clamp(min=0)[:, None, None]
    assert ((a.ids >= live_lo) & (a.ids < torch.as_tensor(approx.counts)[:, None, None])).all()
    assert torch.equal(a.values, -a.keys)
    recall = np.mean(
        [len(set(a.ids[r, i].tolist()) & set(e.ids[r, i].tolist())) / k for r in range(R) for i in range(512)]
    )
    assert recall >= 0.9, recall
    # the hits' keys are really the stored keys for those ids: same as the exact memory holds
    common = (a.ids == e.ids)
    assert torch.equal(a.keys[common], e.keys[common])


def test_auto_backend_switches_on_size():
    mem = KNNMemory(1, KNNMemoryConfig(dim=8, capacity=512, faiss_min_entries=128))
    mem.add(torch.randn(1, 100, 8), torch.randn(1, 100, 8))
    assert mem._indexes[0] is None
    mem.add(torch.randn(1, 100, 8), torch.randn(1, 100, 8))
    assert isinstance(mem._indexes[0], ListScanRowIndex)  # the numba list scan, not faiss' IVF
    mem.clear()
    assert mem._indexes[0] is None


def test_bfloat16_exact_and_storage_keep_recall():
    torch.manual_seed(4)
    d = 64
    cfg32 = KNNMemoryConfig(dim=d, capacity=4096, backend="exact")
    cfg16 = KNNMemoryConfig(dim=d, capacity=4096, backend="exact", exact_dtype="bfloat16", storage_dtype="bfloat16")
    m32, m16 = KNNMemory(2, cfg32), KNNMemory(2, cfg16)
    keys = torch.nn.functional.normalize(torch.randn(2, 4096, d), dim=-1)
    m32.add(keys, keys)
    m16.add(keys, keys)
    q = torch.nn.functional.normalize(torch.randn(2, 256, d), dim=-1)
    a, b = m32.search(q, 32).ids, m16.search(q, 32).ids
    recall = np.mean([len(set(a[r, i].tolist()) & set(b[r, i].tolist())) / 32 for r in range(2) for i in range(256)])
    assert recall >= 0.9, recall


@pytest.mark.parametrize("backend,codec", [("ivf", "flat"), ("faiss", "flat"), ("faiss", "sq8")])
def test_state_dict_round_trip(backend, codec):
    torch.manual_seed(5)
    cfg = KNNMemoryConfig(dim=8, capacity=300, faiss_min_entries=100, backend=backend, ivf_codec=codec)
    mem = KNNMemory(2, cfg)
    for _ in range(5):
        x = torch.randn(2, 97, 8)
        mem.add(x, x + 1)
    state = {k: v.clone() for k, v in mem.state_dict().items()}
    other = KNNMemory(2, cfg)
    other.load_state_dict(state)
    q = torch.randn(2, 20, 8)
    a, b = mem.search(q, 4), other.search(q, 4)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.values, b.values)
    # and both keep evolving identically
    x = torch.randn(2, 50, 8)
    mem.add(x, x)
    other.add(x, x)
    assert torch.equal(mem.search(q, 4).ids, other.search(q, 4).ids)


@pytest.mark.parametrize(
    "kw", [dict(dim=0), dict(capacity=0), dict(backend="hnsw"), dict(nprobe=0), dict(storage_dtype="int8"),
           dict(retrain_growth=1.0), dict(ivf_codec="pq"), dict(backend="ivf", ivf_codec="sq8")]
)
def test_config_validation(kw):
    with pytest.raises(ValueError):
        KNNMemoryConfig(**kw)


def test_bad_inputs():
    mem = KNNMemory(2, KNNMemoryConfig(dim=4, capacity=8))
    with pytest.raises(ValueError):
        mem.add(torch.randn(3, 2, 4), torch.randn(3, 2, 4))
    with pytest.raises(ValueError):
        mem.search(torch.randn(2, 2, 5), 1)
    with pytest.raises(ValueError):
        mem.clear([5])



def test_search_results_survive_later_searches():
    """Searches reuse their output buffers, but never one a caller still holds."""
    torch.manual_seed(6)
    mem = KNNMemory(2, KNNMemoryConfig(dim=8, capacity=64, backend="exact"))
    x = torch.randn(2, 40, 8)
    mem.add(x, x * 2)
    first = mem.search(torch.randn(2, 5, 8), 4)
    kept_keys, kept_values = first.keys.clone(), first.values.clone()
    for _ in range(3):
        mem.search(torch.randn(2, 5, 8), 4)
    assert torch.equal(first.keys, kept_keys) and torch.equal(first.values, kept_values)
    # once released, the buffer is reused (no fresh allocation per search)
    ptr = first.keys.data_ptr()
    del first
    assert mem.search(torch.randn(2, 5, 8), 4).keys.data_ptr() == ptr


def test_search_results_saved_for_backward_are_not_overwritten():
    """Retrieved keys that autograd saved for backward stay intact through the next step's search."""
    torch.manual_seed(7)
    mem = KNNMemory(1, KNNMemoryConfig(dim=8, capacity=64, backend="exact"))
    x = torch.randn(1, 40, 8)
    mem.add(x, x)
    q = torch.randn(1, 5, 8, requires_grad=True)
    found = mem.search(q, 3)
    expected_grad = found.keys.sum(-2).clone()  # d/dq of sum(q . k) over the 3 hits
    loss = torch.einsum("rqd,rqkd->", q, found.keys)
    del found  # only autograd holds the keys now
    for _ in range(2):
        mem.search(torch.randn(1, 5, 8), 3)
    loss.backward()
    assert torch.allclose(q.grad, expected_grad)


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_fused_exact_search_matches_brute_force_across_eviction_and_clearing(kernel_device, storage,  # noqa: F811
                                                                            monkeypatch):
    """Where the Triton kernel runs (GPU, or here its CPU interpreter), exact search goes through the fused
    matmul + top-k: it returns what brute force over the live entries returns, with their keys and values,
    through FIFO eviction (adds larger than the capacity, masked adds) and clearing, in float32 and
    bfloat16 storage (inputs bf16-representable, so both sides score the same numbers)."""
    import models.knn_memory as knn_memory

    calls = []
    fused = knn_memory.matmul_topk
    monkeypatch.setattr(knn_memory, "matmul_topk", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    dt = getattr(torch, storage)
    torch.manual_seed(0)
    R, C, d, k = 2, 40, 8, 5
    cfg = KNNMemoryConfig(dim=d, capacity=C, backend="exact", storage_dtype=storage, exact_dtype=storage)
    mem = KNNMemory(R, cfg, device=kernel_device)
    ref = Reference(R, C)
    q = torch.randn(R, 6, d).to(dt)
    for step in range(14):
        n = [3, 17, 45, 1, 9][step % 5]  # 45 > capacity: only the last 40 stay
        keys, values = torch.randn(R, n, d).to(dt), torch.randn(R, n, d).to(dt)
        mask = torch.rand(R, n) > 0.3 if step % 3 == 0 else None
        mem.add(keys.to(kernel_device), values.to(kernel_device), None if mask is None else mask.to(kernel_device))
        ref.add(keys, values, mask)
        if step % 6 == 5:
            mem.clear([step % R])
            ref.clear([step % R])
        res = mem.search(q.to(kernel_device), k)
        for r in range(R):
            want = ref.search(r, q[r], k)
            assert torch.equal(res.ids[r].cpu(), want), f"step {step} row {r}: ids differ"
            for qi, j in zip(*torch.nonzero(want >= 0, as_tuple=True)):
                e = ref.lookup(r, int(want[qi, j]))
                assert torch.equal(res.keys[r, qi, j].cpu(), e[1]) and torch.equal(res.values[r, qi, j].cpu(), e[2])
    assert calls, "the exact search did not use the fused top-k"
