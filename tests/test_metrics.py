"""The `evaluate` modules shipped in momos_hf.metrics load offline by path and compute what they say."""

import math

import pytest

from momos_hf.metrics import METRICS, load_metric


def test_every_metric_loads_offline():  # conftest sets HF_HUB_OFFLINE=1
    inputs = {
        "perplexity": {"loss", "tokens"},
        "accuracy": {"predictions", "references"},
        "embedding_cosine": {"predictions", "references"},
    }
    assert {name: set(load_metric(name, keep_in_memory=True).features) for name in METRICS} == inputs


def test_perplexity_weighs_every_token_the_same():
    metric = load_metric("perplexity", keep_in_memory=True)
    metric.add_batch(loss=[2.0, 9.0], tokens=[1, 3])  # 11 nats over 4 tokens
    result = metric.compute()
    assert result["eval_loss"] == pytest.approx(11 / 4) and result["perplexity"] == pytest.approx(math.exp(11 / 4))
    with pytest.raises(ValueError, match="perplexity of zero tokens"):
        load_metric("perplexity", keep_in_memory=True).compute(loss=[0.0], tokens=[0])


def test_accuracy_and_embedding_cosine():
    assert load_metric("accuracy", keep_in_memory=True).compute(predictions=[1, 2, 3, 4], references=[1, 2, 0, 4]) == {
        "accuracy": 0.75
    }
    cosine = load_metric("embedding_cosine", keep_in_memory=True).compute(
        predictions=[[1, 0], [1, 1]], references=[[2, 0], [1, -1]]
    )
    assert cosine == {"cosine": pytest.approx(0.5), "min_cosine": pytest.approx(0.0)}


def test_an_unknown_metric_is_named():
    with pytest.raises(
        ValueError, match="unknown metric 'bleu': momos_hf ships perplexity, accuracy, embedding_cosine"
    ):
        load_metric("bleu")
