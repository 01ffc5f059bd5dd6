"""The RETRO sample join, step by step in-process (no Ray), against a brute-force reference over a small
synthetic build with every edge case: documents that end inside a sequence, neighbors that are the last
chunk of their document (no continuation) or of the whole build, -1 neighbor pads, several parts.
Also the deterministic training order (any worker count, resume) and the shared training helpers."""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest

from pipelines.artifacts.manifest import part_name, write_manifest
from pipelines.artifacts.parquet import write_table
from pipelines.artifacts.storage import open_location, write_bytes_atomic
from pipelines.artifacts.versions import LATEST
from pipelines.train.config import CommonTrainConfig, parse_overrides
from pipelines.train.data_order import in_eval_split
from pipelines.train.loop import lr_factor
from pipelines.train.metrics import MetricsLog, read_metrics
from pipelines.train.retro import (
    RetroSamples,
    SampleSpec,
    answer_requests,
    assemble_part,
    part_requests,
    samples_table,
    sequence_tokens,
)
from pipelines.train.vocab import TokenMap

C, BUILD_SEQ, K = 4, 16, 3  # 4 chunks per build sequence


def write_build(root: str, seed: int = 0):
    """chunks/ seqs/ docs/ neighbors/v0001/ LATEST with 3 parts; returns the full arrays for the reference."""
    rng = np.random.default_rng(seed)
    out = open_location(root)
    doc_sizes = [[5, 1, 9], [4, 2], [7, 3, 1]]  # chunks per document, per part
    chunk_entries, seq_entries, doc_entries, nb_entries = [], [], [], []
    all_tokens, all_doc, all_nb = [], [], []
    cid = did = 0
    for p, sizes in enumerate(doc_sizes):
        tokens, docs, ids, seqs, firsts = [], [], [], [], []
        for n in sizes:
            firsts.append(cid)
            body = rng.integers(1, 50, size=(n * C + 1)).astype(np.int32)
            body[-rng.integers(1, C):] = 0  # the last chunk is padded, its continuation too
            for i in range(n):
                tokens.append(np.concatenate([body[i * C:(i + 1) * C], body[(i + 1) * C:(i + 1) * C + 1]]))
                docs.append(did)
                ids.append(cid + i)
            seqs.extend(range(cid, cid + n, BUILD_SEQ // C))
            cid += n
            did += 1
        tok = np.stack(tokens)
        chunk_entries.append(write_table(out, f"chunks/{part_name(p)}", pa.table({
            "chunk_id": pa.array(ids, pa.int64()), "doc_id": pa.array(docs, pa.int64()),
            "tokens": pa.array([t.tolist() for t in tok], pa.list_(pa.int32()))})) | {"path": part_name(p)})
        seq_entries.append(write_table(out, f"seqs/{part_name(p)}", pa.table({"seq_start": pa.array(seqs, pa.int64())}))
                           | {"path": part_name(p)})
        doc_entries.append(write_table(out, f"docs/{part_name(p)}", pa.table({
            "doc_id": pa.array(sorted(set(docs)), pa.int64()), "first_chunk_id": pa.array(firsts, pa.int64()),
            "num_chunks": pa.array(sizes, pa.int64())})) | {"path": part_name(p)})
        all_tokens.append(tok)
        all_doc.extend(docs)
    n = cid
    doc = np.asarray(all_doc)
    # neighbors: random chunks of other documents, some -1 pads, always including the last chunk of the build
    for p in range(len(doc_sizes)):
        lo = sum(map(len, all_tokens[:p]))
        rows = []
        for q in range(lo, lo + len(all_tokens[p])):
            other = np.nonzero(doc != doc[q])[0]
            nb = rng.choice(other, size=K, replace=False)
            if q % 5 == 0:
                nb[1] = -1
            if q % 7 == 0 and doc[n - 1] != doc[q]:
                nb[0] = n - 1
            rows.append(nb)
        nb = np.asarray(rows, np.int64)
        all_nb.append(nb)
        ids = np.arange(lo, lo + len(nb))
        nb_entries.append(write_table(out, f"neighbors/v0001/{part_name(p)}", pa.table({
            "chunk_id": pa.array(ids, pa.int64()), "neighbors": pa.array(nb.tolist(), pa.list_(pa.int64())),
            "distances": pa.array(np.ones_like(nb, np.float32).tolist(), pa.list_(pa.float32()))}))
                          | {"path": part_name(p), "first_chunk_id": int(lo)})
    tok_desc = {"name": "synthetic", "vocab_size": 64, "pad_id": 0, "cls_id": 1, "sep_id": 2}
    for folder, entries in (("chunks", chunk_entries), ("seqs", seq_entries), ("docs", doc_entries)):
        write_manifest(out, folder, stage="tokenize", parts=entries, totals={"chunks": n}, config={},
                       extra={"chunk_size": C, "seq_len": BUILD_SEQ, "tokenizer": tok_desc})
    write_manifest(out, "neighbors/v0001", stage="neighbors", parts=nb_entries, totals={"rows": n, "k": K}, config={})
    write_bytes_atomic(out, LATEST, json.dumps({"index": "v0001", "neighbors": "v0001", "k": K}).encode())
    return out, np.concatenate(all_tokens), doc, np.concatenate(all_nb), [len(s) for s in doc_sizes]


def reference_samples(tokens, doc, nb, seq_len: int, k: int):
    """Plain loops over the whole in-memory build: what every sample must hold."""
    n, R, R_build = len(tokens), seq_len // C, BUILD_SEQ // C
    firsts = {}
    for i in range(n):
        firsts.setdefault(doc[i], i)
    build_seqs = [s for s in range(n) if (s - firsts[doc[s]]) % R_build == 0]
    out = {}
    for s0 in build_seqs:
        for j in range(R_build // R):
            s = s0 + j * R
            if s >= n or doc[s] != doc[s0]:
                continue
            seq = np.zeros(R * C + 1, np.int32)
            ret = np.zeros((R, k, 2 * C), np.int32)
            for p in range(R):
                q = s + p
                if q >= n or doc[q] != doc[s]:
                    break
                seq[p * C:(p + 1) * C + 1] = tokens[q]
                for slot in range(k):
                    m = nb[q, slot]
                    if m < 0:
                        continue
                    ret[p, slot, :C] = tokens[m, :C]
                    if m + 1 < n and doc[m + 1] == doc[m]:
                        ret[p, slot, C:] = tokens[m + 1, :C]
            out[s] = (seq, ret)
    return out


def run_join_in_process(out, spec: SampleSpec, n_parts: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The three steps of the Ray Data pipeline, with the shuffles done by plain grouping."""
    requests = [part_requests(out.url, p, spec) for p in range(n_parts)]
    req = {key: np.concatenate([r[key] for r in requests]) for key in requests[0]}
    by_owner = defaultdict(list)
    for i, o in enumerate(req["owner"]):
        by_owner[int(o)].append(i)
    answers = [answer_requests(out.url, {key: v[idx] for key, v in req.items()}) for idx in by_owner.values()]
    ans = {key: np.concatenate([a[key] for a in answers]) for key in answers[0]}
    got = {}
    for p in range(n_parts):
        sel = ans["seq_part"] == p
        assert sel.any(), "every part gets its heartbeat"
        table = assemble_part(out.url, p, {key: v[sel] for key, v in ans.items()}, spec)
        starts = table.column("start").to_numpy()
        tok = np.asarray(table.column("tokens").to_pylist(), np.int32).reshape(len(starts), -1)
        ret = np.asarray(table.column("retrieved").to_pylist(), np.int32).reshape(len(starts), -1)
        for s, t, r in zip(starts, tok, ret):
            got[int(s)] = (t, r)
    return got


@pytest.mark.parametrize("seq_len, k", [(BUILD_SEQ, K), (8, 2)])
def test_join_matches_brute_force_reference(tmp_path, seq_len, k):
    out, tokens, doc, nb, _ = write_build(str(tmp_path))
    spec = SampleSpec(out.url, "v0001", seq_len, k, 0.3, 0)
    got = run_join_in_process(out, spec, 3)
    want = reference_samples(tokens, doc, nb[:, :k], seq_len, k)
    assert sorted(got) == sorted(want)
    R = seq_len // C
    for s, (seq, ret) in want.items():
        assert np.array_equal(got[s][0], seq), s
        assert np.array_equal(got[s][1].reshape(R, k, 2 * C), ret), s
    # the edge cases are really there
    used = nb[:, :k][nb[:, :k] >= 0]
    assert (nb[:, :k] < 0).any()
    assert any(m + 1 < len(doc) and doc[m + 1] != doc[m] for m in used)  # a neighbor at a document's end
    assert (used == len(doc) - 1).any()  # the build's last chunk: no next chunk at all
    assert any(not all(doc[s + p] == doc[s] for p in range(R) if s + p < len(doc)) for s in want)  # doc ends mid-sample


def test_sequence_tokens_end_with_the_last_real_continuation():
    chunks = np.array([[[1, 2, 3, 4, 5], [5, 6, 7, 0, 0], [9, 9, 9, 9, 9]]], np.int32)
    real = np.array([[True, True, False]])
    assert sequence_tokens(np.where(real[..., None], chunks, 0), real).tolist() == [[1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0, 0, 0]]
    full = np.array([[True, True, True]])
    assert sequence_tokens(chunks, full)[0, -1] == 9


def write_samples(tmp_path, n_parts=3, rows=11, seq_len=8, R=2, k=1, c=4):
    """Sample parts whose tokens encode their start id, for order tests."""
    out = open_location(str(tmp_path / "samples"))
    entries, start = [], 0
    for p in range(n_parts):
        starts = np.arange(start, start + rows)
        start += rows
        is_eval = in_eval_split(starts, 0.2, 0)
        tok = np.repeat(starts[:, None], seq_len + 1, axis=1).astype(np.int32)
        ret = np.repeat(starts[:, None], R * k * 2 * c, axis=1).astype(np.int32)
        e = write_table(out, part_name(p), samples_table(starts, is_eval, tok, ret))
        entries.append(e | {"path": part_name(p), "seq_part": p, "eval_rows": int(is_eval.sum()),
                            "train_rows": int((~is_eval).sum())})
    train = sum(e["train_rows"] for e in entries)
    ev = sum(e["eval_rows"] for e in entries)
    write_manifest(out, ".", stage="retro_samples", parts=entries, totals={"samples": train + ev, "train": train, "eval": ev},
                   config={}, extra={"chunk_size": c, "seq_len": seq_len, "chunks_per_sample": R, "k": k})
    return out, train, ev


def take(samples: RetroSamples, position: dict, steps: int, batch: int, world: int) -> tuple[list, dict]:
    gens = [samples.train_batches(position, batch, r, world) for r in range(world)]
    seen = []
    for _ in range(steps):
        parts = [next(g) for g in gens]
        seen.append(np.concatenate([p[0][0][:, 0] for p in parts]).tolist())
        position = parts[0][1]
    return seen, position


def test_train_order_is_seeded_worker_independent_and_resumable(tmp_path):
    out, n_train, n_eval = write_samples(tmp_path)
    mk = lambda: RetroSamples(None, out.url, seed=3, shuffle_buffer=15)  # noqa: E731 - groups of two parts
    one, pos_one = take(mk(), {"epoch": 0, "offset": 0}, 9, 4, 1)
    two, pos_two = take(mk(), {"epoch": 0, "offset": 0}, 9, 4, 2)
    assert one == two and pos_one == pos_two  # the global batch does not depend on the worker count
    per_epoch = n_train // 4
    epoch0 = sum(one[:per_epoch], [])
    assert len(set(epoch0)) == len(epoch0) and epoch0 != sorted(epoch0)  # shuffled, no repeats
    assert one[per_epoch] != one[0]  # the next epoch has another order
    first, mid = take(mk(), {"epoch": 0, "offset": 0}, 4, 4, 2)
    rest, _ = take(mk(), mid, 5, 4, 2)  # a fresh reader from a saved position continues exactly
    assert first + rest == one
    other, _ = take(RetroSamples(None, out.url, seed=4, shuffle_buffer=15), {"epoch": 0, "offset": 0}, 3, 4, 1)
    assert other != one[:3]
    held = [r for t, _ in mk().eval_rows(100, 0, 1) for r in t[:, 0].tolist()]
    assert len(held) == n_eval and not set(held) & set(sum(one, []))
    split = [sorted(t[:, 0].tolist()) for r in range(2) for t, _ in mk().eval_rows(100, r, 2)]
    assert sorted(sum(split, [])) == sorted(held)


def test_eval_split_is_a_deterministic_hash():
    ids = np.arange(100_000)
    a = in_eval_split(ids, 0.05, 0)
    assert np.array_equal(a, in_eval_split(ids, 0.05, 0)) and abs(a.mean() - 0.05) < 0.005
    assert not np.array_equal(a, in_eval_split(ids, 0.05, 1))
    assert not in_eval_split(ids, 0.0, 0).any()


def test_lr_schedule_and_overrides():
    cfg = CommonTrainConfig(data="d", out="o", warmup_steps=4, lr_decay_steps=10)
    assert [round(lr_factor(s, cfg), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(14, cfg) == pytest.approx(0.1) and lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(50, CommonTrainConfig(data="d", out="o", warmup_steps=4)) == 1.0
    assert parse_overrides(["dec_depth=4", "dec_cross_attn_layers=(2, 4)", "attn_impl=matmul"]) == {
        "dec_depth": 4, "dec_cross_attn_layers": (2, 4), "attn_impl": "matmul"}
    for bad in (dict(batch_size=5, num_workers=2), dict(precision="fp8"), dict(override=["nonsense"]), dict(data="")):
        with pytest.raises(ValueError):
            CommonTrainConfig(**{"data": "d", "out": "o", **bad})


def test_metrics_log_drops_rows_after_the_resumed_checkpoint(tmp_path):
    out = open_location(str(tmp_path))
    log = MetricsLog(out, 0)
    for s in (1, 2, 3, 4):
        log.write({"kind": "train", "step": s, "loss": 1.0 / s})
    MetricsLog(out, 2).write({"kind": "train", "step": 3, "loss": 9.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(out)] == [(1, 1.0), (2, 0.5), (3, 9.0)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


def test_token_map_renumbers_and_maps_unknown_ids_to_unk():
    m = TokenMap(np.array([0, 3, 100, 2023, 5000]))
    assert len(m) == 5 and m.unk == 2
    assert m.to_compact(np.array([[0, 3, 5000], [2023, 7, 99999]])).tolist() == [[0, 1, 4], [3, 2, 2]]
    assert m.to_full(np.array([0, 1, 4])).tolist() == [0, 3, 5000]
    with pytest.raises(ValueError):
        TokenMap(np.array([3, 100]))


def test_resuming_a_different_model_is_refused_with_the_settings_that_differ():
    from pipelines.train.checkpoint import check_same_model

    check_same_model({"num_tokens": 100, "dim": 8}, {"num_tokens": 100, "dim": 8})  # same model: resumes
    check_same_model({}, {"num_tokens": 100})  # a checkpoint without a recorded config: nothing to compare
    with pytest.raises(ValueError, match=r"num_tokens: 30522 in the checkpoint, 13759 now.*--no-resume"):
        check_same_model({"num_tokens": 30522, "dim": 8}, {"num_tokens": 13759, "dim": 8})


def write_random_samples(tmp_path, parts=2, rows=10, seq_len=8, k=2, c=C, vocab=64):
    """Sample parts of random tokens and neighbors (some continuations padded), every other row held out.

    Returns the folder and the held-out (tokens, retrieved) rows in the order evaluation reads them."""
    rng = np.random.default_rng(0)
    out = open_location(str(tmp_path / "samples"))
    R = seq_len // c
    entries, held_tok, held_ret, start = [], [], [], 0
    for p in range(parts):
        starts = np.arange(start, start + rows)
        start += rows
        is_eval = starts % 2 == 0
        tok = rng.integers(1, vocab, (rows, seq_len + 1)).astype(np.int32)
        ret = rng.integers(1, vocab, (rows, R, k, 2 * c)).astype(np.int32)
        ret[rng.random((rows, R, k)) < 0.3, c:] = 0  # neighbors at a document's end: no continuation
        e = write_table(out, part_name(p), samples_table(starts, is_eval, tok, ret.reshape(rows, -1)))
        entries.append(e | {"path": part_name(p), "seq_part": p, "eval_rows": int(is_eval.sum()),
                            "train_rows": int((~is_eval).sum())})
        held_tok.append(tok[is_eval])
        held_ret.append(ret[is_eval])
    train, ev = sum(e["train_rows"] for e in entries), sum(e["eval_rows"] for e in entries)
    write_manifest(out, ".", stage="retro_samples", parts=entries, totals={"samples": train + ev, "train": train, "eval": ev},
                   config={}, extra={"chunk_size": c, "seq_len": seq_len, "chunks_per_sample": R, "k": k})
    return out, np.concatenate(held_tok), np.concatenate(held_ret)


@pytest.fixture()
def one_torch_thread():
    """Tiny tensors: one torch thread is fastest, and far faster on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_retro_eval_without_retrieval_feeds_only_padding_neighbors(tmp_path, one_torch_thread):
    """eval_loss is the held-out token loss with the real neighbors; eval_loss_no_retrieval the same rows with
    every neighbor token replaced by padding, so the model reads nothing retrieved (CCA sees only its null)."""
    import torch

    from pipelines.train.retro import RetroTask, retro_model_dict
    from pipelines.train.run_retro import RetroTrainConfig

    out, held_tok, held_ret = write_random_samples(tmp_path)
    cfg = RetroTrainConfig(data="unused", out=str(tmp_path), batch_size=4, eval_batches=2)
    model_dict = retro_model_dict("tiny", {"init_std": 0.2}, vocab_size=64, chunk_size=C, seq_len=8)
    task = RetroTask(cfg, 0, 1, torch.device("cpu"), {"samples_url": out.url, "model_config": model_dict})
    torch.manual_seed(0)
    model = task.build_model().eval()
    calls = []  # (seq, retrieved) of every forward the evaluation makes

    def spy(module, args, kwargs):
        retrieved = args[1] if len(args) > 1 else kwargs.get("retrieved")
        calls.append((args[0].clone(), None if retrieved is None else retrieved.clone()))

    hook = model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            metrics = task.evaluate(model)
    finally:
        hook.remove()

    limit = cfg.eval_batches * cfg.batch_size  # the first held-out rows, two batches of four
    tok = torch.from_numpy(held_tok[:limit].astype(np.int64))
    ret = torch.from_numpy(held_ret[:limit].astype(np.int64))
    assert len(calls) == 4  # per batch: one forward with the neighbors, one without
    seen = torch.cat([c[0] for c in calls[0::2]])
    assert torch.equal(seen, tok[:, :-1]) and torch.equal(torch.cat([c[0] for c in calls[1::2]]), seen)
    assert torch.equal(torch.cat([c[1] for c in calls[0::2]]), ret)  # the real neighbors
    for _, no_retrieval in calls[1::2]:
        assert no_retrieval is None or bool((no_retrieval == model.pad_id).all()), "a neighbor token reached the model"

    labels = tok[:, 1:]
    n = int((labels != 0).sum())
    with torch.no_grad():
        def loss(r):
            logits = model(tok[:, :-1], r)
            return float(torch.nn.functional.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1),
                                                           ignore_index=0, reduction="sum")) / n
        want, want_none = loss(ret), loss(torch.zeros_like(ret))
    assert metrics["eval_tokens"] == n
    assert metrics["eval_loss"] == pytest.approx(want, rel=1e-5)
    assert metrics["eval_loss_no_retrieval"] == pytest.approx(want_none, rel=1e-5)
    assert abs(metrics["eval_loss"] - metrics["eval_loss_no_retrieval"]) > 1e-3  # the ablation changes the loss
