"""The metrics the recipe and benchmarks report, as `evaluate` modules shipped in the package and loaded by
path, so they work offline (`evaluate.load("accuracy")` fetches a script from the Hub):

    from momos_hf.metrics import load_metric
    perplexity = load_metric("perplexity")   # summed token losses and token counts -> eval_loss, perplexity
    accuracy = load_metric("accuracy")       # predicted and true labels -> accuracy
    cosine = load_metric("embedding_cosine")  # embeddings and reference embeddings -> mean cosine similarity
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import evaluate
import torch

METRICS = ("perplexity", "accuracy", "embedding_cosine")
__all__ = ["METRICS", "load_metric", "token_losses", "window_perplexity"]


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """The `evaluate` module `name` (one of `METRICS`) from this package; `kwargs` go to `evaluate.load`
    (`num_process`/`process_id` for distributed evaluation, `experiment_id`, ...)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}: momos_hf ships {', '.join(METRICS)}")
    return evaluate.load(str(Path(__file__).with_name(f"{name}.py")), **kwargs)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example of a causal LM batch: the summed NLL of its predicted tokens (position t predicts label t+1;
    labels of -100 are skipped) and their number, the inputs of the `perplexity` metric."""
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none"
    ).view_as(targets)
    counted = targets != -100
    return (nll * counted).sum(1), counted.sum(1)


@torch.no_grad()
def window_perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int = 8) -> float:
    """Token-weighted perplexity of next-token prediction over `windows` (`[n, length]` token ids, each window
    on its own), through the `perplexity` metric."""
    metric = load_metric("perplexity", keep_in_memory=True)
    for rows in windows.split(batch):
        losses, tokens = token_losses(model(input_ids=rows).logits, rows)
        metric.add_batch(loss=losses.tolist(), tokens=tokens.tolist())
    return metric.compute()["perplexity"]
