"""Batches made ahead in a background thread, so reading and decoding samples overlaps the device's step."""
from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")

_DONE = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(items: Iterator[T], depth: int) -> Iterator[T]:
    """Yield ``items`` in order while a daemon thread keeps up to ``depth`` of them ready (0 = no thread).

    Args:
        items: an iterator whose work (file reads, numpy, pinned host-to-device copies) may run off the
            training thread; it must not share mutable state with the consumer.
        depth: how many items may be made ahead.

    Returns:
        An iterator over the same items; an exception in the producer is raised in the consumer.
    """
    if depth <= 0:
        yield from items
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            ready.put(_Failed(e))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
