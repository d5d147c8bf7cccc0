import pytest
import torch

from momos_hf.fit.weight_space import FitOptions, assign, fit_weight_space, kmeans, least_squares_scale, sample_motifs
from momos_hf.mosaic import index_bits, index_dtype, padding_weights, reconstruct, relative_error, to_blocks


def gaussian(rows, cols, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "k, bits, dtype",
    [
        (1, 0, torch.uint8),
        (2, 1, torch.uint8),
        (256, 8, torch.uint8),
        (257, 9, torch.uint16),
        (65536, 16, torch.uint16),
        (65537, 17, torch.int32),
    ],
)
def test_index_width(k, bits, dtype):
    assert index_bits(k) == bits
    assert index_dtype(k) == dtype


def test_blocks_pad_rows_and_reconstruct_drops_padding():
    weight = torch.arange(2 * 10, dtype=torch.float32).reshape(2, 10)
    blocks = to_blocks(weight, 4)
    assert blocks.shape == (6, 4)
    assert blocks[2].tolist() == [8.0, 9.0, 0.0, 0.0]  # last block of row 0 is padded
    identity = torch.arange(6).reshape(2, 3)
    assert torch.equal(reconstruct(blocks, identity, 10), weight)
    mask = padding_weights(2, 10, 4)
    assert mask[2].tolist() == [1.0, 1.0, 0.0, 0.0] and mask.sum() == 20
    assert padding_weights(2, 12, 4) is None


@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_assignment_equals_brute_force(weighted):
    blocks, motifs = gaussian(1000, 8, 1), gaussian(37, 8, 2)
    weights = torch.rand(1000, 8, generator=torch.Generator().manual_seed(3)) if weighted else None
    w = torch.ones_like(blocks) if weights is None else weights
    brute = (w[:, None, :] * (blocks[:, None, :] - motifs[None]).square()).sum(-1)
    index, distance = assign(blocks, motifs, weights, max_bytes=4 * 37 * 2 * 7)  # chunks of 7 blocks
    assert torch.equal(index, brute.argmin(1))
    torch.testing.assert_close(distance, brute.min(1).values, rtol=1e-4, atol=1e-4)
    whole, _ = assign(blocks, motifs, weights, max_bytes=2**30)
    assert torch.equal(index, whole)


def test_padding_never_pulls_on_motifs():
    # Rows of width 6 with s=4: every second block is [x, y, pad, pad]. With k equal to the number of
    # distinct real blocks the fit must be exact on real values, whatever the padded motif values are.
    row = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    weight = torch.stack([row, -row, row, -row])
    fit = fit_weight_space([weight], FitOptions(k=4, s=4, iters=5))
    assert relative_error(weight, reconstruct(fit.motifs, fit.mosaics[0], 6)) < 1e-10


def test_kmeans_is_deterministic_and_handles_duplicates():
    blocks = torch.cat([torch.zeros(500, 4), torch.ones(500, 4), gaussian(24, 4)])  # 26 distinct blocks
    a = kmeans(blocks, 32, 10, torch.Generator().manual_seed(0))
    b = kmeans(blocks, 32, 10, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()
    index, distance = assign(blocks, a)
    assert distance.max() < 1e-6  # more motifs than distinct blocks: every block is represented exactly


def test_zero_motif_stays_zero():
    motifs = kmeans(gaussian(2000, 4), 16, 5, torch.Generator().manual_seed(0), zero_motif=True)
    assert torch.equal(motifs[0], torch.zeros(4))
    sampled = sample_motifs(gaussian(100, 4), 8, torch.Generator().manual_seed(0), zero_motif=True)
    assert sampled.shape == (8, 4) and torch.equal(sampled[0], torch.zeros(4))


def test_kmeans_beats_sampling_and_error_falls_with_k():
    weight = gaussian(256, 256)
    errors = {}
    for init in ("sample", "kmeans"):
        for k in (16, 64, 256):
            fit = fit_weight_space([weight], FitOptions(k=k, s=4, iters=10), sampled=init == "sample")
            errors[init, k] = relative_error(weight, reconstruct(fit.motifs, fit.mosaics[0], 256))
    for k in (16, 64, 256):
        assert errors["kmeans", k] < errors["sample", k]
    for init in ("sample", "kmeans"):
        assert errors[init, 16] > errors[init, 64] > errors[init, 256]


def test_gaussian_error_is_near_the_rate_distortion_bound():
    # 2 bits/weight (k=256, s=4): the bound is 2^-4 = 0.0625; MOMOS.md measured 0.092 with 15 Lloyd steps.
    weight = gaussian(512, 512)
    fit = fit_weight_space([weight], FitOptions(k=256, s=4, iters=15))
    error = relative_error(weight, reconstruct(fit.motifs, fit.mosaics[0], 512))
    assert 0.0625 < error < 0.105


def test_shared_dictionary_over_matrices_of_different_widths():
    a, b = gaussian(16, 20, 1), gaussian(8, 13, 2)
    fit = fit_weight_space([a, b], FitOptions(k=32, s=4, iters=3))
    assert [m.shape for m in fit.mosaics] == [(16, 5), (8, 4)]
    assert fit.mosaics[0].dtype == torch.uint8
    assert relative_error(b, reconstruct(fit.motifs, fit.mosaics[1], 13)) < 0.5


def test_row_scales_keep_small_rows_accurate():
    # Without scales the motifs serve the large rows and the small ones are lost; every output matters.
    weight = gaussian(64, 64) * torch.logspace(-2, 2, 64).unsqueeze(1)

    def mean_row_error(fit):
        approx = reconstruct(fit.motifs, fit.mosaics[0], 64, fit.scales[0])
        return float(((weight - approx).square().sum(1) / weight.square().sum(1)).mean())

    plain = mean_row_error(fit_weight_space([weight], FitOptions(k=32, s=4, iters=10)))
    scaled = mean_row_error(fit_weight_space([weight], FitOptions(k=32, s=4, iters=10, scale=True)))
    assert scaled < 0.5 and plain > 2 * scaled


def test_least_squares_scale():
    unscaled = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    matrix = torch.tensor([[3.0, 6.0], [1.0, 1.0]])
    assert least_squares_scale(matrix, unscaled).tolist() == [3.0, 1.0]


def test_k_larger_than_blocks_is_refused():
    with pytest.raises(ValueError, match="k=9 motifs exceed the 8 blocks"):
        fit_weight_space([gaussian(4, 8)], FitOptions(k=9, s=4))
