"""A kNN memory of (key, value) pairs for the Memorizing Transformer, one memory per batch row.

Why this shape: a Memorizing Transformer streams consecutive segments of one document per batch row and
attends, from every query, to the ``k`` most similar keys that earlier segments of the *same* row left
behind. So each row owns a bounded FIFO memory: when it is full, the oldest entries leave, and when the
row's document ends, the row is emptied. Every entry a search returns must be one that is in the memory
now (the seed's memory broke this once full: it reset its index and then returned wrong or no entries).

Storage is a ring buffer per row: ``keys`` and ``values`` tensors ``(rows, capacity, dim)`` on the model's
device (separate, so that searches scan contiguous keys and return contiguous tensors) and a per-row count of entries ever added since the row was last cleared. Entry ``i`` of a row
(its id, counted from the last clear) lives in slot ``i % capacity``; the row holds ids
``[max(0, count - capacity), count)``, i.e. slots ``[0, min(count, capacity))``. Adding is a scatter
(O(n)); eviction is implicit (the slot is overwritten).

Search has two paths, chosen per row by size and device:
  * exact: on GPU (always) the fused matmul + top-k of :func:`models.topk_matmul.matmul_topk`, which
    keeps each query's top-k on chip when Triton is installed; on CPU (while a row holds fewer than
    ``faiss_min_entries`` entries) chunks of a batched matmul plus ``topk``;
  * IVF (CPU, large rows): the row's keys are clustered into lists by a coarse quantizer trained on the
    row's own keys (faiss k-means), retrained as the row grows and turns over, and a query scans only the
    entries of its ``nprobe`` nearest lists. Two implementations, in :mod:`models.knn_ivf`: a numba scan
    that goes list by list over a ``slot -> list`` map of the ring buffer (backend ``"ivf"``, the default
    when numba is installed), or a faiss ``IndexIVFFlat`` that mirrors the row's entries with their ids
    (backend ``"faiss"``). Either way a search only ever returns entries the row holds now.
State (buffers and counts) round-trips through :meth:`KNNMemory.state_dict`; faiss indexes are derived
state and are rebuilt from the buffers when needed.

Search results are gathered into buffers the memory reuses once nothing refers to them any more (not
the caller, not autograd): fresh 10-100 MB tensors per search cost more in page faults than the copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from models.knn_config import KNNMemoryConfig
from models.knn_ivf import (
    FaissRowIndex,
    ListScanRowIndex,
    faiss,
    list_scan_available,
    slot_entry_ids,
    train_centroids,
)
from models.topk_matmul import matmul_topk
from models.triton_support import kernels_run_on

__all__ = ["KNNMemoryConfig", "KNNMemory", "KNNSearchResult"]

RowSelector = Union[None, int, Sequence[int], torch.Tensor, np.ndarray]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class KNNSearchResult:
    """What a search returns: the retrieved pairs and which of them are real."""

    keys: torch.Tensor
    """(rows, queries, k, dim) retrieved keys, zero where ``mask`` is False."""

    values: torch.Tensor
    """(rows, queries, k, dim) retrieved values, zero where ``mask`` is False."""

    mask: torch.Tensor
    """(rows, queries, k) bool: True where a live entry was found."""

    ids: torch.Tensor
    """(rows, queries, k) int64 entry ids (counted from the row's last clear), -1 where ``mask`` is False."""


_RowIndex = Union[FaissRowIndex, ListScanRowIndex]


def _to_numpy_f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


class KNNMemory:
    """Per-row FIFO kNN memory: ``add``, ``search``, ``clear`` rows; state on a device; IVF for big rows.

    Args:
        num_rows: batch rows (one independent memory each).
        config: :class:`KNNMemoryConfig`.
        device: where the key/value buffers live (the model's device).
    """

    def __init__(self, num_rows: int, config: KNNMemoryConfig, device: Union[str, torch.device, None] = None):
        if num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {num_rows}")
        if config.backend in ("faiss", "ivf") and faiss is None:
            raise ValueError(f"backend={config.backend!r} needs the faiss package (pip install faiss-cpu)")
        if config.backend == "ivf" and not list_scan_available():
            raise ValueError("backend='ivf' needs the numba package (pip install numba); or use backend='faiss'")
        self.config = config
        self.num_rows = num_rows
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        dt = _DTYPES[config.storage_dtype]
        self.keys = torch.zeros(num_rows, config.capacity, config.dim, dtype=dt, device=self.device)  # (R, C, d)
        self.values = torch.zeros(num_rows, config.capacity, config.dim, dtype=dt, device=self.device)  # (R, C, d)
        # entries ever added to each row since its last clear (host-side: no device syncs to read it)
        self.counts = np.zeros(num_rows, dtype=np.int64)  # (R,)
        self._indexes: list[Optional[_RowIndex]] = [None] * num_rows
        self._result_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []  # reused search outputs

    # ------------------------------------------------------------------ bookkeeping
    @property
    def capacity(self) -> int:
        return self.config.capacity

    def sizes(self) -> np.ndarray:
        """(R,) live entries per row."""
        return np.minimum(self.counts, self.capacity)

    def _rows(self, rows: RowSelector) -> np.ndarray:
        if rows is None:
            return np.arange(self.num_rows)
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu()
            if rows.dtype == torch.bool:
                if rows.shape != (self.num_rows,):
                    raise ValueError(f"a boolean row mask must have shape ({self.num_rows},), got {tuple(rows.shape)}")
                rows = rows.nonzero().flatten()
            rows = rows.numpy()
        arr = np.atleast_1d(np.asarray(rows))
        if arr.dtype == bool:
            if arr.shape != (self.num_rows,):
                raise ValueError(f"a boolean row mask must have shape ({self.num_rows},), got {arr.shape}")
            arr = np.nonzero(arr)[0]
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_rows):
            raise ValueError(f"row indices must be in [0, {self.num_rows}), got {arr.tolist()}")
        if len(set(arr.tolist())) != arr.size:
            raise ValueError(f"row indices must be unique, got {arr.tolist()}")
        return arr

    def _use_ivf(self) -> bool:
        """Whether large rows get an IVF index (always on CPU under "auto"; when asked for, anywhere)."""
        return faiss is not None and self.config.backend != "exact" and (
            self.config.backend in ("faiss", "ivf") or self.device.type == "cpu"
        )

    def _list_scan(self) -> bool:
        """Whether IVF rows use the numba list scan (else a faiss IVF index)."""
        backend = self.config.backend
        return backend == "ivf" or (backend == "auto" and self.config.ivf_codec == "flat" and list_scan_available())

    # ------------------------------------------------------------------ mutation
    @torch.no_grad()
    def clear(self, rows: RowSelector = None) -> None:
        """Empty the chosen rows (all by default): a bool mask (R,), indices, or None."""
        idx = self._rows(rows)
        if idx.size == 0:
            return
        self.counts[idx] = 0
        for r in idx.tolist():
            self._indexes[r] = None
        # the buffers need no wiping (slots past a row's size are never read), but zero them so a
        # state_dict of a cleared row carries no stale data
        sel = torch.as_tensor(idx, device=self.device)
        self.keys.index_fill_(0, sel, 0)
        self.values.index_fill_(0, sel, 0)

    @torch.no_grad()
    def add(self, keys: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Append pairs to every row, oldest first: ``keys``/``values`` (R, n, dim).

        ``mask`` (R, n) bool keeps only the True pairs of each row (e.g. to skip padding). When a row
        gets more than ``capacity`` new pairs, only the last ``capacity`` stay (FIFO).
        """
        R, C = self.num_rows, self.capacity
        if keys.shape != values.shape or keys.dim() != 3 or keys.shape[0] != R or keys.shape[2] != self.config.dim:
            raise ValueError(
                f"keys and values must both be ({R}, n, {self.config.dim}); got {tuple(keys.shape)}, {tuple(values.shape)}"
            )
        n = keys.shape[1]
        if n == 0:
            return
        keys = keys.detach().to(self.device, self.keys.dtype)
        values = values.detach().to(self.device, self.values.dtype)
        if mask is None:
            self._add_dense(keys, values)
            return
        if mask.shape != (R, n):
            raise ValueError(f"mask must be ({R}, {n}), got {tuple(mask.shape)}")
        mask = mask.to(self.device, torch.bool)
        offsets = mask.long().cumsum(1) - 1  # (R, n) rank of each kept pair among the row's new pairs
        new_per_row = mask.sum(1).cpu().numpy().astype(np.int64)
        counts_before = torch.as_tensor(self.counts, device=self.device)  # (R,)
        total = torch.as_tensor(new_per_row, device=self.device)  # (R,)
        ids = counts_before[:, None] + offsets  # (R, n) the id each pair gets
        # a pair survives if it is among the last C new pairs of its row (older ones would be overwritten)
        survive = (offsets >= (total[:, None] - C)) & mask
        rr, cc = survive.nonzero(as_tuple=True)  # (m,), (m,)
        slots = ids[rr, cc] % C
        self.keys[rr, slots] = keys[rr, cc]
        self.values[rr, slots] = values[rr, cc]
        counts_after = self.counts + new_per_row
        if self._use_ivf():
            for r in range(R):
                if self._indexes[r] is not None and new_per_row[r] > 0:
                    sel = survive[r]
                    self._index_add(r, int(counts_after[r]), keys[r][sel], ids[r][sel].cpu().numpy())
        self.counts = counts_after
        if self._use_ivf():
            self._maybe_build_indexes()

    def _add_dense(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """``add`` without a mask: per row at most two contiguous slice writes into the ring."""
        R, C = self.num_rows, self.capacity
        n = keys.shape[1]
        m = min(n, C)  # only the last C new pairs can survive
        keys, values = keys[:, n - m :], values[:, n - m :]
        use_ivf = self._use_ivf()
        for r in range(R):
            first_id = int(self.counts[r]) + n - m  # id of keys[r, 0]
            start = first_id % C
            head = min(m, C - start)
            self.keys[r, start : start + head] = keys[r, :head]
            self.values[r, start : start + head] = values[r, :head]
            if head < m:
                self.keys[r, : m - head] = keys[r, head:]
                self.values[r, : m - head] = values[r, head:]
            self.counts[r] += n
            if use_ivf and self._indexes[r] is not None:
                self._index_add(r, int(self.counts[r]), keys[r], np.arange(first_id, first_id + m, dtype=np.int64))
        if use_ivf:
            self._maybe_build_indexes()

    def _index_add(self, r: int, count_after: int, keys: torch.Tensor, ids: np.ndarray) -> None:
        """Mirror an add into row ``r``'s IVF index (which also forgets the entries it evicted)."""
        self._indexes[r].add(_to_numpy_f32(keys), ids.astype(np.int64), self.capacity, count_after)

    def _maybe_build_indexes(self) -> None:
        """(Re)train the IVF index of rows that became large, grew, or turned over."""
        cfg = self.config
        sizes = self.sizes()
        for r in range(self.num_rows):
            size = int(sizes[r])
            if size < cfg.faiss_min_entries:
                continue
            index = self._indexes[r]
            nlist = max(1, min(cfg.full_nlist, size // cfg.train_points_per_list))
            if index is not None:
                grown = size >= cfg.retrain_growth * index.size_at_train and nlist > index.nlist
                turned = index.added_since_train >= cfg.retrain_turnover * self.capacity
                if not (grown or turned):
                    continue
            self._build_index(r, nlist)

    def _build_index(self, r: int, nlist: int, centroids: Optional[np.ndarray] = None, size_at_train: int = 0,
                     added_since_train: int = 0, sq_params: Optional[np.ndarray] = None) -> None:
        """(Re)build row ``r``'s index from its live entries, training the quantizer unless given centroids."""
        size = int(self.sizes()[r])
        count = int(self.counts[r])
        keys = _to_numpy_f32(self.keys[r, :size])  # (size, d), slot order
        if centroids is None:
            centroids = train_centroids(keys, nlist, self.config, seed=count)
            size_at_train = size
        if self._list_scan():
            index: _RowIndex = ListScanRowIndex(centroids, self.config, size_at_train, self.capacity)
        else:
            index = FaissRowIndex(centroids, self.config, size_at_train, train_keys=keys, sq_params=sq_params)
        index.add(keys, slot_entry_ids(np.arange(size, dtype=np.int64), count, self.capacity), self.capacity, count)
        index.added_since_train = added_since_train
        self._indexes[r] = index

    # ------------------------------------------------------------------ search
    @torch.no_grad()
    def search(self, queries: torch.Tensor, topk: int) -> KNNSearchResult:
        """The ``topk`` entries of each row with the largest inner product with each query.

        ``queries`` (R, ..., dim) -> result tensors (R, ..., topk[, dim]). Entries are ordered by score
        (best first); slots past what a row holds come back masked (``mask`` False, zeros, id -1).
        """
        R, d = self.num_rows, self.config.dim
        if queries.shape[0] != R or queries.shape[-1] != d:
            raise ValueError(f"queries must be ({R}, ..., {d}), got {tuple(queries.shape)}")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        lead = queries.shape[1:-1]
        q = queries.detach().reshape(R, -1, d)  # (R, Q, d)
        Q = q.shape[1]
        ids = torch.full((R, Q, topk), -1, dtype=torch.long, device=self.device)  # (R, Q, k)
        sizes = self.sizes()
        use_ivf = self._use_ivf()
        ivf_rows = [r for r in range(R) if use_ivf and self._indexes[r] is not None]
        exact_rows = [r for r in range(R) if r not in ivf_rows and sizes[r] > 0]
        if exact_rows:
            ids[exact_rows] = self._exact_search(q, exact_rows, topk)
        for r in ivf_rows:
            index = self._indexes[r]
            found = index.search(_to_numpy_f32(q[r]), topk, self._scan_keys(r, index), int(self.counts[r]))  # (Q, k)
            ids[r] = torch.from_numpy(found).to(self.device)
        # only ids a row holds now are valid (a defensive check: faiss never returns evicted ids)
        C = self.capacity
        counts = torch.as_tensor(self.counts, device=self.device)[:, None, None]  # (R, 1, 1)
        mask = (ids >= 0) & (ids >= counts - C) & (ids < counts)  # (R, Q, k)
        ids = torch.where(mask, ids, -1)
        # slot = id % C without an int64 division: ids of the current lap start at base (in slot 0)
        base = torch.as_tensor(self.counts - self.counts % C, device=self.device)[:, None, None]  # (R, 1, 1)
        slots = ids - base + C * (ids < base)
        slots = torch.where(mask, slots, 0)  # (R, Q, k)
        row_off = torch.arange(R, device=self.device)[:, None, None] * C
        flat = (slots + row_off).reshape(-1)
        buf_k, buf_v = self._result_buffers_for(flat.numel() * d)
        mk = torch.index_select(self.keys.view(R * C, d), 0, flat, out=buf_k.view(-1, d)).view(R, *lead, topk, d)
        mv = torch.index_select(self.values.view(R * C, d), 0, flat, out=buf_v.view(-1, d)).view(R, *lead, topk, d)
        mask = mask.view(R, *lead, topk)
        if not bool(mask.all()):  # zero the missing hits (only those: a masked_fill over all is slower)
            missing = (~mask).reshape(-1).nonzero().squeeze(1)
            mk.view(-1, d).index_fill_(0, missing, 0)
            mv.view(-1, d).index_fill_(0, missing, 0)
        return KNNSearchResult(keys=mk, values=mv, mask=mask, ids=ids.view(R, *lead, topk))

    def _scan_keys(self, r: int, index: _RowIndex) -> Optional[np.ndarray]:
        """Row ``r``'s ring buffer as the list scan reads it (float32, or bfloat16 bits as uint16);
        None for a faiss index, which holds its own copies."""
        if not index.reads_ring_buffer:
            return None
        keys = self.keys[r].detach().cpu()
        if keys.dtype == torch.bfloat16:
            return keys.view(torch.int16).numpy().view(np.uint16)
        return _to_numpy_f32(keys)  # float32: a view; float16: a widened copy

    def _result_buffers_for(self, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A (keys, values) pair of flat output buffers of ``numel`` elements that nothing else refers to.

        Fresh tensors of this size cost page faults on every search; reusing a buffer is safe only when
        no view of it is alive (a caller's result, or a tensor autograd saved for backward), which the
        storage's use count tells: 1 for the buffer itself, plus 1 for the temporary storage handle.
        At most two pairs are kept: in training, a step's search finds the previous step's pair free
        (its backward is done), and one more covers a result that is still held.
        """
        use_count = getattr(torch._C, "_storage_Use_Count", None)

        def free(t: torch.Tensor) -> bool:
            return use_count is not None and use_count(t.untyped_storage()._cdata) <= 2

        for pair in self._result_buffers:
            if pair[0].numel() == numel and free(pair[0]) and free(pair[1]):
                return pair
        pair = (torch.empty(numel, dtype=self.keys.dtype, device=self.device),
                torch.empty(numel, dtype=self.values.dtype, device=self.device))
        self._result_buffers = [p for p in self._result_buffers if p[0].numel() == numel][-1:] + [pair]
        return pair

    def _exact_search(self, q: torch.Tensor, rows: list[int], topk: int) -> torch.Tensor:
        """Brute force over the filled slots of ``rows``: returns ids (len(rows), Q, topk), -1 if none."""
        cfg = self.config
        sizes = self.sizes()[rows]
        n = int(sizes.max())  # slots [0, n) hold every live entry of these rows
        R_, Q = len(rows), q.shape[1]
        k = min(topk, n)
        dt = _DTYPES[cfg.exact_dtype]
        rows_t = torch.as_tensor(rows, device=self.device)
        if R_ == self.num_rows:
            keys = self.keys[:, :n].to(dt)  # (R, n, d)
        else:
            keys = self.keys[rows_t, :n].to(dt)  # (R', n, d)
        qq = q[rows_t].to(dt)  # (R', Q, d)
        size_t = torch.as_tensor(sizes, device=self.device)  # (R',)
        if kernels_run_on(self.device):  # GPU (with Triton): the fused kernel, no (Q x n) score matrix
            found = matmul_topk(qq, keys, k, key_count=size_t)
            out_slots, out_valid = found.ids, found.ids >= 0  # (R', Q, k) each
        else:  # CPU: chunks of bmm + topk (faster here than the blockwise reference merge)
            out_slots, out_valid = self._chunked_topk(qq, keys, size_t, k)
        C = self.capacity
        counts = self.counts[rows]
        # id stored in slot s: base + s in the current lap (s < count % C), base - C + s from the last lap
        base = torch.as_tensor(counts - counts % C, device=self.device)[:, None, None]  # (R', 1, 1)
        wrap = torch.as_tensor(counts % C, device=self.device)[:, None, None]
        slot_ids = base + out_slots - C * (out_slots >= wrap)  # as slot_entry_ids, on the device
        res = torch.where(out_valid, slot_ids, torch.full_like(slot_ids, -1))
        if k < topk:
            pad = torch.full((R_, Q, topk - k), -1, dtype=torch.long, device=self.device)
            res = torch.cat([res, pad], dim=-1)
        return res

    def _chunked_topk(self, qq: torch.Tensor, keys: torch.Tensor, size_t: torch.Tensor, k: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots (R', Q, k) of the top-k filled slots by bmm + topk over query chunks, and which are valid."""
        R_, Q = qq.shape[0], qq.shape[1]
        n = keys.shape[1]
        empty = torch.arange(n, device=self.device)[None, None, :] >= size_t[:, None, None]  # (R', 1, n)
        chunk = max(1, self.config.exact_chunk_elems // max(1, n))
        out_slots = torch.empty(R_, Q, k, dtype=torch.long, device=self.device)
        out_valid = torch.empty(R_, Q, k, dtype=torch.bool, device=self.device)
        for s in range(0, Q, chunk):
            scores = torch.bmm(qq[:, s : s + chunk], keys.transpose(1, 2))  # (R', q, n)
            scores.masked_fill_(empty, float("-inf"))
            top, slot = scores.topk(k, dim=-1)  # (R', q, k)
            out_slots[:, s : s + chunk] = slot
            out_valid[:, s : s + chunk] = top > float("-inf")
        return out_slots, out_valid

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that fully describe the memory: the ring buffers, the counts and, for rows with an IVF
        index, its centroids and training bookkeeping (the index itself is rebuilt from these, so a
        restored memory answers searches exactly as the saved one did)."""
        state = {"keys": self.keys, "values": self.values, "counts": torch.from_numpy(self.counts.copy())}
        for r, index in enumerate(self._indexes):
            if index is not None:
                state[f"ivf.{r}.centroids"] = torch.from_numpy(index.centroids())
                state[f"ivf.{r}.train_info"] = torch.tensor([index.size_at_train, index.added_since_train])
                sq = index.sq_params()
                if sq is not None:
                    state[f"ivf.{r}.sq"] = torch.from_numpy(sq)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a :meth:`state_dict` (same rows, capacity and dim)."""
        if tuple(state["keys"].shape) != tuple(self.keys.shape):
            raise ValueError(f"state keys {tuple(state['keys'].shape)} do not fit memory {tuple(self.keys.shape)}")
        self.keys.copy_(state["keys"])
        self.values.copy_(state["values"])
        self.counts = state["counts"].cpu().numpy().astype(np.int64).copy()
        self._indexes = [None] * self.num_rows
        if self._use_ivf():
            for r in range(self.num_rows):
                centroids = state.get(f"ivf.{r}.centroids")
                sq = state.get(f"ivf.{r}.sq")
                if self.config.ivf_codec == "sq8" and sq is None:
                    centroids = None  # saved with another codec: retrain
                if centroids is not None and centroids.shape[1] == self.config.dim:
                    size_at_train, added = (int(v) for v in state[f"ivf.{r}.train_info"].tolist())
                    self._build_index(r, centroids.shape[0], centroids.numpy(), size_at_train, added,
                                      None if sq is None else sq.numpy())
            self._maybe_build_indexes()

    def to(self, device: Union[str, torch.device]) -> KNNMemory:
        """Move the buffers (in place) and return self."""
        self.device = torch.device(device)
        self.keys = self.keys.to(self.device)
        self.values = self.values.to(self.device)
        if not self._use_ivf():
            self._indexes = [None] * self.num_rows
        else:
            self._maybe_build_indexes()
        return self
