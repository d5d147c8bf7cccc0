"""Every kind of MoMos layer end to end: embeddings (tied to the LM head or not) and 2-D convolutions,
converted, trained, saved, reloaded bit-identically and merged back."""

import pytest
import torch
from conftest import build, model_inputs
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTModel,
)

from momos_hf import MoMosConfig, MoMosConv2d, MoMosEmbedding, MoMosLinear, MoMosModel, get_momos_model
from momos_hf.checkpoint.info import checkpoint_info
from momos_hf.checkpoint.verify import read_checkpoint_config


def tied_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    ).eval()


def tied_bert():
    torch.manual_seed(0)
    return BertForMaskedLM(
        BertConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
    ).eval()


TIED = {  # builder, Auto class, input embeddings, output embeddings
    "llama": (tied_llama, AutoModelForCausalLM, "model.embed_tokens", "lm_head"),
    "gpt2": (lambda: build("gpt2"), AutoModelForCausalLM, "transformer.wte", "lm_head"),
    "bert": (tied_bert, AutoModelForMaskedLM, "bert.embeddings.word_embeddings", "cls.predictions.decoder"),
}


def logits(model, arch):
    with torch.no_grad():
        return model(**model_inputs("llama" if arch == "bert" else arch)).logits


@pytest.mark.parametrize("arch", list(TIED))
@pytest.mark.parametrize("named", ["input", "output"])
def test_tied_embeddings_stay_tied_through_conversion_save_load_and_merge(tmp_path, arch, named):
    builder, auto, embed_name, head_name = TIED[arch]
    model = builder()
    assert model.get_submodule(head_name).weight is model.get_submodule(embed_name).weight
    target = embed_name if named == "input" else head_name
    mm = get_momos_model(model, MoMosConfig(k=16, s=4, kmeans_iters=2, scale=True, target_modules=[target]))
    embed, head = model.get_submodule(embed_name), model.get_submodule(head_name)
    assert isinstance(embed, MoMosEmbedding) and isinstance(head, MoMosLinear)
    assert head.motifs is embed.motifs and head.scale is embed.scale and torch.equal(head.mosaic, embed.mosaic)
    assert head.leader is embed and torch.equal(head.mosaic_weight(), embed.mosaic_weight())
    reference = logits(mm, arch)
    mm.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:  # one dictionary, mosaic and scale for both
        assert {k for k in f.keys() if k.startswith((head_name + ".", embed_name + "."))} == {
            f"{embed_name}.{part}" for part in ("motifs", "mosaic_packed", "scale")
        }
    loaded = auto.from_pretrained(tmp_path)
    embed2, head2 = loaded.get_submodule(embed_name), loaded.get_submodule(head_name)
    assert head2.motifs is embed2.motifs and head2.scale is embed2.scale and head2.leader is embed2
    assert torch.equal(logits(loaded, arch), reference)
    merged = MoMosModel.from_pretrained(tmp_path).merge_and_unload()
    assert merged.get_submodule(head_name).weight is merged.get_submodule(embed_name).weight
    assert type(merged.get_submodule(embed_name)) is nn.Embedding and merged.config.tie_word_embeddings
    torch.testing.assert_close(logits(merged, arch), reference, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_train_one_dictionary():
    model = tied_llama()
    mm = get_momos_model(model, MoMosConfig(k=16, s=4, kmeans_iters=2, target_modules=["lm_head"]))
    ids = model_inputs("llama")["input_ids"]
    mm(input_ids=ids, labels=ids).loss.backward()
    grad = model.model.embed_tokens.motifs.grad
    assert grad is not None and grad.abs().sum() > 0  # the lookup and the head both feed one gradient
    trainable, total = mm.get_nb_trainable_parameters()
    assert trainable == 16 * 4 and total == sum(p.numel() for p in tied_llama().parameters())


def test_untied_embeddings_are_two_layers():
    model = build("llama")  # tie_word_embeddings=False
    mm = get_momos_model(model, MoMosConfig(k=16, s=4, kmeans_iters=2, target_modules=["embed_tokens", "lm_head"]))
    assert model.lm_head.leader is None and model.lm_head.motifs is not model.model.embed_tokens.motifs
    with torch.no_grad():
        assert torch.isfinite(mm(**model_inputs("llama")).logits).all()


def test_embedding_lookup_equals_the_mosaic_table():
    mm = get_momos_model(
        build("llama"), MoMosConfig(k=16, s=5, kmeans_iters=2, scale=True, target_modules=["embed_tokens"])
    )
    layer = mm.base_model.model.embed_tokens
    ids = torch.tensor([[0, 5, 95], [7, 7, 1]])
    torch.testing.assert_close(layer(ids), nn.functional.embedding(ids, layer.mosaic_weight()))


def tiny_vit():
    torch.manual_seed(0)
    return ViTModel(
        ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=48,
        ),
        add_pooling_layer=False,
    )


@pytest.mark.parametrize("fit", ["kmeans", "data-aware"])
def test_conv2d_patch_embedding_round_trips(tmp_path, fit):
    model = tiny_vit()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    calibration = [{"pixel_values": pixels}] if fit == "data-aware" else None
    mm = get_momos_model(
        model, MoMosConfig(k=16, s=4, kmeans_iters=2, fit=fit, target_modules=["projection"]), calibration
    )
    layer = model.embeddings.patch_embeddings.projection
    assert isinstance(layer, MoMosConv2d) and (layer.out_features, layer.in_features) == (32, 48)
    with torch.no_grad():
        reference = mm(pixel_values=pixels).last_hidden_state
        merged_layer = layer.merge()
        torch.testing.assert_close(merged_layer(pixels), layer(pixels), rtol=1e-5, atol=1e-5)
    mm.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, add_pooling_layer=False)
    assert isinstance(loaded.embeddings.patch_embeddings.projection, MoMosConv2d)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).last_hidden_state, reference)
    assert (
        read_checkpoint_config(tmp_path)["quantization_config"]["layers"]["embeddings.patch_embeddings.projection"][
            "kind"
        ]
        == "conv2d"
    )
    assert checkpoint_info(tmp_path)["layers"] == 1
