import json
import os

import pytest
import torch
from conftest import build, main_output, model_inputs
from safetensors import safe_open
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

import momos_hf.checkpoint as checkpoint
from momos_hf import MoMosConfig, MoMosLinear, MoMosModel, get_momos_model
from momos_hf.fitting import index_bits

AUTO = {"llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM, "bert": AutoModel, "t5": AutoModelForSeq2SeqLM}


def outputs(model, arch):
    with torch.no_grad():
        return main_output(model(**model_inputs(arch)))


def converted(arch, dtype=torch.float32, **config):
    model = build(arch).to(dtype)
    return get_momos_model(model, MoMosConfig(**{"k": 16, "s": 5, "kmeans_iters": 2, **config}))


@pytest.mark.parametrize("arch", list(AUTO))
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_round_trip_is_bit_exact(tmp_path, arch, scope):
    mm = converted(arch, motif_scope=scope, scale=True)
    reference = outputs(mm, arch)
    mm.save_pretrained(tmp_path)
    plain = AUTO[arch].from_pretrained(tmp_path)  # the ordinary Transformers call
    assert isinstance(dict(plain.named_modules())[next(iter(mm.momos_layers()))], MoMosLinear)
    assert torch.equal(outputs(plain, arch), reference)
    wrapped = MoMosModel.from_pretrained(tmp_path)
    assert torch.equal(outputs(wrapped, arch), reference)
    assert len({id(l.motifs) for l in wrapped.momos_layers().values()}) == (1 if scope == "global" else len(mm.momos_layers()))
    assert wrapped.fit_errors == pytest.approx(mm.fit_errors)
    merged = wrapped.merge_and_unload()
    torch.testing.assert_close(outputs(merged, arch), reference, rtol=1e-5, atol=1e-5)


def test_bfloat16_round_trip(tmp_path):
    mm = converted("llama", dtype=torch.bfloat16)
    reference = outputs(mm, "llama")
    mm.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.model.layers[0].mlp.up_proj.motifs.dtype == torch.bfloat16
    saved_params, loaded_params = dict(mm.base_model.named_parameters()), dict(loaded.named_parameters())
    assert saved_params.keys() == loaded_params.keys()
    assert all(torch.equal(saved_params[n], loaded_params[n]) for n in saved_params)
    # Not bit-identical: `.to(bfloat16)` also cast the rotary inv_freq buffer, which loading keeps in fp32.
    torch.testing.assert_close(outputs(loaded, "llama"), reference, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("k", [2, 256, 300, 65536])
def test_packing_edge_cases_round_trip(tmp_path, k):
    # k=65536 is set by hand: fitting 65536 motifs would take minutes; packing is what is tested here.
    mm = converted("gpt2", k=2)
    layer = mm.base_model.transformer.h[0].mlp.c_fc
    generator = torch.Generator().manual_seed(k)
    layer.motifs = nn.Parameter(torch.randn(k, 5, generator=generator))
    layer.mosaic = torch.empty(layer.mosaic.shape, dtype=torch.uint8)  # shape only; set_mosaic picks the dtype
    layer.set_mosaic(torch.randint(0, k, layer.mosaic.shape, generator=generator))
    reference = outputs(mm, "gpt2")
    mm.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        packed = f.get_tensor("transformer.h.0.mlp.c_fc.mosaic_packed")
    assert packed.dtype == torch.uint8 and len(packed) == -(-layer.mosaic.numel() * index_bits(k) // 8)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.transformer.h[0].mlp.c_fc.mosaic, layer.mosaic)
    assert torch.equal(outputs(loaded, "gpt2"), reference)


def test_momos_layers_on_disk_are_at_their_description_length(tmp_path):
    config = MoMosConfig(k=256, s=16, kmeans_iters=1, target_modules="all-linear")
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=1, num_attention_heads=4))
    mm = get_momos_model(model, config)
    mm.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        on_disk = sum(f.get_slice(n).get_shape()[0] * (f.get_slice(n).get_shape()[1] if n.endswith("motifs") else 1)
                      * (4 if n.endswith("motifs") else 1) for n in f.keys() if n.endswith(("motifs", "mosaic_packed")))
    description_length = sum(l.k * l.s * 32 + l.mosaic.numel() * index_bits(l.k) for l in mm.momos_layers().values()) / 8
    assert on_disk == description_length
    assert os.path.getsize(tmp_path / "model.safetensors") < 1.02 * (description_length + 4 * (64 * 256 * 2 + 3 * 256))


def test_save_keeps_unrelated_files_and_tokenizer_and_generation_config(tmp_path):
    (tmp_path / "README.md").write_text("my notes")
    mm = converted("llama")
    mm.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my notes"
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(os.listdir(tmp_path))
    assert not [p for p in os.listdir(tmp_path.parent) if p.startswith(f".{tmp_path.name}.")]


def test_sharded_round_trip_and_missing_shard(tmp_path):
    mm = converted("llama")
    reference = outputs(mm, "llama")
    mm.save_pretrained(tmp_path, max_shard_size=8000)
    shards = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    assert torch.equal(outputs(AutoModelForCausalLM.from_pretrained(tmp_path), "llama"), reference)
    mm.save_pretrained(tmp_path)  # a smaller save over it drops the stale shards
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    mm.save_pretrained(tmp_path, max_shard_size=8000)
    os.remove(tmp_path / shards[1])
    with pytest.raises(ValueError, match=rf"missing weight file {shards[1]}"):
        MoMosModel.from_pretrained(tmp_path)


def test_interrupted_save_leaves_the_good_checkpoint(tmp_path, monkeypatch):
    good = converted("llama", seed=1)
    good.save_pretrained(tmp_path)
    before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}
    calls = []

    def dies_after_first_shard(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("power cut")
        calls.append(1)
        return real_save_file(*args, **kwargs)

    real_save_file = checkpoint.save_file
    monkeypatch.setattr(checkpoint, "save_file", dies_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        converted("llama", seed=2).save_pretrained(tmp_path, max_shard_size=8000)
    assert {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)} == before
    assert not [p for p in os.listdir(tmp_path.parent) if p.startswith(f".{tmp_path.name}.")]
    assert torch.equal(outputs(AutoModelForCausalLM.from_pretrained(tmp_path), "llama"), outputs(good, "llama"))


@pytest.fixture
def saved(tmp_path):
    converted("llama", k=300, s=4, kmeans_iters=1, target_modules=["down_proj"]).save_pretrained(tmp_path)
    return tmp_path


def edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_truncated_file_is_named(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="model.safetensors is truncated"):
        MoMosModel.from_pretrained(saved)
    # The plain call fails inside Transformers, before the MoMos hook runs, with safetensors' own words.
    with pytest.raises(Exception, match="incomplete metadata"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_corrupted_bytes_are_caught_by_the_checksum(saved):
    data = bytearray((saved / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (saved / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors is corrupted: its sha256 differs"):
        MoMosModel.from_pretrained(saved)


def test_mosaic_index_beyond_k_is_refused(saved):
    # Write a packed mosaic whose first 9-bit index is 511 >= k=300, with a matching checksum.
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.mosaic_packed"
    tensors[key][:2] = torch.tensor([255, 1], dtype=torch.uint8)
    save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
    edit_config(saved, lambda c: c["quantization_config"]["checksums"].update({"model.safetensors": checkpoint.sha256_of(saved / "model.safetensors")}))
    with pytest.raises(ValueError, match=r"layer model.layers.0.mlp.down_proj: mosaic holds index 511 but the layer has only k=300"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_shapes_that_disagree_with_the_config(saved):
    edit_config(saved, lambda c: c["quantization_config"]["layers"]["model.layers.0.mlp.down_proj"].update(in_features=64))
    with pytest.raises(ValueError, match=r"down_proj is recorded as 32x64 but the model config builds it as 32x48"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_newer_format_version_is_refused(saved):
    edit_config(saved, lambda c: c["quantization_config"].update(format_version=99))
    with pytest.raises(ValueError, match="format_version 99; this momos-hf reads up to 1: upgrade momos-hf"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_dense_checkpoint_is_not_a_momos_one(tmp_path):
    build("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is not a MoMos checkpoint"):
        MoMosModel.from_pretrained(tmp_path)


def test_saving_a_model_without_momos_layers_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no MoMos layers to save"):
        checkpoint.save_checkpoint(build("llama"), tmp_path, {})


def test_save_from_a_gathered_state_dict(tmp_path):
    # What the recipe does under FSDP: the wrapper's full state dict (keys prefixed `base_model.`) is saved.
    mm = converted("llama", train_mode="ste")
    mm.project()
    reference = outputs(mm, "llama")
    mm.save_pretrained(tmp_path, state_dict=mm.state_dict())
    # The ste model multiplies by the reconstructed weight, the reloaded one uses the lookup product.
    torch.testing.assert_close(outputs(AutoModelForCausalLM.from_pretrained(tmp_path), "llama"), reference, rtol=0, atol=1e-6)
