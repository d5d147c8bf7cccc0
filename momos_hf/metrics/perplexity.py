"""Perplexity of a language model from its token losses: `exp(sum of losses / number of tokens)`, every token
weighing the same whatever the length of its sequence. Inputs per example: `loss`, the summed negative
log-likelihood (nats) of its predicted tokens, and `tokens`, how many there were."""

import math

import datasets
import evaluate


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="loss: summed token NLL of each example (nats); tokens: its number of predicted tokens",
            features=datasets.Features({"loss": datasets.Value("float64"), "tokens": datasets.Value("int64")}),
        )

    def _compute(self, loss, tokens):
        total = sum(tokens)
        if total == 0:
            raise ValueError("perplexity of zero tokens")
        mean = sum(loss) / total
        return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": total}
