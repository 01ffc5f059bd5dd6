"""Batches made ahead in a background thread: the same items in the same order, errors raised where consumed."""
from __future__ import annotations

import threading

import pytest

from pipelines.train.prefetch import prefetch


def test_prefetch_keeps_order_and_runs_ahead_in_another_thread():
    made_in: list[str] = []

    def items():
        for i in range(10):
            made_in.append(threading.current_thread().name)
            yield i

    assert list(prefetch(items(), 3)) == list(range(10))
    assert set(made_in) == {"prefetch"}
    made_in.clear()
    assert list(prefetch(items(), 0)) == list(range(10))  # depth 0: in the caller's thread
    assert set(made_in) == {threading.current_thread().name}


def test_prefetch_raises_the_producers_error_and_stops_early():
    def failing():
        yield 1
        raise OSError("disk gone")

    got = prefetch(failing(), 2)
    assert next(got) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(got)
    endless = prefetch(iter(range(10**9)), 2)
    assert next(endless) == 0
    endless.close()  # the consumer leaves: the producer thread stops instead of running on
