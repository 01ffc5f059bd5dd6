"""Memorizing Transformer training data and task: every batch row streams whole documents, one after another,
in consecutive segments, and its memories are cleared when a document ends.

Why streams: the kNN and XL memories hold what a row saw in earlier segments *of the same document*, so a row
must see a document's segments in order, step after step, and forget it when the next document starts.

* Document order (a pure function of the seed): an infinite sequence D(t), t = 0, 1, ...; D(e * n + i) is
  the i-th document of epoch e, where epoch e permutes the ``docs/`` parts and the documents inside each part
  (so neighbouring streams read the same chunks part at about the same time, and no worker holds the document
  table). Held-out documents (a deterministic hash split by doc id) and documents a re-index tombstoned are
  skipped.
* Streams: the global batch has B rows; row g (rank r owns rows r*B/W .. (r+1)*B/W - 1) reads documents
  D(g), D(g + B), D(g + 2B), ... in segments of ``seq_len`` tokens (+1 for the labels; the last segment of a
  document is padded, so a segment never mixes two documents). The segment that starts a document carries
  ``new_doc`` and the one that ends it ``doc_ended``: the model clears that row's memories.
* Position: each row's (t, segment); it and the rank's memories go into the rank's checkpoint file, so a
  resumed run continues with the same documents, segments and memories.
* Evaluation: the first ``eval_docs`` held-out documents, up to ``eval_segments`` segments each, streamed with
  fresh memories (``eval_loss``), with no memory at all (``eval_loss_no_memory``), and with the XL memory but
  no kNN retrieval (``eval_loss_no_knn``).
"""
from __future__ import annotations

import json
from typing import Iterator, Optional

import numpy as np

from pipelines.artifacts.build_reader import BuildReader
from pipelines.artifacts.manifest import require_manifest
from pipelines.artifacts.parquet import read_table
from pipelines.artifacts.storage import Location, open_location
from pipelines.train.data_order import in_eval_split, seeded_rng
from pipelines.train.task import TrainTask, all_reduce_sum


