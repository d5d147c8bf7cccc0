"""Accuracy: the fraction of examples whose predicted label equals the reference label."""

import datasets
import evaluate


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: predicted labels (int); references: true labels (int)",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("accuracy of zero examples")
        return {"accuracy": sum(p == r for p, r in zip(predictions, references)) / len(references)}
