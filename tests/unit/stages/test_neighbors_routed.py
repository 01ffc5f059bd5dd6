"""The routed search's route step writes what it routed in pieces, so a route task's memory is bounded by
its buffer rather than by its part times the shards each query visits; the scan reads the pieces back as
one part."""
from __future__ import annotations

import numpy as np

from pipelines.artifacts.arrays import read_arrays
from pipelines.artifacts.storage import open_location
from pipelines.stages.neighbors_routed import RoutedJob, _load_queries, _RouteBuffers


def test_pieces_written_at_each_flush_read_back_as_the_whole_part(tmp_path):
    out = open_location(str(tmp_path))
    job = RoutedJob(out.url, "neighbors/v0001", nprobe=2, quantizer_ef=0, k=2, metric="ip", shards=2, chunks=100)
    buffers = _RouteBuffers(out, job, part=3)
    rng = np.random.default_rng(0)
    sent_ids, sent_vecs, sent_pairs = [], [], []
    for block in range(3):  # three blocks, a flush after each: three pieces for shard 1, none for shard 0
        ids = np.arange(block * 10, block * 10 + 4, dtype=np.int64)
        vecs = rng.standard_normal((4, 8)).astype(np.float16)
        pair_rows, pair_lists = np.array([0, 1, 1, 3], np.int32), np.array([5, 6, 7, 5], np.int32) + block
        buffers.add_queries(1, ids, vecs, pair_rows, pair_lists)
        buffers.add_vectors(1, ids, pair_lists[:4].astype(np.int64), vecs)
        assert buffers.held > 0
        buffers.flush()
        assert buffers.held == 0
        sent_ids.append(ids), sent_vecs.append(vecs), sent_pairs.append(pair_rows + 4 * block)
    assert buffers.query_pieces == [0, 3] and buffers.db_pieces == [0, 3] and buffers.query_copies == 12

    q = _load_queries(out, job, shard=1, part=3, pieces=3)
    np.testing.assert_array_equal(q["ids"], np.concatenate(sent_ids))
    np.testing.assert_array_equal(q["vecs"], np.concatenate(sent_vecs))
    # each piece's pair rows point into that piece: joined, they point at the same query rows as before
    np.testing.assert_array_equal(q["pair_rows"], np.concatenate(sent_pairs))
    assert len(_load_queries(out, job, shard=0, part=3, pieces=0)["ids"]) == 0
    assert len(read_arrays(out, job.db_rel(1, 3, 2))["ids"]) == 4