class DocOrder:
    """The seeded document sequence D(t) of a build, reading one ``docs/`` part at a time."""

    def __init__(self, data: Location, reader: BuildReader, *, seed: int, eval_fraction: float, split_seed: int = 0,
                 cache_parts: int = 4):
        m = require_manifest(data, "docs", "Memorizing Transformer training")
        self.data, self.reader = data, reader
        self.parts = [p["path"] for p in m["parts"]]
        self.rows = np.asarray([int(p["rows"]) for p in m["parts"]], dtype=np.int64)
        self.n_docs = int(self.rows.sum())
        if self.n_docs == 0:
            raise ValueError(f"{data.url_of('docs')} lists no documents")
        self.seed, self.eval_fraction, self.split_seed = seed, eval_fraction, split_seed
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._cache_parts = cache_parts
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def read_part(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(doc_id, first_chunk_id, num_chunks) of docs part ``i`` (cached)."""
        if i not in self._cache:
            t = read_table(self.data, f"docs/{self.parts[i]}", columns=["doc_id", "first_chunk_id", "num_chunks"])
            if len(self._cache) >= self._cache_parts:
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = tuple(np.asarray(t.column(j).to_numpy(), np.int64) for j in range(3))  # type: ignore[assignment]
        return self._cache[i]

    def is_eval(self, doc_ids: np.ndarray) -> np.ndarray:
        return in_eval_split(doc_ids, self.eval_fraction, self.split_seed)

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        if e not in self._epochs:
            order = seeded_rng(self.seed, e, 0x6A).permutation(len(self.parts))
            starts = np.concatenate([[0], np.cumsum(self.rows[order])]).astype(np.int64)
            self._epochs = {e: (order, starts)}
        return self._epochs[e]

    def doc(self, t: int) -> tuple[int, int, int]:
        """(doc_id, first_chunk_id, num_chunks) of D(t)."""
        e, i = divmod(int(t), self.n_docs)
        order, starts = self._epoch(e)
        k = int(np.searchsorted(starts, i, side="right") - 1)
        part = int(order[k])
        ids, first, num = self.read_part(part)
        if (e, part) not in self._perms:
            if len(self._perms) >= 4 * self._cache_parts:
                self._perms.pop(next(iter(self._perms)))
            self._perms[(e, part)] = seeded_rng(self.seed, e, part, 0x6B).permutation(len(ids))
        row = int(self._perms[(e, part)][i - starts[k]])
        return int(ids[row]), int(first[row]), int(num[row])

    def is_train(self, doc: tuple[int, int, int]) -> bool:
        doc_id, first, num = doc
        return num > 0 and not bool(self.is_eval(np.asarray([doc_id]))[0]) and not bool(self.reader.dead(np.asarray([first]))[0])

    def next_train(self, t: int, stride: int, limit: int = 1_000_000) -> int:
        """The first t' = t, t + stride, ... whose document is a training document."""
        for _ in range(limit):
            if self.is_train(self.doc(t)):
                return t
            t += stride
        raise ValueError("no training documents found (is --eval-fraction too large?)")

    def eval_docs(self, limit: int) -> list[tuple[int, int, int]]:
        """The first ``limit`` held-out live documents in doc-id order (0 = all)."""
        found = []
        for p in range(len(self.parts)):
            ids, first, num = self.read_part(p)
            keep = self.is_eval(ids) & (num > 0) & ~self.reader.dead(first)
            found += [(int(a), int(b), int(c)) for a, b, c in zip(ids[keep], first[keep], num[keep])]
            if limit and len(found) >= limit:
                return found[:limit]
        return found

    def doc_tokens(self, doc: tuple[int, int, int]) -> np.ndarray:
        """A document's tokens ([CLS] ... [SEP]) from its chunks: the chunk bodies, the last continuation, no pads."""
        _, first, num = doc
        tok, _ = self.reader.gather(np.arange(first, first + num))
        c = self.reader.chunk_size
        flat = np.concatenate([tok[:, :c].reshape(-1), tok[-1:, c]])
        nz = np.nonzero(flat)[0]
        return flat[: nz[-1] + 1] if len(nz) else flat[:0]


def num_segments(n_tokens: int, seq_len: int) -> int:
    """Segments of a document of n tokens: each predicts seq_len tokens (the first token is never a label)."""
    return max(1, -(-(n_tokens - 1) // seq_len))


def segment(tokens: np.ndarray, k: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of segment k, padded with 0 past the document's end."""
    window = np.zeros(seq_len + 1, np.int64)
    piece = tokens[k * seq_len: k * seq_len + seq_len + 1]
    window[: len(piece)] = piece
    return window[:-1], window[1:]


class Streams:
    """This rank's rows of the global batch, each streaming documents in segments (see the module docstring)."""

    def __init__(self, order: DocOrder, *, seq_len: int, batch_size: int, rank: int, world: int):
        self.order, self.seq_len, self.B = order, seq_len, batch_size
        self.local = batch_size // world
        self.rows = [rank * self.local + i for i in range(self.local)]  # global row ids
        self._docs: dict[int, tuple[int, int, np.ndarray]] = {}  # row -> (t, doc_id, tokens)

    def start_position(self) -> dict:
        return {"streams": [[self.order.next_train(g, self.B), 0] for g in self.rows]}

    def _doc(self, i: int, t: int) -> tuple[int, np.ndarray]:
        """(doc_id, tokens) of row i's document D(t), loaded once per document."""
        cached = self._docs.get(i)
        if cached is None or cached[0] != t:
            doc = self.order.doc(t)
            cached = (t, doc[0], self.order.doc_tokens(doc))
            self._docs[i] = cached
        return cached[1], cached[2]

    def batches(self, position: dict) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
        state = [list(s) for s in position["streams"]]
        if len(state) != self.local:
            raise ValueError(f"the checkpoint holds {len(state)} streams for this rank, this run has {self.local} "
                             "(resume with the same --batch-size and --num-workers, or --no-resume)")
        while True:
            b = self.local
            inputs = np.zeros((b, self.seq_len), np.int64)
            labels = np.zeros((b, self.seq_len), np.int64)
            new_doc = np.zeros(b, bool)
            doc_ended = np.zeros(b, bool)
            doc_ids = np.zeros(b, np.int64)
            for i, (t, k) in enumerate(state):
                doc_ids[i], tokens = self._doc(i, t)
                inputs[i], labels[i] = segment(tokens, k, self.seq_len)
                n_seg = num_segments(len(tokens), self.seq_len)
                new_doc[i], doc_ended[i] = k == 0, k == n_seg - 1
                state[i] = [self.order.next_train(t + self.B, self.B), 0] if doc_ended[i] else [t, k + 1]
            epoch = min(s[0] for s in state) // self.order.n_docs
            yield ({"inputs": inputs, "labels": labels, "new_doc": new_doc, "doc_ended": doc_ended, "doc_id": doc_ids},
                   {"streams": [list(s) for s in state], "epoch": int(epoch)})


# ----------------------------------------------------------------------------- the training task


def memorizing_model_config(d: dict):
    """A MemorizingConfig from its JSON form."""
    from models.memorizing import MemorizingConfig
    from models.pkm import PKMConfig

    d = dict(d)
    if isinstance(d.get("pkm"), dict):
        d["pkm"] = PKMConfig(**d["pkm"])
    return MemorizingConfig(**d)


def memorizing_model_dict(preset: str, overrides: dict, *, vocab_size: int) -> dict:
    import dataclasses

    from models.memorizing import MemorizingConfig

    merged = {"num_tokens": vocab_size, **overrides}
    if merged["num_tokens"] < vocab_size:
        raise ValueError(f"num_tokens {merged['num_tokens']} is smaller than the build's vocabulary ({vocab_size})")
    cfg = MemorizingConfig.preset(preset, **merged)
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def ce_sum(logits, labels):
    import torch.nn.functional as F

    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=0, reduction="sum")


class MemorizingTask(TrainTask):
    """The Memorizing Transformer over document streams; each rank keeps its own rows' memories."""

    job = "memorizing"

    def __init__(self, cfg, rank: int, world: int, device, extra: dict):
        super().__init__(cfg, rank, world, device, extra)
        data = open_location(cfg.data)
        self.reader = BuildReader(data)
        self.order = DocOrder(data, self.reader, seed=cfg.seed, eval_fraction=cfg.eval_fraction)
        self.streams = Streams(self.order, seq_len=cfg.seq_len, batch_size=cfg.batch_size, rank=rank, world=world)
        self.model_dict = extra["model_config"]
        self.memory = None
        self._pending_memory: Optional[dict] = None

    def model_config_json(self) -> str:
        return json.dumps(self.model_dict)

    def build_model(self):
        from models.memorizing import MemorizingTransformer

        self.model = MemorizingTransformer(memorizing_model_config(self.model_dict))
        return self.model

    def _memory(self):
        if self.memory is None:
            self.memory = self.model.create_memory(self.cfg.local_batch_size, device=self.device)
            if self._pending_memory is not None:
                self.memory.load_state_dict(self._pending_memory)
                self._pending_memory = None
        return self.memory

    def start_position(self) -> dict:
        return self.streams.start_position()

    def batches(self, position: dict):
        import torch

        for batch, pos in self.streams.batches(position):
            batch["inputs"], batch["labels"] = self.compact(batch["inputs"]), self.compact(batch["labels"])
            yield {k: torch.from_numpy(v).to(self.device) for k, v in batch.items()}, pos

    def tokens_in(self, batch) -> int:
        return int((batch["labels"] != 0).sum())

    def input_tokens(self, batch) -> int:
        return int(batch["inputs"].numel())

    def loss_sum(self, model, batch):
        out = model(batch["inputs"], self._memory(), new_doc=batch["new_doc"], doc_ended=batch["doc_ended"])
        return ce_sum(out.logits, batch["labels"])

    def state_dict(self) -> dict:
        return {"memory": self._memory().state_dict()}

    def load_state_dict(self, state: dict, saved_world: int) -> None:
        if saved_world != self.world:
            raise ValueError(f"the checkpoint was written by {saved_world} workers; the memories are per worker, so "
                             f"resume with --num-workers {saved_world} (or --no-resume)")
        self._pending_memory = state.get("memory")

    def evaluate(self, model) -> dict[str, float]:
        import torch

        docs = self.order.eval_docs(self.cfg.eval_docs)[self.rank::self.world]
        sums = np.zeros(4)  # with memory, no memory, XL only, tokens
        for lo in range(0, len(docs), self.cfg.local_batch_size):
            group = [self.compact(self.order.doc_tokens(d)) for d in docs[lo: lo + self.cfg.local_batch_size]]
            n_seg = min(self.cfg.eval_segments, max(num_segments(len(t), self.cfg.seq_len) for t in group))
            memories = [model.create_memory(len(group), device=self.device) for _ in range(2)]
            for k in range(n_seg):
                pairs = [segment(t, k, self.cfg.seq_len) if k < num_segments(len(t), self.cfg.seq_len)
                         else (np.zeros(self.cfg.seq_len, np.int64),) * 2 for t in group]
                x = torch.from_numpy(np.stack([p[0] for p in pairs])).to(self.device)
                y = torch.from_numpy(np.stack([p[1] for p in pairs])).to(self.device)
                sums[0] += float(ce_sum(model(x, memories[0]).logits, y))
                sums[1] += float(ce_sum(model(x, None).logits, y))
                sums[2] += float(ce_sum(model(x, memories[1], use_knn=False).logits, y))
                sums[3] += float((y != 0).sum())
        total = all_reduce_sum(sums.tolist(), self.device)
        if total[3] == 0:
            return {}
        return {"eval_loss": total[0] / total[3], "eval_loss_no_memory": total[1] / total[3],
                "eval_loss_no_knn": total[2] / total[3], "eval_tokens": int(total[3])}
