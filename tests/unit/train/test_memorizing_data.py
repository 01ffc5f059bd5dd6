"""Memorizing Transformer streams over a small synthetic build (no Ray): rows read whole documents in order,
segment after segment; memories are cleared exactly at document boundaries; the order does not depend on the
worker count; a saved position and memory state continue exactly."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from pipelines.artifacts.build_reader import BuildReader
from pipelines.train.memorizing import (
    DocOrder,
    MemorizingTask,
    Streams,
    ce_sum,
    memorizing_model_dict,
    num_segments,
    segment,
)
from pipelines.train.run_memorizing import MemorizingTrainConfig
from tests.unit.train.test_retro_data import C, write_build

SEG = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one torch thread is fastest, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def synthetic(tmp_path):
    out, tokens, doc, _, _ = write_build(str(tmp_path / "build"))
    docs = {}
    for d in np.unique(doc):
        rows = tokens[doc == d]
        flat = np.concatenate([rows[:, :C].reshape(-1), rows[-1:, C]])
        docs[int(d)] = flat[: np.nonzero(flat)[0][-1] + 1]
    return out, docs


def order_of(out, eval_fraction=0.25, seed=5) -> DocOrder:
    return DocOrder(out, BuildReader(out), seed=seed, eval_fraction=eval_fraction)


def run_streams(order, steps, batch, world, position=None):
    """[(step, global row, doc_id, inputs, labels, new_doc, doc_ended)] over all ranks; the last positions."""
    streams = [Streams(order, seq_len=SEG, batch_size=batch, rank=r, world=world) for r in range(world)]
    gens = [s.batches(position[r] if position else s.start_position()) for r, s in enumerate(streams)]
    rows, positions = [], None
    for step in range(steps):
        got = [next(g) for g in gens]
        positions = [p for _, p in got]
        for r, (b, _) in enumerate(got):
            for i in range(len(b["inputs"])):
                rows.append((step, r * (batch // world) + i, int(b["doc_id"][i]), b["inputs"][i].tolist(),
                             b["labels"][i].tolist(), bool(b["new_doc"][i]), bool(b["doc_ended"][i])))
    return rows, positions


def test_rows_stream_whole_documents_in_order(synthetic):
    out, docs = synthetic
    order = order_of(out)
    evals = {d for d, _, _ in order.eval_docs(0)}
    assert evals and len(evals) < len(docs)
    rows, _ = run_streams(order, 60, 3, 1)
    seen_docs = []
    for g in range(3):
        mine = [r for r in rows if r[1] == g]
        current: list[int] = []
        segments = 0
        for step, _, d, x, y, new, ended in mine:
            assert new == (not current)  # a document starts exactly when the previous one ended
            current = (x[:1] if new else current) + y
            segments += 1
            assert x[0] == current[-len(y) - 1]  # consecutive segments: each input starts where the last ended
            assert any(y)  # no segment is all padding
            if ended:
                text = current
                while text and text[-1] == 0:
                    text = text[:-1]
                assert text == docs[d].tolist()  # the whole document, in order, nothing else
                assert segments == num_segments(len(docs[d]), SEG) == -(-(len(docs[d]) - 1) // SEG)
                seen_docs.append(d)
                current, segments = [], 0
    assert not set(seen_docs) & evals  # held-out documents never train
    assert set(seen_docs) == set(docs) - evals  # and every training document comes round


def test_order_is_worker_independent_seeded_and_resumable(synthetic):
    out, _ = synthetic
    one, _ = run_streams(order_of(out), 25, 4, 1)
    two, _ = run_streams(order_of(out), 25, 4, 2)
    assert sorted(one) == sorted(two)
    first, pos = run_streams(order_of(out), 10, 4, 2)
    rest, _ = run_streams(order_of(out), 15, 4, 2, position=pos)
    assert sorted(first + [(s + 10, *r) for s, *r in rest]) == sorted(two)
    other, _ = run_streams(order_of(out, seed=6), 25, 4, 1)
    assert [r[2] for r in other] != [r[2] for r in one]


def make_task(out, eval_fraction=0.25, **kw) -> MemorizingTask:
    cfg = MemorizingTrainConfig(data=out.url, out=out.url, batch_size=3, seq_len=SEG, eval_fraction=eval_fraction, seed=5,
                                **kw)
    model = memorizing_model_dict("tiny", {"xl_max_memories": SEG, "max_knn_memories": 6}, vocab_size=64)
    task = MemorizingTask(cfg, 0, 1, torch.device("cpu"), {"model_config": model})
    torch.manual_seed(0)
    task.build_model()
    return task


def test_memories_are_cleared_at_document_boundaries(synthetic):
    out, _ = synthetic
    task = make_task(out)
    batches = task.batches(task.start_position())
    since_start = [0, 0, 0]
    ended_rows = 0
    for _ in range(30):
        batch, _ = next(batches)
        with torch.no_grad():
            task.loss_sum(task.model, batch)
        mem = task.memory
        for i in range(3):
            since_start[i] = 1 if batch["new_doc"][i] else since_start[i] + 1
            knn = int(mem.knn[0].sizes()[i])
            xl_valid = [bool(v[i].any()) for v in mem.xl_valid if v is not None]
            if batch["doc_ended"][i]:  # cleared after the document's last segment: nothing of it remains
                assert knn == 0 and not any(xl_valid)
                ended_rows += 1
            else:  # XL keeps the last segment, kNN what fell out of it, up to its capacity
                assert knn == min(6, SEG * (since_start[i] - 1)) and all(xl_valid)
    assert ended_rows >= 5


def test_task_state_round_trips_for_resume(synthetic):
    out, _ = synthetic
    a = make_task(out)
    it = a.batches(a.start_position())
    for _ in range(4):
        batch, pos = next(it)
        with torch.no_grad():
            a.loss_sum(a.model, batch)
    buf = io.BytesIO()
    torch.save({"task": a.state_dict()}, buf)  # as a checkpoint does, and loaded back as one is
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["task"]
    b = make_task(out)
    b.model.load_state_dict(a.model.state_dict())
    b.load_state_dict(state, 1)
    ib = b.batches(pos)
    for _ in range(3):
        xa, _ = next(it)
        xb, _ = next(ib)
        assert all(torch.equal(xa[k], xb[k]) for k in xa)
        with torch.no_grad():
            assert float(a.loss_sum(a.model, xa)) == float(b.loss_sum(b.model, xb))
    with pytest.raises(ValueError, match="--num-workers 2"):
        make_task(out).load_state_dict(state, 2)


def test_eval_ablations_match_per_document_streams(synthetic):
    """Evaluation streams each held-out document from fresh memories three ways: with XL and kNN memories
    (eval_loss), with the XL memory but kNN off, its memory never searched (eval_loss_no_knn), and with no
    memory at all (eval_loss_no_memory). Each equals streaming the documents one by one that way, and the
    three differ, since each memory reaches the output."""
    from tests.unit.models.test_memorizing import spy_searches

    out, _ = synthetic
    task = make_task(out, eval_fraction=0.6)
    model, cfg = task.model.eval(), task.cfg
    docs = task.order.eval_docs(cfg.eval_docs)
    assert len(docs) > cfg.local_batch_size  # more than one batch of documents
    sums = np.zeros(4)  # reference: one document at a time
    knn_entries = 0  # most kNN entries a document's full memory held (the kNN memory really fills)
    with torch.no_grad():
        for doc in docs:
            tokens = task.order.doc_tokens(doc)
            full, xl_only = model.create_memory(1), model.create_memory(1)
            for k in range(min(cfg.eval_segments, num_segments(len(tokens), SEG))):
                x, y = (torch.from_numpy(a)[None] for a in segment(tokens, k, SEG))
                sums[0] += float(ce_sum(model(x, full).logits, y))
                sums[1] += float(ce_sum(model(x, None).logits, y))
                sums[2] += float(ce_sum(model(x, xl_only, use_knn=False).logits, y))
                sums[3] += float((y != 0).sum())
                knn_entries = max(knn_entries, int(full.knn[0].sizes()[0]))
                assert xl_only.knn[0].sizes()[0] == 0
    assert knn_entries > 0

    created, searches = [], []  # every memory evaluation makes, and how often each was searched
    real_create = model.create_memory

    def create_memory(*args, **kwargs):
        memory = real_create(*args, **kwargs)
        created.append(memory)
        searches.append(spy_searches(memory))
        return memory

    calls = []  # (memory, use_knn) of every forward

    def spy(module, args, kwargs):
        calls.append((args[1] if len(args) > 1 else kwargs.get("memory"), kwargs.get("use_knn", True)))

    model.create_memory = create_memory
    hook = model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            metrics = task.evaluate(model)
    finally:
        hook.remove()
        del model.create_memory
    assert metrics["eval_tokens"] == sums[3]
    assert metrics["eval_loss"] == pytest.approx(sums[0] / sums[3], rel=1e-5)
    assert metrics["eval_loss_no_memory"] == pytest.approx(sums[1] / sums[3], rel=1e-5)
    assert metrics["eval_loss_no_knn"] == pytest.approx(sums[2] / sums[3], rel=1e-5)
    # what the model saw: per segment one call with the full memory, one with none, one with kNN off
    full_memories, xl_memories = created[0::2], created[1::2]
    assert {id(m) for m, _ in calls[0::3]} == {id(m) for m in full_memories}
    assert all(m is None for m, _ in calls[1::3])
    assert {id(m) for m, _ in calls[2::3]} == {id(m) for m in xl_memories}
    assert all(use_knn for _, use_knn in calls[0::3]) and not any(use_knn for _, use_knn in calls[2::3])
    assert all(s[0] > 0 for s in searches[0::2]) and all(s == [0] for s in searches[1::2])
    assert abs(metrics["eval_loss"] - metrics["eval_loss_no_knn"]) > 1e-3, metrics  # kNN reaches the output
    assert abs(metrics["eval_loss_no_knn"] - metrics["eval_loss_no_memory"]) > 1e-3, metrics  # and so does XL
