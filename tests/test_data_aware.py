"""Data-aware fitting: the math (output error, feedback, exact motifs) and `calibration_data` end to end."""

import pytest
import torch
from conftest import ARCHITECTURES, build, main_output, model_inputs

from momos_hf import MoMosConfig, get_momos_model
from momos_hf.convert.calibration import input_moments
from momos_hf.fit.data_aware import (
    assign_with_feedback,
    fit_data_aware,
    inverse_cholesky,
    output_error,
    prepare_moment,
    solve_motifs,
)
from momos_hf.fit.weight_space import FitOptions, assign, fit_weight_space, kmeans
from momos_hf.mosaic import reconstruct, to_blocks


def correlated_layer(out=48, inp=64, tokens=2048, seed=0):
    """A weight and the second moment of correlated, unevenly scaled inputs (as real activations are)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(inp) + 2 * torch.randn(inp, inp, generator=g) / inp**0.5
    x = torch.randn(tokens, inp, generator=g) @ mix * (3 * torch.rand(inp, generator=g))
    return torch.randn(out, inp, generator=g) * 0.05, x.T @ x / tokens


def test_inverse_cholesky_factors_the_inverse():
    _, h = correlated_layer()
    upper = inverse_cholesky(prepare_moment(h, 4))
    assert torch.equal(upper, upper.triu())
    assert upper.dtype == torch.float32  # factorised in float64, used in float32
    torch.testing.assert_close(
        upper.double().T @ upper.double(), torch.linalg.inv(prepare_moment(h, 4).double()), rtol=1e-4, atol=1e-5
    )


def test_inverse_cholesky_falls_back_to_float64_when_float32_fails():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(40, 3, generator=g, dtype=torch.float64)
    h = (v @ v.T + 1e-6 * torch.eye(40, dtype=torch.float64)).float()  # undamped, cond 1e8: float32 breaks down
    assert torch.linalg.cholesky_ex(h)[1] != 0
    upper = inverse_cholesky(h)
    assert upper.dtype == torch.float32 and torch.isfinite(upper).all()
    assert torch.equal(upper, inverse_cholesky(h.double()).float())  # the float64 factor, rounded


def test_prepare_moment_pads_normalises_and_revives_dead_columns():
    _, h = correlated_layer(inp=30)
    h[:, 3] = h[3, :] = 0.0  # an input that is always zero
    p = prepare_moment(h, 8)
    assert p.shape == (32, 32) and p.dtype == torch.float32
    assert p[3, 3] > 1.0 and p[31, 31] < 1e-5  # dead column gets weight 1 (+ damping); padding almost none
    assert abs(float(p.diagonal()[:30].mean()) - 1.03) < 0.05


@pytest.mark.parametrize("s, k", [(4, 64), (8, 32)])
def test_data_aware_beats_kmeans_on_output_error_and_kmeans_wins_on_weight_error(s, k):
    w, h = correlated_layer()
    km = fit_weight_space([w], FitOptions(k=k, s=s, iters=10, seed=0))
    da = fit_data_aware([w], [h], FitOptions(k=k, s=s, iters=10, seed=0))
    w_km = reconstruct(km.motifs, km.mosaics[0], w.shape[1])
    w_da = reconstruct(da.motifs, da.mosaics[0], w.shape[1])
    assert output_error(w, w_da, h) < 0.7 * output_error(w, w_km, h)
    assert (w - w_km).square().sum() < (w - w_da).square().sum()  # it trades weight error for output error


def test_error_feedback_lowers_the_output_error_for_the_same_motifs():
    w, h = correlated_layer()
    s = 4
    p = prepare_moment(h, s)
    motifs = kmeans(to_blocks(w, s), 32, 5, torch.Generator().manual_seed(0)).double()
    plain = assign(to_blocks(w, s), motifs.float())[0].reshape(w.shape[0], -1)
    feedback = assign_with_feedback(w, motifs, inverse_cholesky(p))
    assert feedback.shape == plain.shape
    assert output_error(w, reconstruct(motifs, feedback, 64), p) < 0.8 * output_error(
        w, reconstruct(motifs, plain, 64), p
    )


def test_lazy_feedback_groups_give_the_mosaic_of_immediate_feedback():
    w, h = correlated_layer(out=32, inp=200)
    s = 8
    p = prepare_moment(h, s)
    padded = torch.nn.functional.pad(w, (0, p.shape[0] - w.shape[1]))
    motifs = kmeans(to_blocks(padded, s), 32, 5, torch.Generator().manual_seed(0))
    immediate = assign_with_feedback(padded.double(), motifs.double(), inverse_cholesky(p).double(), group=s)
    for group in (16, 56, 128, 1024):  # several groups, a group that does not divide the width, one group
        assert torch.equal(
            assign_with_feedback(padded.double(), motifs.double(), inverse_cholesky(p).double(), group=group),
            immediate,
        )


def test_solved_motifs_are_the_exact_minimiser():
    w, h = correlated_layer(out=16, inp=24)
    s, k = 4, 8
    p = prepare_moment(h, s).double()
    mosaic = torch.randint(0, k, (16, 6), generator=torch.Generator().manual_seed(1))
    start = torch.randn(k, s, dtype=torch.float64)
    solved = solve_motifs(start, [w.double()], [mosaic], [p], iters=k * s).requires_grad_(True)
    loss = ((w.double() - reconstruct(solved, mosaic, 24)) @ p * (w.double() - reconstruct(solved, mosaic, 24))).sum()
    loss.backward()
    assert solved.grad.abs().max() < 1e-6 * loss.item()
    assert loss.item() < output_error(w, reconstruct(start, mosaic, 24), p)


def test_float32_solve_reaches_the_float64_output_error():
    w, h = correlated_layer()
    s, k = 4, 32
    p = prepare_moment(h, s)
    motifs = kmeans(to_blocks(w, s), k, 5, torch.Generator().manual_seed(0))
    mosaic = assign_with_feedback(w, motifs, inverse_cholesky(p))
    single = solve_motifs(motifs, [w], [mosaic], [p])
    double = solve_motifs(motifs.double(), [w.double()], [mosaic], [p.double()])
    assert single.dtype == torch.float32 and double.dtype == torch.float64
    errors = [output_error(w, reconstruct(m, mosaic, 64), p) for m in (single, double, motifs)]
    assert abs(errors[0] - errors[1]) < 1e-5 * errors[1] and errors[1] < 0.95 * errors[2]


def test_padding_zero_motif_scales_and_shared_dictionary():
    w1, h1 = correlated_layer(out=20, inp=30, seed=1)
    w2, h2 = correlated_layer(out=12, inp=64, seed=2)
    fit = fit_data_aware([w1, w2], [h1, h2], FitOptions(k=16, s=8, iters=5, seed=0, zero_motif=True, scale=True))
    assert fit.motifs.shape == (16, 8) and torch.equal(fit.motifs[0], torch.zeros(8))
    assert [m.shape for m in fit.mosaics] == [(20, 4), (12, 8)] and fit.mosaics[0].dtype == torch.uint8
    assert [s.shape for s in fit.scales] == [(20,), (12,)]
    assert all(bool((s > 0).all()) for s in fit.scales)
    with pytest.raises(ValueError, match="exceed the 80 blocks"):
        fit_data_aware([w1], [h1], FitOptions(k=81, s=8))


def test_second_moments_skip_padding_positions():
    model = build("bert")
    ids = torch.randint(1, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    name = "encoder.layer.0.intermediate.dense"
    padded = input_moments(model, [name], [{"input_ids": ids, "attention_mask": mask}])[name]
    rows = []
    hook = model.get_submodule(name).register_forward_pre_hook(lambda m, a: rows.append(a[0][mask.bool()]))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    hook.remove()
    x = rows[0]
    torch.testing.assert_close(padded, x.T @ x / 16)
    assert model.training is False


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_moments_are_each_layers_own_with_shared_products_and_no_head(arch):
    """Layers reading one tensor (q/k/v, gate/up) share a product, and the head is skipped: the moments are
    still exactly each layer's `X^T X / rows` from a full forward."""
    model = build(arch)
    names = [
        name
        for name, module in model.named_modules()
        if ".0." in name and not list(module.children()) and type(module).__name__ in ("Linear", "Conv1D")
    ]
    inputs = model_inputs(arch)
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, a, n=name: rows[n].append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for name in names
    ]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    head_calls = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: head_calls.append(1))
    moments = input_moments(model, names, [inputs, inputs])
    assert head_calls == []
    for name in names:
        x = rows[name][0]
        torch.testing.assert_close(moments[name], x.T @ x / x.shape[0])
    if arch == "llama":
        q, k = (moments[f"model.layers.0.self_attn.{p}_proj"] for p in "qk")
        assert torch.equal(q, k)
    head = input_moments(model, ["lm_head"], [inputs])["lm_head"]  # the head as a target runs
    assert head_calls == [1] and head.shape == (32, 32)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_calibrated_conversion_tracks_the_dense_model_better(arch):
    dense = build(arch)
    calibration = [model_inputs(arch, batch=4, length=16, seed=i) for i in range(4)]
    held_out = model_inputs(arch, batch=4, length=16, seed=99)
    with torch.no_grad():
        reference = main_output(dense(**held_out))
        errors = {}
        for init in ("kmeans", "data-aware"):
            mm = get_momos_model(
                build(arch),
                MoMosConfig(k=32, s=4, fit=init),
                calibration_data=calibration if init == "data-aware" else None,
            )
            errors[init] = float((main_output(mm(**held_out)) - reference).square().mean())
    assert errors["data-aware"] < 0.9 * errors["kmeans"], errors


