import copy
import json

import pytest
import torch
from conftest import ARCHITECTURES, build, main_output, model_inputs
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from momos_hf import MoMosConfig, MoMosConv1D, MoMosLayer, MoMosLinear, MoMosModel, get_momos_model
from momos_hf.mosaic import to_blocks

ARCHS = list(ARCHITECTURES)


def converted(arch, **config):
    model = build(arch)
    return model, get_momos_model(model, MoMosConfig(**{"k": 16, "s": 4, "kmeans_iters": 3, **config}))


@pytest.mark.parametrize("arch", ARCHS)
def test_default_targets_are_the_block_projections_and_nothing_else(arch):
    model = build(arch)
    leaves = ARCHITECTURES[arch][1]
    expected = {
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D))
        and any(name.endswith("." + leaf) for leaf in leaves)
        and any(part.isdigit() for part in name.split("."))
    }
    mm = get_momos_model(model, MoMosConfig(k=16, s=4, kmeans_iters=2))
    assert set(mm.momos_layers()) == expected
    remaining = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    assert remaining == ({"pooler.dense"} if arch == "bert" else {"lm_head"})  # heads stay dense
    assert model.get_input_embeddings().__class__ is nn.Embedding


@pytest.mark.parametrize("arch", ARCHS)
def test_each_weight_uses_at_most_k_distinct_blocks(arch):
    _, mm = converted(arch, k=8, s=4)
    for layer in mm.momos_layers().values():
        blocks = to_blocks(layer.mosaic_weight().detach(), layer.s)
        assert len(torch.unique(blocks, dim=0)) <= 8
        assert layer.mosaic.dtype == torch.uint8


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_reach_the_motifs_and_merge_matches(arch):
    model, mm = converted(arch)
    inputs = model_inputs(arch)
    out = main_output(mm(**inputs))
    out.square().mean().backward()
    layers = mm.momos_layers().values()
    assert all(layer.motifs.grad is not None and layer.motifs.grad.abs().sum() > 0 for layer in layers)
    frozen = [p for n, p in mm.named_parameters() if "motifs" not in n]
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    with torch.no_grad():
        before = main_output(mm(**inputs))
        plain = mm.merge_and_unload()
        after = main_output(plain(**inputs))
    assert not any(isinstance(m, MoMosLinear) for m in plain.modules())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in plain.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_made_of_k_blocks_convert_losslessly(arch):
    # Every target weight is built from 8 distinct blocks of 5 (in its own layout: GPT-2's Conv1D is
    # [in, out]); s=5 divides none of the widths, so padding is exercised. 16 motifs must then be exact
    # (16, not 8: a padded block drawn as a seed would otherwise leave one pattern without a motif).
    model = build(arch)
    generator = torch.Generator().manual_seed(0)
    patterns = 0.05 * torch.randn(8, 5, generator=generator)  # about the scale of the models' own weights
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, Conv1D)) and any(p.isdigit() for p in name.split(".")):
                out_features, in_features = (
                    module.weight.shape[::-1] if isinstance(module, Conv1D) else module.weight.shape
                )
                mosaic = torch.randint(0, 8, (out_features, -(-in_features // 5)), generator=generator)
                weight = patterns[mosaic].reshape(out_features, -1)[:, :in_features]
                module.weight.copy_(weight.T if isinstance(module, Conv1D) else weight)
    inputs = model_inputs(arch)
    with torch.no_grad():
        reference = main_output(model(**inputs))
    mm = get_momos_model(model, MoMosConfig(k=16, s=5, kmeans_iters=5))
    assert all(layer.in_features % 5 for layer in mm.momos_layers().values())
    with torch.no_grad():
        torch.testing.assert_close(main_output(mm(**inputs)), reference, rtol=1e-4, atol=1e-5)
    assert max(mm.fit_errors.values()) < 1e-10


def test_gpt2_conv1d_layout_round_trips():
    model, mm = converted("gpt2")
    layer = mm.base_model.transformer.h[0].attn.c_attn
    assert isinstance(layer, MoMosConv1D) and (layer.in_features, layer.out_features) == (32, 96)
    assert layer.weight.shape == (32, 96)  # the original Conv1D layout, for code that reads .weight
    merged = layer.merge()
    assert isinstance(merged, Conv1D) and merged.weight.shape == (32, 96)
    x = torch.randn(3, 32)
    torch.testing.assert_close(merged(x), layer(x))


def test_causal_lm_generates_and_trains():
    model, mm = converted("llama", modules_to_save=["lm_head"])
    assert mm.config is model.config
    ids = model_inputs("llama")["input_ids"]
    generated = mm.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 16)
    optimizer = torch.optim.Adam([p for p in mm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = mm(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert mm.base_model.lm_head.weight.requires_grad


def test_print_trainable_parameters_counts_the_weights_the_mosaic_stands_for(capsys):
    model, mm = converted("llama", modules_to_save=["lm_head"])
    dense_total = sum(p.numel() for p in build("llama").parameters())
    trainable, total = mm.get_nb_trainable_parameters()
    motif_params = sum(l.motifs.numel() for l in mm.momos_layers().values())
    assert trainable == motif_params + mm.base_model.lm_head.weight.numel()
    assert total == dense_total  # every converted weight counts once, as PEFT counts packed 4-bit weights
    mm.print_trainable_parameters()
    assert (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        in capsys.readouterr().out
    )


def test_global_scope_shares_one_dictionary():
    _, mm = converted("llama", motif_scope="global", k=64)
    dictionaries = {id(layer.motifs) for layer in mm.momos_layers().values()}
    assert len(dictionaries) == 1
    trainable, _ = mm.get_nb_trainable_parameters()
    assert trainable == 64 * 4


def test_scales_and_zero_motif():
    _, mm = converted("llama", scale=True, zero_motif=True)
    layer = next(iter(mm.momos_layers().values()))
    assert layer.scale is not None and layer.scale.requires_grad
    with torch.no_grad():
        layer.motifs[0] = 5.0  # training may move the stored value; motif 0 still reads as zero
    used_zero = (layer.mosaic == 0).any(1)
    assert used_zero.any()
    blocks = to_blocks(layer.mosaic_weight().detach(), layer.s).reshape(layer.out_features, -1, layer.s)
    assert (blocks[layer.mosaic == 0] == 0).all()


def test_project_refits_in_place():
    model, mm = converted("llama", k=16)
    layer = mm.base_model.model.layers[0].mlp.down_proj
    motifs = layer.motifs
    with torch.no_grad():
        motifs.add_(torch.randn_like(motifs))
    errors = mm.project()
    assert layer.motifs is motifs  # same Parameter: optimizers keep tracking it
    assert set(errors) == set(mm.momos_layers())
    assert all(0 <= e < 0.2 for e in errors.values())  # refit from a weight that is already a 16-motif mosaic


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_follows_the_model(dtype):
    model = build("llama").to(dtype)
    mm = get_momos_model(model, MoMosConfig(k=16, s=4, kmeans_iters=2))
    layer = next(iter(mm.momos_layers().values()))
    assert layer.motifs.dtype == dtype
    out = mm(**model_inputs("llama")).logits
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_motif_dtype_overrides():
    model = build("llama")
    mm = get_momos_model(model, MoMosConfig(k=16, s=4, kmeans_iters=2, motif_dtype="bfloat16"))
    assert next(iter(mm.momos_layers().values())).motifs.dtype == torch.bfloat16
    assert mm(**model_inputs("llama")).logits.dtype == torch.float32


def test_target_selection_by_list_regex_and_all_linear():
    model = build("llama")
    mm = get_momos_model(
        copy.deepcopy(model), MoMosConfig(k=8, s=4, kmeans_iters=1, target_modules=["q_proj", "v_proj"])
    )
    assert {n.rsplit(".", 1)[1] for n in mm.momos_layers()} == {"q_proj", "v_proj"}
    mm = get_momos_model(
        copy.deepcopy(model), MoMosConfig(k=8, s=4, kmeans_iters=1, target_modules=r".*\.1\.mlp\..*_proj")
    )
    assert len(mm.momos_layers()) == 3
    mm = get_momos_model(copy.deepcopy(model), MoMosConfig(k=8, s=4, kmeans_iters=1, target_modules="all-linear"))
    assert len(mm.momos_layers()) == 14 and "lm_head" not in mm.momos_layers()


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"target_modules": ["q_proj", "qkv"]},
            r"target_modules \['qkv'\] match no module of LlamaForCausalLM; its linear layers are named like "
            r"\['down_proj'",
        ),
        ({"target_modules": ["mlp"]}, r"MoMos does not replace: \['model.layers.0.mlp \(LlamaMLP\)'"),
        ({"target_modules": "nothing.*"}, "selects no linear layer"),
        ({"k": 1000}, r"k=1000 motifs do not fit: model.layers.0.self_attn.q_proj \(32, 32\) has only 256 blocks"),
        ({"modules_to_save": ["q_proj"]}, "both MoMos targets and modules_to_save"),
        ({"modules_to_save": ["head"]}, r"modules_to_save \['head'\] match no module"),
    ],
)
def test_bad_input_is_refused_and_the_model_is_untouched(config, message):
    model = build("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        get_momos_model(model, MoMosConfig(**{"k": 16, "s": 4, **config}))
    assert not any(isinstance(m, MoMosLinear) for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_nan_weights_are_named():
    model = build("gpt2")
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"weight of transformer.h.1.mlp.c_fc has NaN or inf"):
        get_momos_model(model, MoMosConfig(k=16, s=4))
    assert not any(isinstance(m, MoMosLinear) for m in model.modules())


def test_conversion_is_deterministic():
    a = converted("bert", seed=7)[1].momos_layers()
    b = converted("bert", seed=7)[1].momos_layers()
    for name in a:
        assert torch.equal(a[name].motifs, b[name].motifs) and torch.equal(a[name].mosaic, b[name].mosaic)


def test_a_single_name_string_selects_like_peft():
    mm = get_momos_model(build("llama"), MoMosConfig(k=8, s=4, kmeans_iters=1, target_modules="q_proj"))
    assert {n.rsplit(".", 1)[1] for n in mm.momos_layers()} == {"q_proj"} and len(mm.momos_layers()) == 2


def test_converting_twice_is_refused_never_mislabelled():
    model, mm = converted("llama", k=16)
    with pytest.raises(ValueError, match="already a MoMosModel"):
        get_momos_model(mm, MoMosConfig(k=8, s=4))
    with pytest.raises(ValueError, match=r"fitted with other settings \(k=16, not 8\)"):
        get_momos_model(model, MoMosConfig(k=8, s=4, kmeans_iters=3))
    layers = dict(mm.momos_layers())
    again = get_momos_model(model, MoMosConfig(k=16, s=4, kmeans_iters=3, train_mode="ste"))  # same fit, new training
    assert again.momos_layers() == layers and all(l.latent is not None for l in layers.values())


def test_a_merged_model_is_a_plain_dense_model(tmp_path):
    _, mm = converted("llama", scale=True)
    mm.save_pretrained(tmp_path / "momos")
    inputs = model_inputs("llama")
    with torch.no_grad():
        reference = mm(**inputs).logits
    merged = MoMosModel.from_pretrained(tmp_path / "momos").merge_and_unload()
    assert not hasattr(merged.config, "quantization_config") and not merged.is_quantized
    merged.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and "transformers_weights" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, MoMosLinear) for m in reloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loaded", [True, False])
def test_dequantize_gives_the_layers_back(tmp_path, loaded):
    _, mm = converted("gpt2", scale=True)
    inputs = model_inputs("gpt2")
    with torch.no_grad():
        reference = mm(**inputs).logits
    mm.save_pretrained(tmp_path / "momos")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "momos") if loaded else mm.base_model
    dense = model.dequantize()
    assert isinstance(dense.transformer.h[0].mlp.c_fc, Conv1D) and not hasattr(dense.config, "quantization_config")
    with torch.no_grad():
        torch.testing.assert_close(dense(**inputs).logits, reference, rtol=1e-5, atol=1e-5)
    dense.save_pretrained(tmp_path / "dense")
    assert not any(
        isinstance(m, MoMosLinear) for m in AutoModelForCausalLM.from_pretrained(tmp_path / "dense").modules()
    )


