"""Pruning baselines at equal description length: the length and its inverse, masks, hard-concrete gates."""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from momos_hf.train.pruning import (
    HardConcreteGate,
    _uniform_noise,
    apply_masks,
    kept_for_bits,
    magnitude_masks,
    sparse_description_bits,
    top_masks,
)


def brute_kept_for_bits(numel, bits, value_bits):
    return max(k for k in range(numel + 1) if sparse_description_bits(numel, k, value_bits) <= bits)


def test_kept_for_bits_is_the_largest_count_within_bits_even_past_the_length_peak():
    # With 1-bit values the length peaks near 2/3 density and falls back to numel bits when all are kept.
    assert kept_for_bits(1000, 1000, 1) == 1000
    assert kept_for_bits(1000, 999, 1) == brute_kept_for_bits(1000, 999, 1)
    for numel in (1, 2, 7, 40):
        for value_bits in (0, 0.5, 1, 2, 32):
            for bits in (0, 0.3, 1, 4, 9.5, 30, numel * value_bits - 0.01, numel * value_bits, math.inf):
                if bits >= 0:
                    assert kept_for_bits(numel, bits, value_bits) == brute_kept_for_bits(numel, bits, value_bits)
    assert kept_for_bits(0, 0) == 0 and type(kept_for_bits(100, 50.5)) is int


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((10, math.nan), ValueError, "bits must be a number >= 0, got nan"),
        ((10, -1.0), ValueError, "bits must be a number >= 0"),
        ((10, "5"), TypeError, "bits must be a number"),
        ((10, 100, -1), ValueError, "value_bits must be a finite number >= 0, got -1"),
        ((10, 100, math.inf), ValueError, "value_bits must be a finite number"),
        ((10.0, 100), TypeError, "numel must be a whole number"),
        ((True, 100), TypeError, "numel must be a whole number"),
        ((-3, 100), ValueError, "numel must be >= 0"),
    ],
)
def test_kept_for_bits_refuses_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        kept_for_bits(*args)


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((10, 2.5), TypeError, "kept must be a whole number"),
        ((10.5, 2), TypeError, "numel must be a whole number"),
        ((10, -1), ValueError, "kept must be >= 0"),
        ((4, 5), ValueError, r"kept must be in \[0, 4\]"),
        ((10, 2, -32), ValueError, "value_bits must be a finite number >= 0"),
    ],
)
def test_sparse_description_bits_refuses_fractional_counts_and_negative_value_bits(args, error, message):
    with pytest.raises(error, match=message):
        sparse_description_bits(*args)


def test_top_masks_breaks_ties_by_position_in_list_order():
    scores = [torch.tensor([1.0, 3.0, 2.0, 3.0]), torch.tensor([3.0, 3.0, 0.0])]
    masks = top_masks(scores, 3)  # four 3s: the first three by position
    assert masks[0].tolist() == [False, True, False, True] and masks[1].tolist() == [True, False, False]
    masks = top_masks([torch.zeros(1000), torch.zeros(5)], 600)
    assert masks[0][:600].all() and not masks[0][600:].any() and not masks[1].any()
    assert [m.sum().item() for m in top_masks(scores, 0)] == [0, 0]
    assert [m.sum().item() for m in top_masks(scores, 7)] == [4, 3]


def test_top_masks_ranks_by_value_not_float32_rounding():
    close = torch.tensor([1.0, 1.0 + 1e-12], dtype=torch.float64)
    assert top_masks([close], 1)[0].tolist() == [False, True]


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: top_masks([torch.tensor([1.0, math.nan, 0.5])], 1), ValueError, "scores hold 1 NaN values"),
        (lambda: magnitude_masks([torch.tensor([math.nan, 2.0])], 1), ValueError, "NaN"),
        (lambda: top_masks([], 1), ValueError, "scores is empty"),
        (lambda: magnitude_masks([], 0), ValueError, "scores is empty"),
        (lambda: top_masks([torch.ones(3)], 4), ValueError, r"kept must be in \[0, 3\]"),
        (lambda: top_masks([torch.ones(3)], -1), ValueError, "kept must be >= 0"),
        (lambda: top_masks([torch.ones(3)], 1.0), TypeError, "kept must be a whole number"),
        (lambda: top_masks([[1.0, 2.0]], 1), TypeError, "scores must be a list of tensors"),
    ],
)
def test_masks_refuse_nan_empty_and_bad_counts(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_apply_masks_refuses_mismatched_lists_and_shapes_and_changes_nothing():
    a, b = torch.ones(3), torch.ones(2, 2)
    cases = [
        ([a, b], [torch.ones(3, dtype=torch.bool)], "got 2 tensors but 1 masks"),
        ([a], [torch.zeros(1, dtype=torch.bool)], r"mask 0 must be a bool tensor of its tensor's shape \(3,\)"),
        ([a, b], [torch.ones(3, dtype=torch.bool), torch.full((2, 2), 0.5)], "mask 1 must be a bool tensor"),
    ]
    for tensors, masks, message in cases:
        with pytest.raises(ValueError, match=message):
            apply_masks(tensors, masks)
    assert a.tolist() == [1.0, 1.0, 1.0] and b.tolist() == [[1.0, 1.0], [1.0, 1.0]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hard_concrete_gate_keeps_half_precision_weights_in_their_dtype(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(8, 4).to(dtype)
    gate = HardConcreteGate(linear.weight.shape, keep=0.9, generator=torch.Generator().manual_seed(0))
    parametrize.register_parametrization(linear, "weight", gate)
    assert linear.weight.dtype == dtype and gate.log_alpha.dtype == torch.float32
    linear(torch.randn(2, 8, dtype=dtype)).float().sum().backward()
    assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0
    gate.eval()
    original = linear.parametrizations.weight.original
    torch.testing.assert_close(linear.weight, (original.float() * (0.9 * 1.2 - 0.1)).to(dtype))


def test_hard_concrete_noise_is_drawn_for_the_weights_device():
    # Without a generator the noise is drawn on the weight's device; a seeded generator draws on its own
    # device and the noise moves to the weight's, so the gates are the same on any device.
    assert _uniform_noise(torch.Size([3]), None, torch.device("meta")).device.type == "meta"
    moved = _uniform_noise(torch.Size([3]), torch.Generator().manual_seed(1), torch.device("meta"))
    assert moved.device.type == "meta"
    gate = HardConcreteGate(torch.Size([5]), generator=torch.Generator().manual_seed(1)).to("meta")
    assert gate(torch.ones(5, device="meta")).device.type == "meta"
    unseeded = HardConcreteGate(torch.Size([5])).to("meta")
    assert unseeded(torch.ones(5, device="meta")).device.type == "meta"
    cpu = _uniform_noise(torch.Size([4]), torch.Generator().manual_seed(1), torch.device("cpu"))
    assert torch.equal(cpu, torch.rand(4, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize(
    "keep, error, message",
    [
        (0.0, ValueError, "keep must be strictly between 0 and 1, got 0.0"),
        (1, ValueError, "keep must be strictly between 0 and 1, got 1"),
        (math.nan, ValueError, "keep must be strictly between 0 and 1, got nan"),
        (-0.5, ValueError, "keep must be strictly between 0 and 1"),
        ("0.9", TypeError, "keep must be a number"),
        (True, TypeError, "keep must be a number"),
    ],
)
def test_hard_concrete_gate_refuses_keep_outside_the_open_unit_interval(keep, error, message):
    with pytest.raises(error, match=message):
        HardConcreteGate(torch.Size([3]), keep=keep)
