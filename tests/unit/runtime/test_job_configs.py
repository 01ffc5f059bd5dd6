"""Every job's options: each validation in a config's ``__post_init__`` has a case here that triggers it and
checks its message, TOML files load with flags winning, and a bad value is one ``error:`` line (exit 2).

``test_every_validation_is_reached`` fails when a new check is added without a case below."""
from __future__ import annotations

import argparse
import ast
import inspect
import textwrap

import pytest

from pipelines.inference.generate import GenerateConfig
from pipelines.reindex.config import ReindexConfig
from pipelines.runtime.config import parse_config
from pipelines.stages.build_config import BuildConfig
from pipelines.train.config import CommonTrainConfig
from pipelines.train.run_memorizing import MemorizingTrainConfig
from pipelines.train.run_retro import RetroTrainConfig

TRAIN = {"data": "d", "out": "o"}
REINDEX = {"corpus": ["c"], "out": "o"}
GENERATE = {"checkpoint": "c", "data": "d"}

CASES = [
    (BuildConfig, {"chunk_size": 0}, "--chunk-size must be positive"),
    (BuildConfig, {"seq_len": 100}, "must be a positive multiple of --chunk-size"),
    (BuildConfig, {"max_bad_fraction": 1.5}, "--max-bad-fraction must be in [0, 1]"),
    (BuildConfig, {"max_doc_mb": 0}, "--max-doc-mb must be positive"),
    (BuildConfig, {"unit_mb": -1}, "--unit-mb, --concurrency and --num-cpus must not be negative"),
    (BuildConfig, {"pooling": "max"}, "--pooling must be mean or cls"),
    (BuildConfig, {"embedding_dtype": "int8"}, "--embedding-dtype must be float16 or float32"),
    (BuildConfig, {"compute_dtype": "float64"}, "--compute-dtype must be auto, float32, bfloat16 or float16"),
    (BuildConfig, {"gpus_per_worker": -1}, "--gpus-per-worker not negative"),
    (BuildConfig, {"gpus_per_worker": "two"}, "--gpus-per-worker must be auto or a number"),
    (BuildConfig, {"metric": "cosine"}, "--metric must be l2 or ip"),
    (BuildConfig, {"k": 0}, "--k, --single-node-max-vectors and --max-query-ms must be positive"),
    (BuildConfig, {"stages": "tokenize,frobnicate"}, "unknown stage(s) frobnicate"),
    (BuildConfig, {"target_recall": 1.5}, "--target-recall must be in (0, 1], got 1.5"),
    (BuildConfig, {"neighbors_search": "sharded"}, "--neighbors-search must be one of auto, index, routed"),
    (BuildConfig, {"shard_memory": "lots"}, "--shard-memory must look like 4G, 512M or a byte count"),
    (ReindexConfig, {"out": "o"}, "--corpus is required"),
    (ReindexConfig, {"corpus": ["c"]}, "--out is required"),
    (ReindexConfig, {**REINDEX, "max_growth": 0}, "--max-growth must be positive"),
    (ReindexConfig, {**REINDEX, "min_recall": 2}, "--min-recall must be in [0, 1]"),
    (ReindexConfig, {**REINDEX, "keep": -1}, "must not be negative"),
    (ReindexConfig, {**REINDEX, "lock_ttl": 0}, "--lock-ttl must be positive"),
    (ReindexConfig, {**REINDEX, "every": "soon"}, "--every must look like 30m, 6h, 1d or 1h30m"),
    (RetroTrainConfig, {"out": "o"}, "--data is required"),
    (RetroTrainConfig, {"data": "d"}, "--out is required"),
    (RetroTrainConfig, {**TRAIN, "max_steps": 0}, "--max-steps must be positive"),
    (RetroTrainConfig, {**TRAIN, "warmup_steps": -1}, "--warmup-steps must not be negative"),
    (RetroTrainConfig, {**TRAIN, "batch_size": 6, "num_workers": 4}, "must be a multiple of --num-workers (4)"),
    (RetroTrainConfig, {**TRAIN, "cpus_per_worker": 0}, "--cpus-per-worker must be positive"),
    (RetroTrainConfig, {**TRAIN, "lr": 0}, "--lr must be positive"),
    (RetroTrainConfig, {**TRAIN, "vocab": "tiny"}, "--vocab must be full or corpus"),
    (RetroTrainConfig, {**TRAIN, "precision": "fp16"}, "--precision must be bf16 or fp32"),
    (RetroTrainConfig, {**TRAIN, "override": ["dec_depth"]}, "expected FIELD=VALUE"),
    (RetroTrainConfig, {**TRAIN, "num_neighbors": -1}, "--num-neighbors, --data-partitions and --prefetch must not be"),
    (RetroTrainConfig, {**TRAIN, "batch_size": 6, "grad_accum": 4}, "--grad-accum (4) must be positive and divide"),
    (RetroTrainConfig, {**TRAIN, "compile": "maybe"}, "--compile must be auto, on or off"),
    (RetroTrainConfig, {**TRAIN, "eval_batches": 0}, "--shuffle-buffer and --eval-batches must be positive"),
    (MemorizingTrainConfig, {**TRAIN, "seq_len": 0}, "--seq-len and --eval-segments must be positive"),
    (MemorizingTrainConfig, {**TRAIN, "eval_fraction": 1.0}, "--eval-fraction must lie in [0, 1)"),
    (GenerateConfig, {"data": "d"}, "--checkpoint and --data (or --retrieval-url) are required"),
    (GenerateConfig, {"checkpoint": "c", "retrieval_url": "ftp://x"}, "--retrieval-url must be an http:// or https://"),
    (GenerateConfig, {"checkpoint": "c", "retrieval_url": "http://127.0.0.1:1"}, "--retrieval-url without --data needs"),
    (GenerateConfig, {**GENERATE, "device": "tpu"}, "--device must be auto, cuda or cpu"),
    (GenerateConfig, {**GENERATE, "max_tokens": 0}, "--max-tokens must be positive"),
    (GenerateConfig, {**GENERATE, "top_k": -1}, "--temperature, --top-k and --num-neighbors must not be negative"),
    (GenerateConfig, {**GENERATE, "top_p": 0}, "--top-p must lie in (0, 1]"),
    (GenerateConfig, {**GENERATE, "precision": "fp16"}, "--precision must be bf16 or fp32"),
]


