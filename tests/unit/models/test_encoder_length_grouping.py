"""ChunkEncoder.embed_rows: batches grouped by non-pad length give the plain batches' embeddings, in the
rows' order, while computing fewer token positions (real packaged encoder, real Shakespeare chunks)."""
from __future__ import annotations

import numpy as np
import pytest

from models.encoder import ChunkEncoder, EncoderConfig, plan_length_batches, row_lengths
from pipelines.text.chunking import doc_to_chunks
from pipelines.text.tokenizer import default_encoder_path, load_tokenizer
from tests.conftest import shakespeare_texts

BATCH = 8


@pytest.fixture(scope="module")
def encoder() -> ChunkEncoder:
    return ChunkEncoder(EncoderConfig(default_encoder_path(), compute_dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    """Full chunks of a long speech, the short end-of-document chunks of single speeches, and 1-token
    rows (a document's last chunk when one token is left: real rows cut after their first token), all
    distinct, shuffled so full and short rows interleave."""
    text = (shakespeare_texts() / "hamlet_gut.txt").read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    docs = ["\n\n".join(paragraphs[400:440])] + paragraphs[200:216]
    tok = load_tokenizer()
    chunks = [doc_to_chunks(np.array(e.ids, np.int32), 64) for e in tok.tokenizer.encode_batch(docs)]
    one_token = chunks[0][:2].copy()
    one_token[:, 1:-1] = 0
    rows = np.unique(np.concatenate([chunks[0][:14], one_token] + chunks[1:]), axis=0)
    return rows[np.random.default_rng(0).permutation(len(rows))]


def plain(encoder: ChunkEncoder, rows: np.ndarray) -> np.ndarray:
    """Today's loop: consecutive batches at full length."""
    return np.concatenate([encoder.embed(rows[i:i + BATCH]) for i in range(0, len(rows), BATCH)])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_the_rows_mix_full_short_and_one_token_chunks(rows: np.ndarray) -> None:
    lengths = row_lengths(rows, 0)
    assert (lengths == 64).sum() >= 10 and (lengths == 1).sum() == 2 and ((lengths > 1) & (lengths < 64)).sum() >= 10
    assert not np.all(np.diff(lengths) >= 0)  # interleaved, not already sorted


def test_grouped_embeddings_match_plain_batches_in_row_order(encoder: ChunkEncoder, rows: np.ndarray) -> None:
    want = plain(encoder, rows)
    got = encoder.embed_rows(rows, BATCH)
    assert got.shape == want.shape and got.dtype == np.float32
    assert cosine(got, want).min() >= 0.99999
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # each row's embedding is its own, not a neighbour's (the scatter back to the input order)
    sims = got @ want.T / np.linalg.norm(got, axis=1)[:, None] / np.linalg.norm(want, axis=1)[None, :]
    assert np.array_equal(sims.argmax(axis=1), np.arange(len(rows)))


def test_grouped_path_computes_fewer_token_positions(encoder: ChunkEncoder, rows: np.ndarray) -> None:
    shapes: list[tuple[int, int]] = []

    def record(_module, _args, kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))

    handle = encoder.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        plain(encoder, rows)
        plain_shapes, shapes[:] = list(shapes), []
        encoder.embed_rows(rows, BATCH)
    finally:
        handle.remove()
    lengths = row_lengths(rows, 0)
    assert all(w == 65 for _, w in plain_shapes)
    assert sum(n for n, _ in shapes) == len(rows) and max(n for n, _ in shapes) <= BATCH
    computed = sum(n * w for n, w in shapes)
    assert computed < 0.75 * sum(n * w for n, w in plain_shapes)
    # no pass is wider than its longest row needs: a short row's pass stops at the longest short row (+[CLS])
    assert sorted(w for _, w in shapes if w < 65)[-1] == lengths[lengths < 64].max() + 1


def test_all_pad_row_still_embeds_to_zero_like_today(encoder: ChunkEncoder, rows: np.ndarray) -> None:
    mixed = np.concatenate([rows[:3], np.zeros((1, rows.shape[1]), rows.dtype)])
    got = encoder.embed_rows(mixed, BATCH)
    np.testing.assert_array_equal(got[3], plain(encoder, mixed)[3])
    assert not got[3].any()


def test_full_rows_keep_their_order_and_every_row_is_planned_once() -> None:
    lengths = np.array([64, 3, 64, 64, 1, 40, 64, 0, 64])
    batches = plan_length_batches(lengths, 64, 2)
    assert [b.rows.tolist() for b in batches if b.width == 64] == [[0, 2], [3, 6], [8]]
    assert [(b.rows.tolist(), b.width) for b in batches if b.width < 64] == [([7, 4], 1), ([1, 5], 40)]
    assert sorted(np.concatenate([b.rows for b in batches]).tolist()) == list(range(len(lengths)))


def test_embed_rows_fills_the_storage_array_it_is_given(encoder: ChunkEncoder, rows: np.ndarray) -> None:
    out = np.empty((len(rows), encoder.dim), dtype=np.float16)
    assert encoder.embed_rows(rows, BATCH, out=out) is out
    np.testing.assert_array_equal(out, encoder.embed_rows(rows, BATCH).astype(np.float16))
    empty = encoder.embed_rows(np.zeros((0, 0), np.int32), BATCH)
    assert empty.shape == (0, encoder.dim)