def test_float16_with_row_scales_stays_finite():
    model = build("llama").half()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2000.0)  # rows near the top of float16's range
    mm = get_momos_model(model, MoMosConfig(k=16, s=4, kmeans_iters=2, scale=True))
    layer = mm.base_model.model.layers[0].mlp.down_proj
    assert (
        layer.scale.dtype == torch.float16 and torch.isfinite(layer.scale).all() and torch.isfinite(layer.motifs).all()
    )
    assert mm.fit_errors["model.layers.0.mlp.down_proj"] < 1


def test_huge_weights_fit_in_float32_and_overflow_float16_clearly():
    model = build("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[:4].mul_(1e20)
    mm = get_momos_model(copy.deepcopy(model), MoMosConfig(k=16, s=4, kmeans_iters=2))
    assert all(torch.isfinite(l.mosaic_weight()).all() for l in mm.momos_layers().values())
    with pytest.raises(ValueError, match=r"the motifs fitted to model.layers.1.mlp.up_proj overflow torch.float16"):
        get_momos_model(model, MoMosConfig(k=16, s=4, kmeans_iters=2, motif_dtype="float16"))


def test_dtype_casts_the_converted_model_after_the_fit():
    model = build("llama")
    mm = get_momos_model(model, MoMosConfig(k=16, s=4, kmeans_iters=2), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers stay, as loading in bf16 leaves them
    assert torch.isfinite(mm(**model_inputs("llama")).logits).all()


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m: get_momos_model(m, MoMosConfig(k=16, s=4), dtype="bfloat16"),
            "dtype must be a floating-point torch.dtype",
        ),
        (lambda m: get_momos_model(None, MoMosConfig(k=16, s=4)), "model must be a torch.nn.Module"),
        (lambda m: get_momos_model(m, {"k": 16}), "config must be a MoMosConfig"),
    ],
)
def test_bad_arguments_leave_the_model_untouched(call, message):
    model = build("llama")
    with pytest.raises(ValueError, match=message):
        call(model)
    assert not any(isinstance(m, MoMosLayer) for m in model.modules())


def test_a_config_changed_after_it_was_checked_is_checked_again():
    config = MoMosConfig(k=16, s=4)
    config.scale, model = "no", build("llama")
    with pytest.raises(ValueError, match="scale must be True or False"):
        get_momos_model(model, config)
    config.scale, config.k = False, 0
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        get_momos_model(model, config)
    assert not any(isinstance(m, MoMosLayer) for m in model.modules())
