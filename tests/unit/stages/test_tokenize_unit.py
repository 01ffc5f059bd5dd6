"""One tokenize work unit, as a Ray worker runs it, in this process: read faults are retried so the unit is
complete, and text the tokenizer or UTF-8 rejects is a quarantine record, never a traceback."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from pipelines.stages.tokenize import TokenizeSettings, tokenize_unit
from pipelines.text.corpus import WorkItem, WorkUnit, list_corpus, plan_units
from pipelines.text.readers import INVALID_UNICODE, TOKENIZER_REJECTED
from pipelines.text.tokenizer import load_tokenizer
from tests.helpers_flaky import Fault, flaky_url

SETTINGS = TokenizeSettings(chunk_size=16, seq_len=64, text_field="text", tokenizer="packaged:all-MiniLM-L6-v2",
                            unit_bytes=3000, max_doc_mb=1.0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


class Rejecting:
    """The real tokenizer, except that it raises on texts holding ``marker`` (as a tokenizer may on input
    it cannot handle)."""

    def __init__(self, real, marker: str) -> None:
        self.real, self.marker = real, marker

    def _check(self, texts: list[str]) -> None:
        if any(self.marker in t for t in texts):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")

    def encode_batch(self, texts, add_special_tokens=True):
        self._check(texts)
        return self.real.encode_batch(texts, add_special_tokens=add_special_tokens)

    def encode(self, text, add_special_tokens=True):
        self._check([text])
        return self.real.encode(text, add_special_tokens=add_special_tokens)


def staged(url: str, tokenizer) -> list[dict[str, np.ndarray]]:
    units = plan_units(list_corpus([url]), SETTINGS.unit_bytes)
    return [tokenize_unit(u, SETTINGS, tokenizer) for u in units]


def test_units_are_complete_despite_read_faults(tmp_path, flaky, tokenizer):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(40)))
    (tmp_path / "b.txt").write_text("To be, or not to be, that is the question. " * 60)
    clean = staged(str(tmp_path), tokenizer)
    flaky.reads[str(tmp_path / "a.jsonl")] = Fault(at=4, times=2, error=TimeoutError)
    flaky.reads[str(tmp_path / "b.txt")] = Fault(at=2, times=2)
    faulty = staged(flaky_url(tmp_path), tokenizer)
    assert all(f.calls >= f.at + f.times for f in flaky.reads.values())  # every fault fired, and reading went on
    assert len(faulty) == len(clean) > 1 and sum(len(s["doc_chunks"]) for s in faulty) == 41
    for a, b in zip(clean, faulty):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_text_the_tokenizer_or_utf8_rejects_is_quarantined(tmp_path, tokenizer):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join([json.dumps({"text": "good one"}), '{"text": "lone \\udc00 surrogate"}',
                            json.dumps({"text": "the tokenizer chokes on this"}), json.dumps({"text": "good two"})]))
    unit = WorkUnit(0, [WorkItem(str(p), "jsonl")])
    s = tokenize_unit(unit, SETTINGS, replace(tokenizer, tokenizer=Rejecting(tokenizer.tokenizer, "chokes")))
    assert s["doc_pos"].tolist() == [0, 3]
    assert list(zip(s["q_pos"].tolist(), s["q_reason"].tolist())) == [(1, INVALID_UNICODE), (2, TOKENIZER_REJECTED)]
    assert "TypeError" in s["q_detail"][1] and s["item_records"].tolist() == [4]
