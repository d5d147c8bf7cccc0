"""Which modules a conversion targets by default (output heads left out) and what it says when none fits."""

import pytest
import torch
from conftest import build
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, ResNetConfig, ResNetForImageClassification

from momos_hf import MoMosConfig, get_momos_model
from momos_hf.convert.targets import find_targets


class BlocksWithAClassifier(nn.Module):
    """A stack of blocks (an `nn.ModuleList`) and a ResNet-style `nn.Sequential(nn.Flatten(), nn.Linear)` head."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.ReLU()) for _ in range(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32, 4))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.classifier(x)


def test_the_default_targets_leave_classifier_heads_out():
    torch.manual_seed(0)
    model = BlocksWithAClassifier()
    assert find_targets(model, None) == ["blocks.0.0", "blocks.1.0"]
    assert find_targets(model, "all-linear") == ["blocks.0.0", "blocks.1.0", "classifier.1"]  # asked for
    x = torch.randn(3, 32)
    head = model.classifier[1].weight.detach().clone()
    converted = get_momos_model(model, MoMosConfig(k=8, s=4)).base_model
    assert type(converted.classifier[1]) is nn.Linear and torch.equal(converted.classifier[1].weight, head)
    assert converted(x).shape == (3, 4)
    resnet = ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    )
    assert "classifier.1" in find_targets(resnet, "all-linear")
    with pytest.raises(ValueError, match="default target_modules"):  # its only linear layer is the head
        find_targets(resnet, None)
    bert = build("bert")
    classifier = BertForSequenceClassification(BertConfig(**{**bert.config.to_dict(), "num_labels": 3}))
    targets = find_targets(classifier, None)
    assert targets and all(name.startswith("bert.encoder.layer.") for name in targets)


def test_the_no_target_error_suggests_all_linear_and_a_regex():
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))  # no blocks: its last layer is the head
    with pytest.raises(ValueError) as refused:
        get_momos_model(mlp, MoMosConfig(k=8, s=4))
    message = str(refused.value)
    assert "\n" not in message and message.startswith("the default target_modules")
    for hint in ("target_modules='all-linear'", "--target_modules all-linear", "--target_regex REGEX"):
        assert hint in message
    assert type(mlp[2]) is nn.Linear  # refused: nothing replaced
    with pytest.raises(ValueError, match=r"^target_modules='nothing_here\.\*' selects no .*'all-linear'"):
        find_targets(build("llama"), "nothing_here.*")
