"""Sampling from a trained RETRO checkpoint with retrieval at chunk boundaries (`python -m jobs.generate`)."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from pipelines.runtime.config import fail, option


@dataclass(kw_only=True)
class GenerateConfig:
    """Options of `python -m jobs.generate`."""

    checkpoint: str = option("", "a RETRO checkpoint folder, or the --out of jobs.train_retro (its newest checkpoint); required")
    data: str = option("", "the build to retrieve from (its LATEST index, chunks/ and encoder); required unless "
                           "--retrieval-url")
    prompt: str = option("", "text to continue; empty starts from [CLS]")
    max_tokens: int = option(64, "tokens to generate")
    temperature: float = option(1.0, "sampling temperature; 0 = greedy")
    top_k: int = option(0, "sample among the k most likely tokens; 0 = off")
    top_p: float = option(1.0, "nucleus sampling: the smallest set of tokens with this much probability; 1 = off")
    num_neighbors: int = option(0, "neighbors retrieved per chunk; 0 = the build's k")
    seed: int = option(0, "sampling seed")
    stop_at_sep: bool = option(True, "stop at the end-of-document token [SEP]")
    precision: str = option("bf16", "bf16 (autocast) or fp32")
    show_neighbors: bool = option(False, "print each retrieved neighbor's text to stderr")
    device: str = option("auto", "where the model runs: cuda, cpu, or auto (cuda when a GPU is visible)")
    cache: bool = option(True, "keep the decoder's keys and values between tokens (a token costs one position); "
                               "--no-cache recomputes the whole context for every token")
    retrieval_url: str = option("", "retrieve through a running jobs.serve service (http://host:port) instead of "
                                    "loading the index; --data is then optional (it names the tokenizer and k)")

    def __post_init__(self) -> None:
        if not self.checkpoint or not (self.data or self.retrieval_url):
            raise ValueError("--checkpoint and --data (or --retrieval-url) are required")
        if self.retrieval_url and not self.retrieval_url.startswith(("http://", "https://")):
            raise ValueError(f"--retrieval-url must be an http:// or https:// URL, got {self.retrieval_url!r}")
        if self.retrieval_url and not self.data and not self.num_neighbors:
            raise ValueError("--retrieval-url without --data needs --num-neighbors (the build's k is in its LATEST)")
        if self.max_tokens <= 0:
            raise ValueError(f"--max-tokens must be positive, got {self.max_tokens}")
        if self.temperature < 0 or self.top_k < 0 or self.num_neighbors < 0:
            raise ValueError("--temperature, --top-k and --num-neighbors must not be negative")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must lie in (0, 1], got {self.top_p}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"--precision must be bf16 or fp32, got {self.precision!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"--device must be auto, cuda or cpu, got {self.device!r}")

    def torch_device(self):
        """The torch device --device names; cuda without a visible GPU is a one-line error."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no GPU is visible to torch here")
        return torch.device(self.device)


class ChunkRetriever:
    """Chunk tokens -> k neighbors as (neighbor + continuation) tokens, through the build's encoder and index."""

    def __init__(self, data_url: str, k: int = 0):
        from pipelines.inference.query import BuildSearcher

        searcher = BuildSearcher(data_url)  # the build's reader, encoder and published index, loaded once
        self.data, self.reader, self.encoder, self.index = searcher.data, searcher.reader, searcher.encoder, searcher.index
        self.k = k or int(searcher.latest["k"])
        self.last_ids: Optional[np.ndarray] = None

    def __call__(self, chunks: np.ndarray) -> np.ndarray:
        """(n, c) chunk tokens -> (n, k, 2c) int64 neighbor tokens (pad 0 where fewer than k exist)."""
        from pipelines.train.retro import continuation_rule

        c = self.reader.chunk_size
        rows = np.concatenate([chunks, np.zeros((len(chunks), 1), chunks.dtype)], axis=1)  # the encoder drops col c
        query = self.encoder.embed(rows).astype(np.float32)
        _, ids = self.index.search(query, self.k)  # (n, k); index ids are chunk ids
        self.last_ids = ids
        valid = ids >= 0
        safe = np.where(valid, ids, 0)
        tok, doc = self.reader.gather(safe.reshape(-1))
        nxt = np.minimum(safe + 1, self.reader.n_chunks - 1)
        ntok, ndoc = self.reader.gather(nxt.reshape(-1))
        ndoc = np.where((safe + 1).reshape(-1) < self.reader.n_chunks, ndoc, -1)
        body = tok[:, :c].reshape(*ids.shape, c)
        cont = continuation_rule(doc.reshape(ids.shape), ndoc.reshape(ids.shape), ntok[:, :c].reshape(*ids.shape, c))
        out = np.concatenate([body, cont], axis=-1).astype(np.int64)
        return np.where(valid[..., None], out, 0)


