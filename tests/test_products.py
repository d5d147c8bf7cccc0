"""The products (lookup table, reconstruction), how a layer picks one per call, and its override."""

import pytest
import torch

from momos_hf.kernels.products import LOOKUP_TABLE_RATIO, PRODUCTS, lookup_product, select_product
from momos_hf.layer import MoMosLinear
from momos_hf.mosaic import reconstruct


def lookup_linear(x, motifs, mosaic, scale=None):
    return lookup_product(x, motifs, mosaic, scale, 37)


def random_mosaic(out=24, inp=37, k=16, s=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    motifs = torch.randn(k, s, generator=g)
    mosaic = torch.randint(0, k, (out, -(-inp // s)), generator=g).to(torch.uint8)
    return motifs, mosaic


@pytest.mark.parametrize("shape", [(37,), (1, 37), (3, 5, 37), (40, 37)])
def test_lookup_equals_the_dense_product(shape):
    motifs, mosaic = random_mosaic()
    scale = torch.rand(24) + 0.5
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    expected = x @ reconstruct(motifs, mosaic, 37, scale).T
    torch.testing.assert_close(lookup_linear(x, motifs, mosaic, scale), expected, rtol=1e-5, atol=1e-5)


def test_lookup_gradients_match_the_dense_product():
    motifs, mosaic = random_mosaic()
    x = torch.randn(3, 37)
    grads = []
    for product in (lambda m, x: lookup_linear(x, m, mosaic), lambda m, x: x @ reconstruct(m, mosaic, 37).T):
        m, xx = motifs.clone().requires_grad_(True), x.clone().requires_grad_(True)
        product(m, xx).square().sum().backward()
        grads.append((m.grad, xx.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)


def layer(zero_motif=False):
    motifs, mosaic = random_mosaic()
    return MoMosLinear(
        37, 24, torch.nn.Parameter(motifs), mosaic, bias=torch.nn.Parameter(torch.randn(24)), zero_motif=zero_motif
    )


def test_the_selector_picks_by_device_dtype_shape_and_gradient():
    motifs, trainable = torch.empty(16, 8), torch.empty(16, 8, requires_grad=True)
    most = LOOKUP_TABLE_RATIO * 24 // 16  # rows * k <= ratio * out
    for rows, expected in ((1, "compiled_lookup"), (most, "compiled_lookup"), (most + 1, "reconstruct")):
        assert select_product(torch.empty(rows, 37), motifs, None, 24) == expected
    assert (
        select_product(torch.empty(2, 3, 37), motifs, None, 24) == "compiled_lookup"
    )  # rows count every leading dimension
    assert select_product(torch.empty(2, 37, dtype=torch.bfloat16), motifs, None, 24) == "compiled_lookup"
    assert (
        select_product(torch.empty(2, 37, dtype=torch.float64), motifs, None, 24) == "lookup"
    )  # it computes in float32
    assert select_product(torch.empty(2, 37), trainable, None, 24) == "lookup"  # no backward in the compiled one
    assert select_product(torch.empty(2, 37), motifs, torch.ones(24, requires_grad=True), 24) == "lookup"
    with torch.no_grad():
        assert select_product(torch.empty(2, 37), trainable, None, 24) == "compiled_lookup"
    assert select_product(torch.empty(1, 37), torch.empty(LOOKUP_TABLE_RATIO * 24 + 1, 8), None, 24) == "reconstruct"
    assert select_product(torch.empty(1, 37, device="meta"), motifs, None, 24) == "reconstruct"  # Triton: opt-in


def test_without_a_compiler_the_selector_keeps_the_torch_lookup(monkeypatch):
    from momos_hf.kernels import cpu

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    cpu.library.cache_clear()
    try:
        assert select_product(torch.empty(1, 37), torch.empty(16, 8), None, 24) == "lookup"
        with pytest.raises(RuntimeError, match="could not be built"):
            PRODUCTS["compiled_lookup"](torch.randn(1, 37), *random_mosaic(), None, 37)
    finally:
        cpu.library.cache_clear()


@pytest.mark.parametrize("name", list(PRODUCTS))
def test_every_product_computes_the_layer(name):
    motifs, mosaic = random_mosaic()
    scale = torch.rand(24) + 0.5
    x = torch.randn(5, 37)
    torch.testing.assert_close(
        PRODUCTS[name](x, motifs, mosaic, scale, 37),
        x @ reconstruct(motifs, mosaic, 37, scale).T,
        rtol=1e-5,
        atol=1e-5,
    )


def test_layer_uses_the_chosen_product_and_its_override(monkeypatch):
    calls = []
    monkeypatch.setitem(PRODUCTS, "lookup", lambda *a: calls.append(a) or lookup_product(*a))
    momos = layer(zero_motif=True)
    most = LOOKUP_TABLE_RATIO * 24 // 16
    for rows in (1, most, most + 1):
        x = torch.randn(rows, 37)
        expected = x @ momos.mosaic_weight().T + momos.bias
        torch.testing.assert_close(momos(x), expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2
    assert torch.equal(calls[0][1][0], torch.zeros(8))  # the zero motif reaches the lookup as zero
    momos.product = "reconstruct"  # the per-layer override
    momos(torch.randn(1, 37))
    assert len(calls) == 2
    momos.product = "lookup"
    momos(torch.randn(100, 37))
    assert len(calls) == 3


def test_cached_weight_follows_changes_and_is_skipped_with_grad():
    momos = layer()
    momos.weight_cache_enabled = True
    x = torch.randn(64, 37)
    with torch.no_grad():
        before = momos(x)
        assert momos._weight_cache is not None
        momos.motifs.mul_(2.0)  # an in-place update, as an optimizer step makes
        torch.testing.assert_close(momos(x) - momos.bias, 2 * (before - momos.bias))
        momos.set_mosaic(torch.zeros_like(momos.mosaic))
        torch.testing.assert_close(momos(x), x @ momos.mosaic_weight().T + momos.bias)
    momos(x).sum().backward()  # with grad the cache is not used: the motifs get a gradient
    assert momos.motifs.grad is not None


def test_model_cache_weights_switches_every_layer():
    from conftest import build, model_inputs

    from momos_hf import MoMosConfig, get_momos_model

    mm = get_momos_model(build("llama"), MoMosConfig(k=16, s=4))
    inputs = model_inputs("llama", batch=4, length=16)
    with torch.no_grad():
        reference = mm(**inputs).logits
        mm.cache_weights()
        torch.testing.assert_close(mm(**inputs).logits, reference, rtol=1e-5, atol=1e-5)
        assert all(layer._weight_cache is not None for layer in mm.momos_layers().values())
        mm.cache_weights(False)
        assert all(
            layer._weight_cache is None and not layer.weight_cache_enabled for layer in mm.momos_layers().values()
        )


def test_a_mosaic_index_beyond_k_is_refused_before_a_product_reads_it():
    """The compiled products read motifs at the mosaic's offsets unchecked, so the layer checks them once."""
    motifs, mosaic = random_mosaic()  # k=16
    bad = mosaic.clone()
    bad[0, 0] = 16
    with pytest.raises(ValueError, match=r"mosaic holds indices \d+\.\.16 but the layer has k=16 motifs"):
        MoMosLinear(37, 24, torch.nn.Parameter(motifs), bad)
    momos = MoMosLinear(37, 24, torch.nn.Parameter(motifs), mosaic)
    with pytest.raises(ValueError, match=r"indices -1\.\.-1 but the layer has k=16"):
        momos.set_mosaic(torch.full(mosaic.shape, -1))
    assert torch.equal(momos.mosaic, mosaic)  # nothing changed
    full = torch.tensor([[0, 255]], dtype=torch.uint8)  # k=256 uses the whole uint8 range
    MoMosLinear(2, 1, torch.nn.Parameter(torch.randn(256, 1)), full).set_mosaic(full)


@pytest.mark.parametrize("name", list(PRODUCTS))
def test_a_mosaic_assigned_or_edited_directly_is_checked_before_a_product_reads_it(name):
    """`layer.mosaic = ...` and in-place edits bypass `set_mosaic`: the layer checks the mosaic at the product."""
    motifs, mosaic = random_mosaic()  # k=16
    momos = MoMosLinear(37, 24, torch.nn.Parameter(motifs), mosaic)
    momos.product = name
    x = torch.randn(2, 37)
    bad = mosaic.clone()
    bad[3, 1] = 200
    momos.mosaic = bad
    with torch.no_grad(), pytest.raises(ValueError, match=r"mosaic holds indices 0\.\.200 but the layer has k=16"):
        momos(x)
    momos.mosaic = mosaic.long()
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match=r"mosaic is torch.int64 \(24, 5\), the layer needs torch.uint8"),
    ):
        momos(x)
    momos.set_mosaic(mosaic)
    if not name.startswith("triton"):  # those run on the triton interpreter (slow); the check precedes any product
        with torch.no_grad():
            torch.testing.assert_close(momos(x), x @ momos.mosaic_weight().T, rtol=1e-5, atol=1e-5)
    momos.mosaic[0, 0] = 16  # in place: a new version of the same tensor
    with torch.no_grad(), pytest.raises(ValueError, match=r"indices 0\.\.16 but the layer has k=16"):
        momos(x)


def test_the_16_bit_lookup_does_not_overflow_before_the_row_scale():
    """The sums over a row's blocks come before its scale: in float16 they overflowed to inf (and inf * 0 = NaN
    where the scale is 0) while the scaled result is finite."""
    g = torch.Generator().manual_seed(0)
    motifs = (torch.randn(16, 8, generator=g) * 30).half()
    mosaic = torch.randint(0, 16, (6, 8), generator=g).to(torch.uint8)
    scale = torch.rand(6, generator=g).half()
    scale[0] = 0
    x = (torch.randn(3, 64, generator=g) * 300).half()
    y = lookup_product(x, motifs, mosaic, scale, 64)
    exact = x.double() @ reconstruct(motifs.double(), mosaic, 64, scale.double()).T
    assert y.dtype == torch.float16 and torch.isfinite(y).all() and torch.equal(y[:, 0], torch.zeros(3).half())
    assert ((y.double() - exact).abs().max() / exact.abs().max()).item() < 1e-3


def test_a_mosaic_made_under_inference_mode_is_checked_too():
    """Inference tensors have no version counter: the check keys on the tensor alone for them."""
    motifs, mosaic = random_mosaic()
    x = torch.randn(2, 37)
    with torch.inference_mode():
        momos = MoMosLinear(37, 24, torch.nn.Parameter(motifs), mosaic.clone())
        torch.testing.assert_close(momos(x), x @ momos.mosaic_weight().T, rtol=1e-5, atol=1e-5)
        momos.mosaic = torch.full_like(mosaic, 16)
    with torch.no_grad(), pytest.raises(ValueError, match=r"indices 16\.\.16 but the layer has k=16"):
        momos(x)
