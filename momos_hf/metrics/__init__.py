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

METRICS = ("perplexity", "accuracy", "embedding_cosine")


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """The `evaluate` module `name` (one of `METRICS`) from this package; `kwargs` go to `evaluate.load`
    (`num_process`/`process_id` for distributed evaluation, `experiment_id`, ...)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}: momos_hf ships {', '.join(METRICS)}")
    return evaluate.load(str(Path(__file__).with_name(f"{name}.py")), **kwargs)