def test_calibration_errors_are_clear():
    with pytest.raises(ValueError, match="needs calibration_data"):
        get_momos_model(build("llama"), MoMosConfig(k=8, s=4, fit="data-aware"))
    with pytest.raises(ValueError, match="only used by fit='data-aware'"):
        get_momos_model(build("llama"), MoMosConfig(k=8, s=4), calibration_data=[model_inputs("llama")])
    with pytest.raises(ValueError, match="never reached"):
        get_momos_model(build("llama"), MoMosConfig(k=8, s=4, fit="data-aware"), calibration_data=[])


def test_projection_reuses_the_calibration_of_the_conversion():
    calibration = [model_inputs("llama", batch=4, seed=i) for i in range(2)]
    mm = get_momos_model(
        build("llama"),
        MoMosConfig(k=16, s=4, fit="data-aware", train_mode="projected", motif_scope="global"),
        calibration_data=calibration,
    )
    layer = next(iter(mm.momos_layers().values()))
    with torch.no_grad():
        layer.latent.mul_(1.1)
    errors = mm.project()
    assert set(errors) == set(mm.momos_layers()) and all(0 < e < 1 for e in errors.values())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_sequential_conversion_calibrates_each_block_on_the_converted_ones(arch, tmp_path, monkeypatch):
    from momos_hf.convert import calibration

    held = []  # how many moments each recorder holds at once
    real_init = calibration.MomentRecorder.__init__

    def counting_init(self, modules):
        held.append(len(modules))
        real_init(self, modules)

    monkeypatch.setattr(calibration.MomentRecorder, "__init__", counting_init)
    batches = [model_inputs(arch, batch=4, length=16, seed=i) for i in range(4)]
    config = MoMosConfig(
        k=16, s=4, fit="data-aware", train_mode="ste"
    )  # ste: mosaic forward, layers keep their moment
    joint = get_momos_model(build(arch), config, calibration_data=batches)
    held.clear()
    offload = tmp_path / "offload"
    offload.mkdir()
    mm = get_momos_model(
        build(arch),
        config,
        calibration_data=batches,
        sequential=True,
        activation_budget_bytes=0,
        offload_folder=str(offload),
    )
    layers = mm.momos_layers()
    per_block = max(sum(f".{i}." in n for n in layers) for i in range(2))
    assert held and max(held) == per_block < len(layers)  # one block's moments at a time
    assert list(offload.iterdir()) == []  # hidden states went to disk (budget 0) and were removed
    names = list(layers)
    first, second = names[0], next(n for n in names if ".1." in n)
    torch.testing.assert_close(
        layers[first].motifs, joint.momos_layers()[first].motifs
    )  # the same inputs, the same fit
    # Block 1 saw the outputs of converted block 0: its moment is what the converted model feeds it, not the dense one.
    converted_moment = input_moments(mm.base_model, [second], batches)[second]
    dense_moment = input_moments(build(arch), [second], batches)[second]
    torch.testing.assert_close(layers[second].input_moment, converted_moment, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(layers[second].input_moment, dense_moment, rtol=1e-3)
    in_memory = get_momos_model(build(arch), config, calibration_data=batches, sequential=True)
    for name, layer in in_memory.momos_layers().items():  # offloading changes nothing
        assert torch.equal(layer.motifs, layers[name].motifs) and torch.equal(layer.mosaic, layers[name].mosaic)


def test_calibration_runs_under_inference_mode():
    model, inputs = build("llama"), model_inputs("llama")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    expected = input_moments(model, names, [inputs])
    with torch.inference_mode():
        moments = input_moments(model, names, [inputs])
    for name in names:
        torch.testing.assert_close(moments[name], expected[name])


def test_a_stack_whose_blocks_run_more_than_once_is_refused():
    from transformers import AlbertConfig, AlbertModel

    torch.manual_seed(0)
    albert = AlbertModel(
        AlbertConfig(
            vocab_size=96,
            embedding_size=16,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
    ).eval()
    with pytest.raises(ValueError, match="run \\[3\\] times per forward"):
        get_momos_model(albert, MoMosConfig(k=8, s=4, fit="data-aware"), [model_inputs("bert")], sequential=True)


def test_sequential_conversion_refuses_what_it_cannot_do(monkeypatch):
    from momos_hf.convert import Converter
    from momos_hf.layer import momos_layers

    model = build("llama")
    before = main_output(model(**model_inputs("llama")))
    real_fit, calls = Converter.fit, []

    def fails_in_the_second_block(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt("stopped by the user")
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(Converter, "fit", fails_in_the_second_block)
    with pytest.raises(KeyboardInterrupt):  # the first block was converted already: it is put back
        get_momos_model(
            model, MoMosConfig(k=8, s=4, fit="data-aware"), calibration_data=[model_inputs("llama")], sequential=True
        )
    assert not momos_layers(model) and torch.equal(main_output(model(**model_inputs("llama"))), before)
    monkeypatch.undo()
    batches = [model_inputs("t5", batch=2, seed=i) for i in range(2)]
    with pytest.raises(ValueError, match="do not all get the same arguments .* use sequential=False"):
        get_momos_model(
            build("t5"), MoMosConfig(k=8, s=4, fit="data-aware"), calibration_data=batches, sequential=True
        )
    with pytest.raises(ValueError, match="motif_scope='global' fits one dictionary for all layers at once"):
        get_momos_model(
            build("llama"),
            MoMosConfig(k=8, s=4, fit="data-aware", motif_scope="global"),
            calibration_data=[model_inputs("llama")],
            sequential=True,
        )


def test_the_block_check_runs_within_the_first_calibration_pass():
    """Checking that each block runs once used to repeat the first batch: now each batch enters the model once."""
    model = build("llama")
    entries = []
    model.model.embed_tokens.register_forward_hook(lambda *_: entries.append(1))
    batches = [model_inputs("llama", batch=2, length=8, seed=i) for i in range(3)]
    mm = get_momos_model(
        model, MoMosConfig(k=8, s=4, fit="data-aware", target_modules="all-linear"), batches, sequential=True
    )
    assert mm.momos_layers() and len(entries) == len(batches)


@pytest.mark.parametrize("sequential", [False, True])
def test_non_finite_calibration_inputs_name_the_layer(sequential):
    model = build("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = float("nan")  # not a target: its outputs feed q, k, v
    with pytest.raises(
        ValueError, match=r"^the calibration inputs of model\.layers\.0\.self_attn\.q_proj ... are not"
    ):
        get_momos_model(model, MoMosConfig(k=8, s=4, fit="data-aware"), [model_inputs("llama")], sequential=sequential)


@pytest.mark.parametrize("sequential", [False, True])
def test_calibration_batches_that_are_not_token_ids_are_refused_in_one_line(sequential):
    ids = model_inputs("llama")["input_ids"]  # vocabulary of 96
    cases = [
        (
            {"input_ids": ids.float()},
            TypeError,
            r"batch 0: input_ids must be a tensor of integer token ids, not torch\.float32",
        ),
        (
            {"input_ids": torch.full_like(ids, 96)},
            ValueError,
            r"batch 0: input_ids hold ids 96\.\.96, outside .* of 96 tokens",
        ),
        ({"input_ids": ids - 100}, ValueError, r"input_ids hold ids -\d+\.\.-\d+, outside"),
        (ids, TypeError, "calibration batch 0 is a Tensor, not a dict of model inputs"),
    ]
    for batch, error, message in cases:
        model = build("llama")
        with pytest.raises(error, match=message) as refused:
            get_momos_model(model, MoMosConfig(k=8, s=4, fit="data-aware"), [batch], sequential=sequential)
        assert "\n" not in str(refused.value) and not any("momos" in type(m).__name__.lower() for m in model.modules())
