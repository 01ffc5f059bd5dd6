"""Named numpy arrays as one ``.npz`` file under a build: the working files stages keep between tasks
(staged tokenize units, routed and torch search pieces) and small sidecars. Written atomically."""
from __future__ import annotations

import io

import numpy as np

from pipelines.artifacts.storage import Location, read_bytes, write_bytes_atomic


def write_arrays(out: Location, rel: str, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(out, rel, buf.getvalue())


def read_arrays(out: Location, rel: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(read_bytes(out, rel)), allow_pickle=False) as z:
        return {name: z[name] for name in z.files}