@pytest.mark.parametrize("cls, values, message", CASES, ids=[f"{c.__name__}-{m[:30]}" for c, _, m in CASES])
def test_each_bad_value_names_the_option(cls, values, message):
    with pytest.raises(ValueError) as e:
        cls(**values)
    assert message in str(e.value)


def _raise_lines(cls: type) -> set[tuple[str, int]]:
    """(file, line) of every ``raise`` written in the ``__post_init__`` of ``cls`` and its bases."""
    found = set()
    for klass in cls.__mro__:
        fn = klass.__dict__.get("__post_init__")
        if fn is None:
            continue
        lines, first = inspect.getsourcelines(fn)
        tree = ast.parse(textwrap.dedent("".join(lines)))
        found |= {(inspect.getsourcefile(fn), first + node.lineno - 1) for node in ast.walk(tree)
                  if isinstance(node, ast.Raise)}
    return found


def test_every_validation_is_reached():
    """Each raise in each config's __post_init__ is hit by at least one case above."""
    reached: set[tuple[str, int]] = set()
    for cls, values, _ in CASES:
        try:
            cls(**values)
        except ValueError as e:
            tb = e.__traceback__
            while tb is not None:
                reached.add((tb.tb_frame.f_code.co_filename, tb.tb_lineno))
                tb = tb.tb_next
    for cls in (BuildConfig, ReindexConfig, RetroTrainConfig, MemorizingTrainConfig, GenerateConfig):
        missing = _raise_lines(cls) - reached
        assert not missing, f"{cls.__name__}: validations without a test case at {sorted(missing)}"
    assert _raise_lines(CommonTrainConfig) <= reached


def test_toml_values_load_and_flags_win(tmp_path):
    toml = tmp_path / "build.toml"
    toml.write_text('chunk_size = 32\nseq_len = 256\nk = 3\ncorpus = ["a", "b"]\nmetric = "ip"\n')
    cfg = parse_config(BuildConfig, argparse.ArgumentParser(), ["--config", str(toml), "--k", "5", "--metric", "l2"])
    assert (cfg.chunk_size, cfg.seq_len, cfg.corpus) == (32, 256, ["a", "b"])  # from the file
    assert (cfg.k, cfg.metric) == (5, "l2")  # the flags win
    assert cfg.text_field == "text"  # neither: the default


def test_bad_values_and_files_are_one_error_line(tmp_path, capsys):
    def exit_code(argv):
        with pytest.raises(SystemExit) as e:
            parse_config(BuildConfig, argparse.ArgumentParser(prog="python -m jobs.build_index"), argv)
        return e.value.code

    assert exit_code(["--k", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["python -m jobs.build_index: error: --k, --single-node-max-vectors and --max-query-ms must be "
                   "positive, --extra-neighbors not negative"]
    toml = tmp_path / "c.toml"
    toml.write_text("chunk_size = 64\nchunk_sise = 32\n")
    assert exit_code(["--config", str(toml)]) == 2
    assert "unknown option(s) chunk_sise" in capsys.readouterr().err
    toml.write_text("chunk_size = [")
    assert exit_code(["--config", str(toml)]) == 2
    assert "error:" in capsys.readouterr().err
    assert exit_code(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err
