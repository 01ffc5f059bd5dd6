"""The task interface: what a training job plugs into the shared loop (model, batches, loss, evaluation)."""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from pipelines.train.config import CommonTrainConfig
from pipelines.train.vocab import TokenMap


class TrainTask:
    """What a job plugs into :func:`train_loop`. One instance per worker (rank)."""

    job: str = "task"
    ablation_metric: str = "eval_loss_ablated"

    def __init__(self, cfg: CommonTrainConfig, rank: int, world: int, device: Any, extra: dict):
        self.cfg, self.rank, self.world, self.device, self.extra = cfg, rank, world, device, extra
        # --vocab corpus: the model's ids are the build's token ids renumbered (see TokenMap)
        self.vocab = TokenMap(np.asarray(extra["vocab_ids"])) if extra.get("vocab_ids") else None

    def compact(self, tokens: np.ndarray) -> np.ndarray:
        """Tokenizer ids -> the model's ids (unchanged without a corpus vocabulary)."""
        return self.vocab.to_compact(tokens) if self.vocab is not None else tokens

    def model_config_json(self) -> str:
        """The model config as JSON (stored in checkpoints; generation rebuilds the model from it)."""
        raise NotImplementedError

    def build_model(self):
        raise NotImplementedError

    def start_position(self) -> dict:
        """The data position of a fresh run (JSON-able)."""
        raise NotImplementedError

    def batches(self, position: dict) -> Iterator[tuple[Any, dict]]:
        """This rank's part of each global batch from ``position`` on, with the position after it."""
        raise NotImplementedError

    def micro_batches(self, batch: Any) -> list[Any]:
        """The micro-batches one step's batch runs as (gradient accumulation); by default the batch itself."""
        return [batch]

    def tokens_in(self, batch: Any) -> int:
        """Label tokens that count in the loss (not padding): an int, or a 0-d tensor on the device (no sync)."""
        raise NotImplementedError

    def input_tokens(self, batch: Any) -> int:
        """Token positions the model processed (for tokens/s)."""
        raise NotImplementedError

    def loss_sum(self, model, batch: Any):
        """Summed cross-entropy over this rank's batch (a scalar tensor with grad)."""
        raise NotImplementedError

    def evaluate(self, model) -> dict[str, float]:
        """Held-out losses, reduced over all ranks (every rank calls this)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Per-rank state beyond the data position (e.g. memories); tensors and plain values only."""
        return {}

    def load_state_dict(self, state: dict, saved_world: int) -> None:
        pass

    def checkpoint_extra(self) -> dict:
        """Extra entries of rank 0's model.pt: the vocabulary map, which generation needs."""
        import torch

        return {"vocab_ids": torch.from_numpy(self.vocab.ids)} if self.vocab is not None else {}

    def param_groups(self, model, lr: float) -> list[dict]:
        from models.pkm import param_groups

        return param_groups(model, lr, self.cfg.pkm_value_lr or lr, weight_decay=self.cfg.weight_decay)


def all_reduce_sum(values: list[float], device: Any) -> list[float]:
    """Sum a few floats over all ranks (identity on one rank)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
