"""Mean cosine similarity between embeddings and reference embeddings (a compressed encoder's sentence
embeddings against the dense encoder's, say), with its minimum."""

import datasets
import evaluate
import numpy as np


class EmbeddingCosine(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: embedding vectors; references: the reference vectors, same length",
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("float32")),
                }
            ),
        )

    def _compute(self, predictions, references):
        a, b = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
        if a.shape != b.shape or a.ndim != 2 or not len(a):
            raise ValueError(
                f"embeddings and references must be matching non-empty lists of vectors, got {a.shape} and {b.shape}"
            )
        cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        return {"cosine": float(cosine.mean()), "min_cosine": float(cosine.min())}