def filter_logits(logits, top_k: int, top_p: float):
    """Keep the top-k tokens and/or the smallest set with cumulative probability top_p (others -inf)."""
    import torch

    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1).cumsum(-1)
        drop = probs - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


class RetroGenerator:
    """Autoregressive sampling with retrieval at chunk boundaries; ``retrievals`` records where it retrieved."""

    def __init__(self, model, retrieve: Callable[[np.ndarray], np.ndarray], *, chunk_size: int, max_seq_len: int,
                 pad_id: int = 0, sep_id: int = 102, precision: str = "bf16", vocab=None, device=None,
                 use_cache: bool = True):
        import torch

        self.device = torch.device(device or "cpu")
        self.model, self.retrieve, self.vocab = model.eval().to(self.device), retrieve, vocab  # vocab: a TokenMap
        self.c, self.max_seq_len, self.pad_id, self.sep_id = chunk_size, max_seq_len, pad_id, sep_id
        self.precision, self.use_cache = precision, use_cache
        self.retrievals: list[int] = []  # sequence length at each retrieval (the end of the chunk retrieved for)

    def _model_ids(self, tokens: np.ndarray) -> np.ndarray:
        """Tokenizer ids -> the model's ids (the same, or renumbered by a corpus vocabulary)."""
        return (self.vocab.to_compact(tokens) if self.vocab is not None else tokens).astype(np.int64)

    def _retrieve_chunk(self, tokens: list[int], end: int) -> np.ndarray:
        self.retrievals.append(end)
        return self.retrieve(np.asarray([tokens[end - self.c: end]], dtype=np.int64))[0]  # (k, 2c)

    def generate(self, prompt: list[int], max_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop_at_sep: bool = True) -> list[int]:
        import torch

        tokens = list(prompt)
        c = self.c
        retrieved = [self._retrieve_chunk(tokens, (j + 1) * c) for j in range(len(tokens) // c)]
        gen = torch.Generator().manual_seed(seed)
        cache, cache_start = None, -1
        for i in range(max_tokens):
            start = max(0, -(-(len(tokens) - self.max_seq_len) // c) * c)  # whole chunks fall off the front
            window = len(tokens) - start
            chunks = retrieved[start // c: start // c + window // c]
            ret = (torch.from_numpy(self._model_ids(np.stack(chunks)))[None].to(self.device)
                   if chunks else None)  # (1, R, k, 2c)
            if self.use_cache and cache_start != start:  # a new window: its positions restart at 0
                cache, cache_start = self.model.new_cache(), start
            fed = cache.length if self.use_cache else 0  # positions the cache already holds
            ctx = torch.from_numpy(self._model_ids(np.asarray([tokens[start + fed:]]))).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                if self.use_cache:
                    logits = self.model.extend(cache, ctx, ret)[0].float()  # (V,)
                else:
                    logits = self.model.next_token_logits(ctx, ret)[0].float()  # (V,)
            logits = logits.cpu()
            logits[self.pad_id] = float("-inf")
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
                nxt = int(torch.multinomial(probs, 1, generator=gen))
            if self.vocab is not None:
                nxt = int(self.vocab.to_full(np.asarray(nxt)))
            tokens.append(nxt)
            if stop_at_sep and nxt == self.sep_id:
                break
            if len(tokens) % c == 0 and i < max_tokens - 1:
                retrieved.append(self._retrieve_chunk(tokens, len(tokens)))
        return tokens


def load_retro(checkpoint_url: str):
    """(model, model config dict, checkpoint folder, TokenMap or None) from a checkpoint or a training --out."""
    from models.retro import RETRO
    from pipelines.train.checkpoint import load_model_checkpoint
    from pipelines.train.retro import retro_model_config
    from pipelines.train.vocab import TokenMap

    payload, folder = load_model_checkpoint(checkpoint_url, "retro")
    if payload.get("job") != "retro":
        raise ValueError(f"{folder} is a {payload.get('job')!r} checkpoint, not a RETRO one")
    cfg = json.loads(payload["model_config_json"])
    model = RETRO(retro_model_config(cfg))
    model.load_state_dict(payload["model"])
    vocab = payload.get("vocab_ids")
    return model, cfg, folder, (TokenMap(vocab.numpy()) if vocab is not None else None)


def run_generate(cfg: GenerateConfig) -> int:
    """Load the checkpoint and the build, sample ``--max-tokens`` tokens, print the text (stdout) and what was
    retrieved (stderr).

    Args:
        cfg: the sampling options (``python -m jobs.generate --help``).

    Returns:
        The process exit code (0); bad input exits with a one-line error.
    """

    from pipelines.text.tokenizer import load_tokenizer

    try:
        device = cfg.torch_device()
        model, mcfg, folder, vocab = load_retro(cfg.checkpoint)
        if cfg.retrieval_url:
            from pipelines.inference.remote_retrieval import connect_retriever

            retriever = connect_retriever(cfg.retrieval_url, cfg.data, cfg.num_neighbors, mcfg["chunk_size"])
            tok = retriever.tokenizer
        else:
            retriever = ChunkRetriever(cfg.data, cfg.num_neighbors)
            if retriever.reader.chunk_size != mcfg["chunk_size"]:
                raise ValueError(f"the model reads chunks of {mcfg['chunk_size']} tokens, the build has "
                                 f"{retriever.reader.chunk_size}")
            tok = load_tokenizer(retriever.reader.tokenizer.get("name", "packaged:all-MiniLM-L6-v2"))
        if vocab is None and tok.vocab_size > mcfg["num_tokens"]:
            raise ValueError(f"the build's tokenizer has {tok.vocab_size} tokens, the model {mcfg['num_tokens']}")
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    ids = tok.tokenizer.encode(cfg.prompt, add_special_tokens=True).ids[:-1] if cfg.prompt else [tok.cls_id]
    gen = RetroGenerator(model, retriever, chunk_size=mcfg["chunk_size"], max_seq_len=mcfg["max_seq_len"],
                         pad_id=mcfg["pad_id"], sep_id=tok.sep_id, precision=cfg.precision, vocab=vocab,
                         device=device, use_cache=cfg.cache)
    if cfg.show_neighbors:
        inner = gen.retrieve

        def show(chunks: np.ndarray) -> np.ndarray:
            got = inner(chunks)
            for j, nb in enumerate(got[0]):
                text = tok.tokenizer.decode([int(t) for t in nb if t], skip_special_tokens=True)
                print(f"  neighbor {j} (chunk {int(retriever.last_ids[0, j])}): {text}", file=sys.stderr)
            return got

        gen.retrieve = show
    out = gen.generate(ids, cfg.max_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                       seed=cfg.seed, stop_at_sep=cfg.stop_at_sep)
    print(tok.tokenizer.decode(out, skip_special_tokens=True), flush=True)
    print(f"generate: {len(out) - len(ids)} tokens from {folder}; {len(gen.retrievals)} retrievals "
          f"(k={retriever.k}) at sequence lengths {gen.retrievals}", file=sys.stderr)
    return 0
