"""Fine-tuning after conversion: the top-token KL and training the converted model towards the dense one."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import build

from momos_hf import MoMosConfig, get_momos_model
from momos_hf.train.distill import finetune_to_teacher, teacher_targets, top_kl, tuned_parameters, windows_of


def random_logits(seed, shape=(6, 40)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_top_kl_is_the_full_kl_with_every_token_and_a_lower_bound_with_fewer():
    student, teacher = random_logits(0), random_logits(1)
    full = (
        F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none")
        .sum(-1)
        .mean()
    )
    for top, check in (
        (40, lambda kl: torch.testing.assert_close(kl, full, atol=1e-5, rtol=1e-5)),
        (8, lambda kl: 0 < kl < full),
    ):
        values, ids = F.log_softmax(teacher, -1).topk(top, -1)
        check(top_kl(student, ids, values))
    values, ids = F.log_softmax(teacher, -1).topk(8, -1)
    assert abs(float(top_kl(teacher, ids, values))) < 1e-5  # the teacher against itself
    mask = torch.tensor([1, 1, 0, 0, 0, 0])
    torch.testing.assert_close(top_kl(student, ids, values, mask), top_kl(student[:2], ids[:2], values[:2]))


def calibration(n=8, length=16, seed=0):
    ids = torch.randint(1, 96, (n, length), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids[i : i + 4], "attention_mask": torch.ones_like(ids[i : i + 4])} for i in range(0, n, 4)]


def kl_to(model, targets):
    with torch.no_grad():
        return sum(
            float(top_kl(model(**w).logits[0], i, p)) for w, i, p in zip(targets.inputs, targets.ids, targets.logprobs)
        ) / len(targets)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fine_tuning_moves_the_converted_model_towards_the_dense_one(arch):
    dense = build(arch).to(torch.bfloat16)
    with torch.no_grad():  # random blocks barely touch the residual stream: larger ones make conversion matter
        for name, param in dense.named_parameters():
            if param.dim() == 2 and (".0." in name or ".1." in name):
                param.mul_(10)
    batches = calibration()
    targets = teacher_targets(dense, batches, top=16)
    assert len(targets) == 8 and targets.ids[0].shape == (16, 16) and targets.ids[0].dtype == torch.int32
    model = copy.deepcopy(dense)
    mm = get_momos_model(model, MoMosConfig(k=8, s=4, scale=True, fit="data-aware"), batches)
    tuned = {id(p) for p in tuned_parameters(mm.base_model)}
    before = {n: p.detach().clone() for n, p in mm.base_model.named_parameters()}
    mosaics = {n: layer.mosaic.clone() for n, layer in mm.momos_layers().items()}
    grads = {n: p.requires_grad for n, p in mm.base_model.named_parameters()}
    start = kl_to(mm.base_model, targets)
    losses = finetune_to_teacher(mm, targets, steps=24, lr=3e-3, progress=False)
    assert len(losses) == 24
    assert kl_to(mm.base_model, targets) < 0.8 * start  # measured 0.66x (llama), 0.52x (gpt2)
    changed = {n for n, p in mm.base_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= {n for n, p in mm.base_model.named_parameters() if id(p) in tuned}
    assert any("norm" in n or "ln_" in n for n in changed) and any(n.endswith("motifs") for n in changed)
    assert all(p.dtype == torch.bfloat16 for p in mm.base_model.parameters())
    assert {n: p.requires_grad for n, p in mm.base_model.named_parameters()} == grads
    assert all(torch.equal(layer.mosaic, mosaics[n]) for n, layer in mm.momos_layers().items())


def test_fine_tuning_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="no logits"):
        teacher_targets(build("bert"), calibration())
    with pytest.raises(ValueError, match="holds no tensors"):
        windows_of([{"text": "a line"}])
    targets = teacher_targets(build("llama"), calibration(4))
    with pytest.raises(ValueError, match="at least one step"):
        finetune_to_teacher(build("llama"), targets, steps=0)
    for lr in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive number"):
            finetune_to_teacher(build("llama"), targets, steps=1, lr=lr)
    ste = get_momos_model(build("llama"), MoMosConfig(k=8, s=4, train_mode="ste"))
    with pytest.raises(ValueError, match="train_mode 'motifs'"):
        finetune_to_teacher(ste, targets, steps=1)


def test_a_diverging_fine_tune_stops_and_leaves_the_model_as_it_was():
    targets = teacher_targets(build("llama"), calibration(4))
    mm = get_momos_model(build("llama"), MoMosConfig(k=8, s=4, scale=True))
    before = {n: p.detach().clone() for n, p in mm.base_model.named_parameters()}
    with pytest.raises(ValueError, match="diverged"):
        finetune_to_teacher(mm, targets, steps=8, lr=1e30, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in mm.base_model.named_parameters())


def test_windows_that_are_all_padding_are_left_out():
    batches = calibration(4)
    batches[0]["attention_mask"][1] = 0
    assert len(teacher_targets(build("llama"), batches)) == 3


def test_windows_of_splits_batches_into_single_windows():
    windows = windows_of(calibration(8))
    assert len(windows) == 8 and all(w["input_ids"].shape == (1, 16) for w in windows)
    torch.testing.assert_close(
        torch.cat([w["input_ids"] for w in windows]), torch.cat([b["input_ids"] for b in calibration(8)])
    )
