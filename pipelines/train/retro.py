"""RETRO training samples from a build: a distributed join of ``seqs/``, ``neighbors/`` and ``chunks/`` on Ray Data.

A sample is the ``seq_len + 1`` tokens from a sequence start, and for each of its ``R = seq_len / c`` chunks the
``k`` neighbors (``neighbors/`` of the version ``LATEST`` names) as ``2c`` tokens each: the neighbor chunk, then
its continuation chunk (the next chunk id) when that chunk belongs to the same document, else padding (0).
Tokens past the end of the sequence's own document are padding (the loss ignores them), and so are the
neighbors of those chunks. A build sequence of ``S`` tokens gives ``S / seq_len`` samples (one when
``seq_len`` is the build's: then every sample starts at a ``seqs/`` entry).

The join never puts the chunk table on one worker:

1. requests (a task per seqs part): read the part, the contiguous chunk and neighbor rows its sequences
   cover, and emit one request per (sample, chunk, neighbor, role): the neighbor chunk (role 0) and its
   continuation (role 1), keyed by the chunks part that owns the wanted id. One heartbeat row per seqs
   part (owner -1) makes sure every part reaches step 3, even one without a single neighbor.
2. answers (``groupby(owner)``): each group loads one chunks part and answers its requests with
   (document id, c tokens).
3. samples (``groupby(seq_part)``): each group rebuilds its part's sample layout, places the answers,
   applies the continuation rule and writes one deterministic part under ``--out/retro_samples/<fingerprint>/``.

A task's memory is bounded by one part's requests or answers. The samples are written once per
(build, neighbors version, seq_len, neighbors used, split) fingerprint and reused by later runs and resumes.
:class:`RetroSamples` reads them back in a seeded order with a data position (see :mod:`pipelines.train.loop`).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from pipelines.artifacts.build_reader import BuildReader
from pipelines.artifacts.manifest import part_name, read_manifest, require_manifest, write_manifest
from pipelines.artifacts.parquet import read_table, write_table
from pipelines.artifacts.storage import Location, open_location
from pipelines.artifacts.versions import NeighborsReader, resolve_latest
from pipelines.train.data_order import fingerprint, in_eval_split, seeded_rng
from pipelines.train.task import TrainTask, all_reduce_sum

FOLDER = "retro_samples"
FORMAT = 1
SAMPLE_SCHEMA = pa.schema([("start", pa.int64()), ("eval", pa.bool_()), ("tokens", pa.list_(pa.int32())),
                           ("retrieved", pa.list_(pa.int32()))])


@dataclass(frozen=True)
class SampleSpec:
    """Everything that shapes the samples (and so their fingerprint)."""

    data_url: str
    neighbors_version: str
    seq_len: int
    num_neighbors: int
    eval_fraction: float
    split_seed: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# ----------------------------------------------------------------------------- pure functions over one part


def continuation_rule(nb_doc: np.ndarray, next_doc: np.ndarray, next_tokens: np.ndarray) -> np.ndarray:
    """The continuation chunk's tokens where it lies in the neighbor's document, zeros elsewhere."""
    return np.where((nb_doc == next_doc)[..., None], next_tokens, 0).astype(np.int32)


def part_layout(reader: BuildReader, data: Location, seq_part: int, seq_len: int) -> tuple[np.ndarray, np.ndarray,
                                                                                           np.ndarray, np.ndarray]:
    """(starts (n,), chunk ids (n, R), real (n, R) bool, chunk tokens (n, R, c+1)) of one seqs part's samples.

    A chunk is real when it belongs to the document of the sample's first chunk (a prefix of the R chunks)."""
    c = reader.chunk_size
    R, R_build = seq_len // c, reader.seq_len // c
    seqs = read_table(data, f"seqs/{part_name(seq_part)}", columns=["seq_start"]).column("seq_start").to_numpy()
    seqs = np.asarray(seqs, dtype=np.int64)
    if len(seqs) == 0:
        empty = np.zeros((0, R), np.int64)
        return np.zeros(0, np.int64), empty, empty.astype(bool), np.zeros((0, R, c + 1), np.int32)
    lo, hi = int(seqs.min()), int(min(reader.n_chunks, seqs.max() + R_build))
    tokens, doc = reader.gather(np.arange(lo, hi))

    def doc_of(ids: np.ndarray) -> np.ndarray:
        inside = ids < hi
        return np.where(inside, doc[np.clip(ids - lo, 0, hi - lo - 1)], -1)

    starts = (seqs[:, None] + np.arange(R_build // R, dtype=np.int64)[None, :] * R).reshape(-1)
    owner_doc = np.repeat(doc_of(seqs), R_build // R)
    keep = (starts < hi) & (doc_of(starts) == owner_doc)
    keep[keep] = ~reader.dead(starts[keep])  # documents a re-index removed
    starts = starts[keep]
    ids = starts[:, None] + np.arange(R, dtype=np.int64)[None, :]  # (n, R)
    real = (ids < hi) & (doc_of(ids) == doc_of(starts)[:, None])
    chunk_tokens = np.where(real[..., None], tokens[np.clip(ids - lo, 0, hi - lo - 1)], 0).astype(np.int32)
    return starts, ids, real, chunk_tokens


def sequence_tokens(chunk_tokens: np.ndarray, real: np.ndarray) -> np.ndarray:
    """(n, R, c+1) chunk rows -> (n, R*c + 1) sample tokens: the chunk bodies, then the last real chunk's
    continuation token (so the last label of a sequence is the token after it, or padding at a document's end)."""
    n, R, c1 = chunk_tokens.shape
    c = c1 - 1
    out = np.zeros((n, R * c + 1), np.int32)
    out[:, : R * c] = chunk_tokens[:, :, :c].reshape(n, R * c)
    n_real = real.sum(axis=1)
    rows = np.nonzero(n_real > 0)[0]
    last = n_real[rows] - 1
    out[rows, (last + 1) * c] = chunk_tokens[rows, last, c]
    return out


def part_requests(data_url: str, seq_part: int, spec: SampleSpec) -> dict[str, np.ndarray]:
    """Step 1 for one seqs part: neighbor-token requests keyed by owning chunks part, plus a heartbeat."""
    data = open_location(data_url)
    reader = BuildReader(data)
    starts, ids, real, _ = part_layout(reader, data, seq_part, spec.seq_len)
    n, R = ids.shape
    k = spec.num_neighbors
    nb = np.full((n, R, k), -1, np.int64)
    if real.any():
        found, _ = NeighborsReader(data, spec.neighbors_version).lookup(ids[real])
        nb[real] = found[:, :k]
    sample, pos, slot = np.nonzero(nb >= 0)
    want0 = nb[sample, pos, slot]
    has_next = want0 + 1 < reader.n_chunks
    cols = {
        "sample": np.concatenate([sample, sample[has_next], [-1]]),
        "pos": np.concatenate([pos, pos[has_next], [-1]]),
        "slot": np.concatenate([slot, slot[has_next], [-1]]),
        "role": np.concatenate([np.zeros(len(want0), np.int64), np.ones(int(has_next.sum()), np.int64), [-1]]),
        "want": np.concatenate([want0, want0[has_next] + 1, [-1]]),
    }
    owner = reader.part_of(cols["want"])
    owner[-1] = -1  # the heartbeat
    cols["owner"] = owner.astype(np.int64)
    cols["seq_part"] = np.full(len(owner), seq_part, np.int64)
    return {k_: np.asarray(v, dtype=np.int64) for k_, v in cols.items()}


def answer_requests(data_url: str, group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Step 2 for one owner: (doc id, c tokens) of every wanted chunk; heartbeats pass through."""
    reader = BuildReader(open_location(data_url), cache_parts=1)
    c = reader.chunk_size
    owner = int(group["owner"][0])
    m = len(group["want"])
    tokens = np.zeros((m, c), np.int32)
    doc = np.full(m, -1, np.int64)
    if owner >= 0:
        t, d = reader.read_part(owner)
        local = group["want"] - reader.offsets[owner]
        tokens, doc = t[local, :c], d[local]
    return {"seq_part": group["seq_part"], "sample": group["sample"], "pos": group["pos"], "slot": group["slot"],
            "role": group["role"], "doc": doc, "tokens": tokens}


def assemble_part(data_url: str, seq_part: int, answers: dict[str, np.ndarray], spec: SampleSpec) -> pa.Table:
    """Step 3 for one seqs part: the sample table (sorted by start, as part_layout gives them)."""
    data = open_location(data_url)
    reader = BuildReader(data)
    c, k = reader.chunk_size, spec.num_neighbors
    starts, ids, real, chunk_tokens = part_layout(reader, data, seq_part, spec.seq_len)
    n, R = ids.shape
    docs = np.full((2, n, R, k), -1, np.int64)
    docs[1] = -2  # a continuation without an answer never matches
    toks = np.zeros((2, n, R, k, c), np.int32)
    sel = answers["role"] >= 0
    role, sample, pos, slot = (answers[x][sel] for x in ("role", "sample", "pos", "slot"))
    docs[role, sample, pos, slot] = answers["doc"][sel]
    toks[role, sample, pos, slot] = answers["tokens"][sel]
    retrieved = np.concatenate([toks[0], continuation_rule(docs[0], docs[1], toks[1])], axis=-1)  # (n, R, k, 2c)
    tokens = sequence_tokens(chunk_tokens, real)
    is_eval = in_eval_split(starts, spec.eval_fraction, spec.split_seed)
    return samples_table(starts, is_eval, tokens, retrieved.reshape(n, -1))


def samples_table(starts: np.ndarray, is_eval: np.ndarray, tokens: np.ndarray, retrieved: np.ndarray) -> pa.Table:
    def lists(a: np.ndarray) -> pa.Array:
        n, w = a.shape
        return pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * w, w, dtype=np.int32)),
                                        pa.array(a.reshape(-1).astype(np.int32)))

    return pa.Table.from_arrays([pa.array(starts.astype(np.int64)), pa.array(is_eval.astype(bool)), lists(tokens),
                                 lists(retrieved)], schema=SAMPLE_SCHEMA)


# ----------------------------------------------------------------------------- the Ray Data pipeline


def _requests_batch(batch: dict, data_url: str, spec: SampleSpec) -> dict:
    return part_requests(data_url, int(batch["seq_part"][0]), spec)


def _answers_group(group: dict, data_url: str) -> dict:
    return answer_requests(data_url, group)


def _assemble_group(group: dict, data_url: str, out_url: str, folder: str, spec: SampleSpec) -> dict:
    seq_part = int(group["seq_part"][0])
    table = assemble_part(data_url, seq_part, group, spec)
    entry = write_table(open_location(out_url), f"{folder}/{part_name(seq_part)}", table)
    is_eval = table.column("eval").to_numpy(zero_copy_only=False)
    entry |= {"path": part_name(seq_part), "seq_part": seq_part, "eval_rows": int(is_eval.sum()),
              "train_rows": int((~is_eval).sum())}
    return {"entry": np.array([json.dumps(entry)])}


def resolve_spec(data: Location, *, seq_len: int, num_neighbors: int, eval_fraction: float,
                 split_seed: int) -> tuple[SampleSpec, BuildReader, dict]:
    """Check the build (chunks, seqs, LATEST, neighbors) and the sample shape; one clear error otherwise."""
    reader = BuildReader(data)
    require_manifest(data, "seqs", "RETRO training")
    latest = resolve_latest(data)
    nb_version = latest["neighbors"]
    nb_manifest = require_manifest(data, f"neighbors/{nb_version}", "RETRO training")
    k_build = int(nb_manifest["totals"]["k"])
    c = reader.chunk_size
    seq_len = seq_len or reader.seq_len
    if seq_len % c or reader.seq_len % seq_len:
        raise ValueError(f"--seq-len {seq_len} must be a multiple of the build's chunk size {c} and divide its "
                         f"sequence length {reader.seq_len}")
    k = num_neighbors or k_build
    if k > k_build:
        raise ValueError(f"--num-neighbors {k} exceeds the {k_build} neighbors per chunk of {data.url_of('neighbors', nb_version)}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must lie in [0, 1), got {eval_fraction}")
    spec = SampleSpec(data.url, nb_version, seq_len, k, float(eval_fraction), int(split_seed))
    return spec, reader, nb_manifest


@dataclass
class SamplesSummary:
    folder: str
    samples: int
    train: int
    eval: int
    parts: int
    seconds: float
    reused: bool

    def lines(self) -> list[str]:
        how = "reused" if self.reused else f"built in {self.seconds:.1f} s"
        return [f"retro data: {self.samples} samples ({self.train} train, {self.eval} held out) in {self.parts} "
                f"parts, {how}: {self.folder}"]


def build_samples(data: Location, out: Location, spec: SampleSpec, *, partitions: int = 0) -> SamplesSummary:
    """Run the join (Ray must be initialised) unless samples with this fingerprint are already complete."""
    start = time.perf_counter()
    chunks = require_manifest(data, "chunks", "RETRO training")
    seqs = require_manifest(data, "seqs", "RETRO training")
    nbm = require_manifest(data, f"neighbors/{spec.neighbors_version}", "RETRO training")
    tomb = read_manifest(data, "tombstones")
    fp = fingerprint({"format": FORMAT, "chunks": [p["sha256"] for p in chunks["parts"]],
                      "seqs": [p["sha256"] for p in seqs["parts"]], "neighbors": [p["sha256"] for p in nbm["parts"]],
                      "tombstones": [p["sha256"] for p in tomb["parts"]] if tomb else [],
                      "spec": {k: v for k, v in spec.to_dict().items() if k != "data_url"}})
    folder = f"{FOLDER}/{fp}"
    done = read_manifest(out, folder)
    if done is not None and all(out.fs.exists(out.path(folder, p["path"])) and
                                out.fs.size(out.path(folder, p["path"])) == p["bytes"] for p in done["parts"]):
        t = done["totals"]
        return SamplesSummary(out.url_of(folder), t["samples"], t["train"], t["eval"], len(done["parts"]), 0.0, True)

    import ray

    n_parts = len(seqs["parts"])
    parts = max(1, min(partitions or n_parts, n_parts + 1))
    ds = ray.data.from_items([{"seq_part": i} for i in range(n_parts)], override_num_blocks=max(1, n_parts))
    requests = ds.map_batches(_requests_batch, batch_size=1, batch_format="numpy",
                              fn_kwargs={"data_url": data.url, "spec": spec})
    answers = requests.groupby("owner", num_partitions=parts).map_groups(
        _answers_group, batch_format="numpy", fn_kwargs={"data_url": data.url})
    written = answers.groupby("seq_part", num_partitions=parts).map_groups(
        _assemble_group, batch_format="numpy",
        fn_kwargs={"data_url": data.url, "out_url": out.url, "folder": folder, "spec": spec}).take_all()
    entries = sorted((json.loads(r["entry"]) for r in written), key=lambda e: e["seq_part"])
    if [e["seq_part"] for e in entries] != list(range(n_parts)):
        raise RuntimeError(f"retro data: expected {n_parts} sample parts, got {len(entries)}")
    train, ev = sum(e["train_rows"] for e in entries), sum(e["eval_rows"] for e in entries)
    c = int(chunks["chunk_size"])
    write_manifest(out, folder, stage="retro_samples", parts=entries,
                   totals={"samples": train + ev, "train": train, "eval": ev},
                   config=spec.to_dict(), extra={"fingerprint": fp, "chunk_size": c, "seq_len": spec.seq_len,
                                                 "chunks_per_sample": spec.seq_len // c, "k": spec.num_neighbors})
    return SamplesSummary(out.url_of(folder), train + ev, train, ev, len(entries), time.perf_counter() - start, False)


# ----------------------------------------------------------------------------- reading samples back (train workers)


class RetroSamples:
    """The samples of one fingerprint, read a group of parts at a time.

    Train order of epoch e (a pure function of seed and e): the parts are permuted, cut into groups of about
    ``shuffle_buffer`` rows, and the rows of each group permuted. A position ``{"epoch", "offset"}`` counts
    global rows taken; a global batch is ``batch_size`` consecutive rows of that order and rank r takes its
    r-th slice, so the global batch does not depend on the number of workers. Held-out rows are read in
    part order.
    """

    def __init__(self, out: Location | str, folder_url: str, *, seed: int, shuffle_buffer: int = 2048):
        self.loc = open_location(folder_url)
        m = read_manifest(self.loc, ".")
        if m is None:
            raise FileNotFoundError(f"{folder_url}: no sample manifest")
        self.manifest = m
        self.parts = m["parts"]
        self.seq_len, self.k, self.chunk_size = int(m["seq_len"]), int(m["k"]), int(m["chunk_size"])
        self.R = int(m["chunks_per_sample"])
        self.n_train, self.n_eval = int(m["totals"]["train"]), int(m["totals"]["eval"])
        self.seed, self.shuffle_buffer = seed, max(1, shuffle_buffer)
        self._layouts: dict[int, tuple[list[list[int]], np.ndarray]] = {}
        self._groups: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def read_part(self, i: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (n, L+1), retrieved (n, R, k, 2c)) int32 of one part's train or eval rows."""
        t = read_table(self.loc, self.parts[i]["path"])
        is_eval = t.column("eval").to_numpy(zero_copy_only=False)
        keep = is_eval if split == "eval" else ~is_eval
        n = t.num_rows
        tok = t.column("tokens").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(n, self.seq_len + 1)
        ret = t.column("retrieved").combine_chunks().values.to_numpy(zero_copy_only=False)
        ret = ret.reshape(n, self.R, self.k, 2 * self.chunk_size)
        return tok[keep], ret[keep]

    def _layout(self, epoch: int) -> tuple[list[list[int]], np.ndarray]:
        if epoch not in self._layouts:
            order = [int(i) for i in seeded_rng(self.seed, epoch, 0x5A).permutation(len(self.parts))
                     if self.parts[int(i)]["train_rows"] > 0]
            groups, sizes, cur, rows = [], [], [], 0
            for i in order:
                cur.append(i)
                rows += self.parts[i]["train_rows"]
                if rows >= self.shuffle_buffer:
                    groups.append(cur)
                    sizes.append(rows)
                    cur, rows = [], 0
            if cur:
                groups.append(cur)
                sizes.append(rows)
            self._layouts = {epoch: (groups, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))}
        return self._layouts[epoch]

    def _group(self, epoch: int, g: int, parts: list[int]) -> tuple[np.ndarray, np.ndarray]:
        key = (epoch, g)
        if key not in self._groups:
            loaded = [self.read_part(i, "train") for i in parts]
            tok = np.concatenate([a for a, _ in loaded])
            ret = np.concatenate([b for _, b in loaded])
            perm = seeded_rng(self.seed, epoch, g, 0x5B).permutation(len(tok))
            if len(self._groups) >= 2:
                self._groups.pop(next(iter(self._groups)))
            self._groups[key] = (tok[perm], ret[perm])
        return self._groups[key]

    def rows(self, epoch: int, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        groups, bounds = self._layout(epoch)
        g_of = np.searchsorted(bounds, index, side="right") - 1
        tok = np.zeros((len(index), self.seq_len + 1), np.int32)
        ret = np.zeros((len(index), self.R, self.k, 2 * self.chunk_size), np.int32)
        for g in np.unique(g_of).tolist():
            sel = g_of == g
            gt, gr = self._group(epoch, g, groups[g])
            local = index[sel] - bounds[g]
            tok[sel], ret[sel] = gt[local], gr[local]
        return tok, ret

    def train_batches(self, position: dict, batch_size: int, rank: int, world: int
                      ) -> Iterator[tuple[tuple[np.ndarray, np.ndarray], dict]]:
        if self.n_train < batch_size:
            raise ValueError(f"only {self.n_train} training samples, fewer than --batch-size {batch_size}")
        epoch, offset = int(position.get("epoch", 0)), int(position.get("offset", 0))
        local = batch_size // world
        while True:
            if offset + batch_size > self.n_train:  # the remainder of an epoch is dropped
                epoch, offset = epoch + 1, 0
            index = np.arange(offset + rank * local, offset + (rank + 1) * local, dtype=np.int64)
            batch = self.rows(epoch, index)
            offset += batch_size
            yield batch, {"epoch": epoch, "offset": offset}

    def eval_rows(self, limit: int, rank: int, world: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This rank's share (every world-th row) of the first ``limit`` held-out rows, part by part."""
        seen = 0
        for i, p in enumerate(self.parts):
            if seen >= limit:
                return
            if p["eval_rows"] == 0:
                continue
            tok, ret = self.read_part(i, "eval")
            take = min(len(tok), limit - seen)
            idx = np.arange(seen, seen + take)
            mine = (idx % world) == rank
            seen += take
            if mine.any():
                yield tok[:take][mine], ret[:take][mine]


def iter_batches(rows: Iterator[tuple[np.ndarray, np.ndarray]], size: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Re-batch a stream of (tokens, retrieved) row blocks into batches of at most ``size`` rows."""
    buf_t: list[np.ndarray] = []
    buf_r: list[np.ndarray] = []
    n = 0
    for t, r in rows:
        buf_t.append(t)
        buf_r.append(r)
        n += len(t)
        while n >= size:
            T, Rr = np.concatenate(buf_t), np.concatenate(buf_r)
            yield T[:size], Rr[:size]
            buf_t, buf_r, n = [T[size:]], [Rr[size:]], n - size
    if n:
        yield np.concatenate(buf_t), np.concatenate(buf_r)


def load_samples_manifest(folder_url: str) -> Optional[dict]:
    return read_manifest(open_location(folder_url), ".")


# ----------------------------------------------------------------------------- the training task (train workers)


def retro_model_config(d: dict):
    """A RetroConfig from its JSON form (lists back to tuples, the PKM settings back to a PKMConfig)."""
    from models.pkm import PKMConfig
    from models.retro import RetroConfig

    d = dict(d)
    if isinstance(d.get("pkm"), dict):
        d["pkm"] = PKMConfig(**d["pkm"])
    return RetroConfig(**d)


def retro_model_dict(preset: str, overrides: dict, *, vocab_size: int, chunk_size: int, seq_len: int) -> dict:
    """The model config for a build: the preset, the build's vocabulary/chunk size/sequence length, overrides."""
    import dataclasses

    from models.retro import retro_config

    if "chunk_size" in overrides and overrides["chunk_size"] != chunk_size:
        raise ValueError(f"--override chunk_size={overrides['chunk_size']} differs from the build's chunk size {chunk_size}")
    fixed = {"num_tokens": vocab_size, "chunk_size": chunk_size, "max_seq_len": seq_len}
    merged = {**fixed, **overrides}
    if merged["num_tokens"] < vocab_size:
        raise ValueError(f"num_tokens {merged['num_tokens']} is smaller than the build's vocabulary ({vocab_size})")
    if merged["max_seq_len"] < seq_len:
        raise ValueError(f"max_seq_len {merged['max_seq_len']} is shorter than --seq-len {seq_len}")
    cfg = retro_config(preset, **merged)
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


class RetroTask(TrainTask):
    """RETRO on the joined samples: loss with retrieval; evaluation with and without the neighbors."""

    job = "retro"

    def __init__(self, cfg, rank: int, world: int, device, extra: dict):
        super().__init__(cfg, rank, world, device, extra)
        self.samples = RetroSamples(cfg.out, extra["samples_url"], seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer)
        self.model_dict = extra["model_config"]

    def model_config_json(self) -> str:
        return json.dumps(self.model_dict)

    def build_model(self):
        """The model, with activation checkpointing and torch.compile of its blocks as the run asks."""
        from models.retro import RETRO

        model = RETRO(retro_model_config(self.model_dict))
        model.activation_checkpointing = self.cfg.activation_checkpointing
        if self.cfg.compile_model:
            model.compile_blocks()
        return model

    def start_position(self) -> dict:
        return {"epoch": 0, "offset": 0}

    def _tensors(self, tok: np.ndarray, ret: np.ndarray):
        """int64 tensors on the device; on a GPU through pinned memory, copied without blocking the host."""
        import torch

        tok, ret = self.compact(tok), self.compact(ret)
        cuda = getattr(self.device, "type", "cpu") == "cuda"

        def move(a: np.ndarray):
            t = torch.from_numpy(a.astype(np.int64))
            return t.pin_memory().to(self.device, non_blocking=True) if cuda else t.to(self.device)

        return move(tok), move(ret)

    def batches(self, position: dict):
        """This rank's rows of each global batch, made ``--prefetch`` batches ahead in a background thread."""
        from pipelines.train.prefetch import prefetch

        rows = self.samples.train_batches(position, self.cfg.batch_size, self.rank, self.world)
        return prefetch(((self._tensors(tok, ret), pos) for (tok, ret), pos in rows), self.cfg.prefetch)

    def micro_batches(self, batch) -> list:
        """The rank's rows in ``--grad-accum`` equal slices (views: no copy)."""
        tok, ret = batch
        n = self.cfg.grad_accum
        size = len(tok) // n
        return [(tok[i * size:(i + 1) * size], ret[i * size:(i + 1) * size]) for i in range(n)]

    def tokens_in(self, batch):
        return (batch[0][:, 1:] != 0).sum()  # a device tensor: counting does not wait for the device

    def input_tokens(self, batch) -> int:
        return int(batch[0][:, :-1].numel())

    @staticmethod
    def _ce_sum(model, tok, ret):
        """Summed cross-entropy of tok's next tokens (the model's blocked loss: no float32 logits)."""
        return model(tok[:, :-1], ret, labels=tok[:, 1:], reduction="sum")

    def loss_sum(self, model, batch):
        tok, ret = batch
        return self._ce_sum(model, tok, ret)

    def evaluate(self, model) -> dict[str, float]:
        import torch

        limit = self.cfg.eval_batches * self.cfg.batch_size
        with_r = without = n = 0.0
        for tok, ret in iter_batches(self.samples.eval_rows(limit, self.rank, self.world), self.cfg.local_batch_size):
            t, r = self._tensors(tok, ret)
            with_r += float(self._ce_sum(model, t, r))
            without += float(self._ce_sum(model, t, torch.zeros_like(r)))
            n += float((t[:, 1:] != 0).sum())
        with_r, without, n = all_reduce_sum([with_r, without, n], self.device)
        if n == 0:
            return {}
        return {"eval_loss": with_r / n, "eval_loss_no_retrieval": without / n, "eval_tokens": int(n)}
