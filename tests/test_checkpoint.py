"""The checkpoint format: round trips on four architectures, packing edge cases, sizes, and every check a
load makes (truncation, checksums, an edited config, missing or extra MoMos tensors, bad dtypes, NaN)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import build, main_output, model_inputs
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, LlamaConfig, LlamaForCausalLM

import momos_hf.checkpoint as checkpoint
from momos_hf import MoMosConfig, MoMosLinear, MoMosModel, get_momos_model
from momos_hf.app.text import byte_tokenizer
from momos_hf.checkpoint import info, save, schema
from momos_hf.integrations.lora import get_lora_model, merge_lora
from momos_hf.mosaic import index_bits

AUTO = {"llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM, "bert": AutoModel, "t5": AutoModelForSeq2SeqLM}


def outputs(model, arch):
    with torch.no_grad():
        return main_output(model(**model_inputs(arch)))


def converted(arch, dtype=torch.float32, **config):
    model = build(arch).to(dtype)
    return get_momos_model(model, MoMosConfig(**{"k": 16, "s": 5, "kmeans_iters": 2, **config}))


def read_config(path):
    return json.loads((path / "config.json").read_text())


def weight_file(path):
    """The single weight file of an unsharded checkpoint folder."""
    return path / read_config(path)["quantization_config"]["weights"]


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
    assert len({id(l.motifs) for l in wrapped.momos_layers().values()}) == (
        1 if scope == "global" else len(mm.momos_layers())
    )
    assert wrapped.fit_errors == pytest.approx(mm.fit_errors)
    merged = wrapped.merge_and_unload()
    torch.testing.assert_close(outputs(merged, arch), reference, rtol=1e-5, atol=1e-5)


def test_bfloat16_round_trip(tmp_path):
    mm = converted("llama", dtype=torch.bfloat16)
    reference = outputs(mm, "llama")
    mm.save_pretrained(tmp_path)
    assert read_config(tmp_path)["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # dtype="auto": the recorded dtype
    assert loaded.model.layers[0].mlp.up_proj.motifs.dtype == torch.bfloat16 and loaded.dtype == torch.bfloat16
    saved_params, loaded_params = dict(mm.base_model.named_parameters()), dict(loaded.named_parameters())
    assert saved_params.keys() == loaded_params.keys()
    assert all(torch.equal(saved_params[n], loaded_params[n]) for n in saved_params)
    # Not bit-identical: `.to(bfloat16)` also cast the rotary inv_freq buffer, which loading keeps in fp32.
    torch.testing.assert_close(outputs(loaded, "llama"), reference, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_motif_dtype_survives_reload_and_resave(tmp_path, arch):
    # A float32 model with bfloat16 motifs: config.json records float32, the motifs stay bfloat16.
    mm = converted(arch, motif_dtype="bfloat16", scale=True)
    reference = outputs(mm, arch)
    mm.save_pretrained(tmp_path / "a")
    loaded = MoMosModel.from_pretrained(tmp_path / "a")
    layer = next(iter(loaded.momos_layers().values()))
    assert layer.motifs.dtype == torch.bfloat16 and layer.scale.dtype == torch.bfloat16
    assert loaded.base_model.dtype == torch.float32 and torch.equal(outputs(loaded, arch), reference)
    loaded.save_pretrained(tmp_path / "b")
    sizes = [checkpoint.checkpoint_info(tmp_path / name)["bits_per_weight"] for name in ("a", "b")]
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("k", [2, 256, 300, 65536])
def test_packing_edge_cases_round_trip(tmp_path, k):
    # k=65536 is set by hand: fitting 65536 motifs would take minutes; packing is what is tested here.
    mm = converted("gpt2", k=2, target_modules=["transformer.h.0.mlp.c_fc"])
    layer = mm.base_model.transformer.h[0].mlp.c_fc
    generator = torch.Generator().manual_seed(k)
    layer.motifs = nn.Parameter(torch.randn(k, 5, generator=generator))
    layer.mosaic = torch.empty(layer.mosaic.shape, dtype=torch.uint8)  # shape only; set_mosaic picks the dtype
    layer.set_mosaic(torch.randint(0, k, layer.mosaic.shape, generator=generator))
    quantization = mm.base_model.config.quantization_config
    quantization.momos_config = {**quantization.momos_config, "k": k}  # what a fit with this k would record
    reference = outputs(mm, "gpt2")
    mm.save_pretrained(tmp_path)
    with safe_open(weight_file(tmp_path), "pt") as f:
        packed = f.get_tensor("transformer.h.0.mlp.c_fc.mosaic_packed")
    assert packed.dtype == torch.uint8 and len(packed) == -(-layer.mosaic.numel() * index_bits(k) // 8)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.transformer.h[0].mlp.c_fc.mosaic, layer.mosaic)
    assert torch.equal(outputs(loaded, "gpt2"), reference)


def test_momos_layers_on_disk_are_at_their_description_length(tmp_path):
    config = MoMosConfig(k=256, s=16, kmeans_iters=1, target_modules="all-linear")
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4)
    )
    mm = get_momos_model(model, config)
    mm.save_pretrained(tmp_path)
    with safe_open(weight_file(tmp_path), "pt") as f:
        on_disk = sum(
            f.get_slice(n).get_shape()[0]
            * (f.get_slice(n).get_shape()[1] if n.endswith("motifs") else 1)
            * (4 if n.endswith("motifs") else 1)
            for n in f.keys()
            if n.endswith(("motifs", "mosaic_packed"))
        )
    description_length = (
        sum(l.k * l.s * 32 + l.mosaic.numel() * index_bits(l.k) for l in mm.momos_layers().values()) / 8
    )
    assert on_disk == description_length
    assert os.path.getsize(weight_file(tmp_path)) < 1.02 * (description_length + 4 * (64 * 256 * 2 + 3 * 256))


@pytest.mark.parametrize("arch", list(AUTO))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "settings",
    [
        {"k": 16, "s": 4},
        {"k": 64, "s": 16, "motif_scope": "global"},
        {"k": 256, "s": 8, "scale": True, "motif_scope": "global"},
    ],
)
def test_a_momos_checkpoint_is_never_larger_than_the_dense_one(tmp_path, arch, dtype, settings):
    model = build(arch).to(dtype)
    model.save_pretrained(tmp_path / "dense")
    dense_bytes = os.path.getsize(tmp_path / "dense" / "model.safetensors")
    get_momos_model(model, MoMosConfig(kmeans_iters=1, **settings)).save_pretrained(tmp_path / "momos")
    info = checkpoint.checkpoint_info(tmp_path / "momos")
    assert info["checkpoint_bytes"] <= dense_bytes
    assert info["dtype"] == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("arch", list(AUTO))
def test_settings_that_would_not_compress_are_refused(arch):
    # 64 motifs of 16 values per layer outweigh these layers' 32x32 to 32x48 dense weights.
    with pytest.raises(
        ValueError, match=r"with k=64, s=16 the MoMos form of .* takes [\d,]+ bytes, more than its [\d,]+ dense bytes"
    ):
        get_momos_model(build(arch), MoMosConfig(k=64, s=16, kmeans_iters=1))


def test_save_keeps_unrelated_files_and_tokenizer_and_generation_config(tmp_path):
    (tmp_path / "README.md").write_text("my notes")
    mm = converted("llama")
    mm.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my notes"
    names = set(os.listdir(tmp_path))
    assert {"config.json", "generation_config.json", weight_file(tmp_path).name} <= names
    assert not [p for p in names | set(os.listdir(tmp_path.parent)) if p.startswith(".momos")]


def test_sharded_round_trip_and_missing_shard(tmp_path):
    mm = converted("llama")
    reference = outputs(mm, "llama")
    mm.save_pretrained(tmp_path, max_shard_size=8000)
    weights = read_config(tmp_path)["quantization_config"]["weights"]
    shards = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    assert len(shards) > 2 and weights.endswith(".safetensors.index.json") and (tmp_path / weights).exists()
    assert torch.equal(outputs(AutoModelForCausalLM.from_pretrained(tmp_path), "llama"), reference)
    mm.save_pretrained(tmp_path)  # a smaller save over it drops the previous save's shards and index
    assert sorted(p for p in os.listdir(tmp_path) if "safetensors" in p) == [weight_file(tmp_path).name]
    mm.save_pretrained(tmp_path, max_shard_size=8000)
    shards = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    os.remove(tmp_path / shards[1])
    with pytest.raises((ValueError, OSError), match=shards[1]):
        MoMosModel.from_pretrained(tmp_path)


def test_interrupted_save_leaves_the_good_checkpoint(tmp_path, monkeypatch):
    good = converted("llama", seed=1)
    good.save_pretrained(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}
    calls = []

    def dies_after_first_shard(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("power cut")
        calls.append(1)
        return real_save_file(*args, **kwargs)

    real_save_file = save.save_file
    monkeypatch.setattr(save, "save_file", dies_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        converted("llama", seed=2).save_pretrained(tmp_path, max_shard_size=8000)
    assert {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)} == before  # nothing left over
    assert torch.equal(outputs(AutoModelForCausalLM.from_pretrained(tmp_path), "llama"), outputs(good, "llama"))


# -- what a load refuses ------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    converted(
        "llama", k=300, s=4, kmeans_iters=1, target_modules=["down_proj", "up_proj"], scale=True, motif_scope="global"
    ).save_pretrained(tmp_path)
    return tmp_path


def edit_config(path, edit):
    config = read_config(path)
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def resign(path):
    """Make the checkpoint consistent again after an edit, as a deliberate forger would: recompute the config
    digest into the weight file's metadata and the file's checksum. What is still refused then is caught by
    the structural checks, not by the integrity record."""
    config = read_config(path)
    quantization = config["quantization_config"]
    file = path / quantization["weights"]
    with safe_open(file, "pt") as f:
        metadata = f.metadata()
    save_file(load_file(file), file, metadata={**metadata, "momos_config_sha256": schema.config_digest(config)})
    quantization["checksums"] = {file.name: checkpoint.sha256_of(file)}
    (path / "config.json").write_text(json.dumps(config))


def rewrite_tensors(path, edit):
    file = weight_file(path)
    with safe_open(file, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata=metadata)
    resign(path)


def test_truncated_file_is_named(saved):
    file = weight_file(saved)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    for load in (MoMosModel.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=f"{file.name} is truncated"):
            load(saved)


def test_corrupted_bytes_are_caught_by_the_checksum(saved):
    file = weight_file(saved)
    data = bytearray(file.read_bytes())
    data[-10] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{file.name} is corrupted: its sha256 differs"):
        MoMosModel.from_pretrained(saved)


def test_mosaic_index_beyond_k_is_refused(saved):
    # The first 9-bit index becomes 511 >= k=300, with the integrity record redone.
    rewrite_tensors(
        saved,
        lambda t: t["model.layers.0.mlp.down_proj.mosaic_packed"][:2].copy_(torch.tensor([255, 1], dtype=torch.uint8)),
    )
    with pytest.raises(
        ValueError,
        match=r"layer model.layers.0.mlp.down_proj: mosaic holds indices \d+\.\.511 but the layer has k=300 motifs",
    ):
        AutoModelForCausalLM.from_pretrained(saved)


def test_an_edited_config_is_caught_by_the_digest(saved):
    edit_config(saved, lambda c: c["quantization_config"]["momos_config"].update(zero_motif=True))
    with pytest.raises(ValueError, match="config.json is not the one .* was saved with"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_shapes_that_disagree_with_the_config(saved):
    edit_config(
        saved, lambda c: c["quantization_config"]["layers"]["model.layers.0.mlp.down_proj"].update(in_features=64)
    )
    resign(saved)
    with pytest.raises(
        ValueError, match=r"down_proj.mosaic_packed is U8 \[432\]; the layer spec calls for U8 \[576\]"
    ):
        AutoModelForCausalLM.from_pretrained(saved)
    rewrite_tensors(
        saved, lambda t: t.update({"model.layers.0.mlp.down_proj.mosaic_packed": torch.zeros(576, dtype=torch.uint8)})
    )
    with pytest.raises(ValueError, match=r"down_proj is recorded as 32x64 but the model config builds it as 32x48"):
        AutoModelForCausalLM.from_pretrained(saved)


def drop_layer(config):
    del config["quantization_config"]["layers"]["model.layers.1.mlp.up_proj"]


def change_owner(config):
    config["quantization_config"]["layers"]["model.layers.1.mlp.up_proj"]["motifs"] = "model.layers.1.mlp.up_proj"


@pytest.mark.parametrize(
    "edit, message",
    [
        (drop_layer, r"tensors \['model.layers.1.mlp.up_proj.mosaic_packed'.*of layers its config.json does not list"),
        (change_owner, "lacks the tensor model.layers.1.mlp.up_proj.motifs"),
        (lambda c: c["quantization_config"].update(layers={}), "layers must list at least one MoMos layer"),
        (
            lambda c: c["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].update(scale=False),
            r"up_proj' \(k=300, s=4, scale=False\) contradicts momos_config",
        ),
    ],
)
def test_config_edits_that_keep_the_integrity_record_are_still_refused(saved, edit, message):
    edit_config(saved, edit)
    resign(saved)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(saved)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.layers.0.mlp.up_proj.motifs"), "lacks the tensor model.layers.0.mlp.up_proj.motifs"),
        (
            lambda t: t.pop("model.layers.1.mlp.up_proj.mosaic_packed"),
            "lacks the tensor model.layers.1.mlp.up_proj.mosaic_packed",
        ),
        (lambda t: t.pop("model.layers.0.mlp.up_proj.scale"), "lacks the tensor model.layers.0.mlp.up_proj.scale"),
        (
            lambda t: t.update({"model.layers.0.mlp.up_proj.motifs": t["model.layers.0.mlp.up_proj.motifs"].long()}),
            r"motifs is I64 \[300, 4\]; the layer spec calls for BF16/F16/F32",
        ),
        (
            lambda t: t["model.layers.0.mlp.up_proj.motifs"].__setitem__((0, 0), float("nan")),
            "has NaN or infinite motifs",
        ),
        (
            lambda t: t.update({"model.layers.0.self_attn.q_proj.mosaic_packed": torch.zeros(4, dtype=torch.uint8)}),
            r"tensors \['model.layers.0.self_attn.q_proj.mosaic_packed'\] of layers its config.json does not list",
        ),
    ],
)
def test_missing_extra_and_bad_momos_tensors_are_refused(saved, edit, message):
    rewrite_tensors(saved, edit)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(saved)


def test_a_checkpoint_without_checksums_is_not_loaded(saved):
    edit_config(saved, lambda c: c["quantization_config"].pop("checksums"))
    with pytest.raises(ValueError, match="records no checksums .* cannot be verified"):
        AutoModelForCausalLM.from_pretrained(saved)


@pytest.mark.parametrize(
    "spec_edit, message",
    [
        ({"k": "300"}, r"\.k must be an integer in \[1, 2147483647\], got '300'"),
        ({"k": 0}, r"\.k must be an integer in \[1, 2147483647\], got 0"),
        ({"s": 0}, r"\.s must be an integer in \[1, inf\], got 0"),
        ({"out_features": -32}, r"\.out_features must be an integer in \[1, inf\], got -32"),
        ({"scale": "no"}, r"\.scale must be true or false"),
        ({"colour": "red"}, r"has unknown fields \['colour'\]"),
    ],
)
def test_malformed_layer_specs_are_named(saved, spec_edit, message):
    edit_config(saved, lambda c: c["quantization_config"]["layers"]["model.layers.0.mlp.down_proj"].update(spec_edit))
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(saved)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda q: q.update(format_version=99), "format_version 99; this momos-hf reads versions 1 to 3: upgrade"),
        (lambda q: q.update(format_version="1"), "format_version must be a positive integer, got '1'"),
        (lambda q: q.update(format_version=1), "records a dictionary format, which format_version 1 does not have"),
        (lambda q: q.update(layers=[1, 2]), "layers must list at least one MoMos layer"),
        (
            lambda q: q["layers"].update(
                {"model.layers.0.mlp.down_proj.weight": q["layers"]["model.layers.0.mlp.down_proj"]}
            ),
            "config.json is not the one .* was saved with",
        ),
        (lambda q: q.update(weights="../outside.safetensors"), "weights must be a .safetensors"),
        (lambda q: q.update(checksums={"../x": "0" * 64}), "checksums must map file names"),
    ],
)
def test_malformed_quantization_configs_are_named(saved, edit, message):
    edit_config(saved, lambda c: edit(c["quantization_config"]))
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(saved)


def test_shard_index_entries_outside_the_folder_or_not_regular_files_are_refused(tmp_path):
    converted("llama").save_pretrained(tmp_path, max_shard_size=8000)
    config = read_config(tmp_path)
    quantization = config["quantization_config"]
    index_path = tmp_path / quantization["weights"]
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path.parent / "outside.safetensors").write_bytes((tmp_path / first).read_bytes())
    for bad in ("../outside.safetensors", str(tmp_path.parent / "outside.safetensors")):
        index["weight_map"] = {k: (bad if v == first else v) for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index))
        with pytest.raises(ValueError, match="not a safetensors file inside the checkpoint folder"):
            checkpoint.verify_checkpoint(tmp_path, config)
    index["weight_map"] = {
        k: ("fifo.safetensors" if v.startswith("../") else v) for k, v in index["weight_map"].items()
    }
    index_path.write_text(json.dumps(index))
    quantization["checksums"].update({"fifo.safetensors": "0" * 64, index_path.name: checkpoint.sha256_of(index_path)})
    os.mkfifo(tmp_path / "fifo.safetensors")  # opening it would block for ever: it is never opened
    with pytest.raises(ValueError, match="fifo.safetensors in the MoMos checkpoint is not a regular file"):
        checkpoint.verify_checkpoint(tmp_path, config)


def test_a_shard_index_cannot_steer_the_load_to_another_folder(tmp_path):
    # A sibling holds an intact copy; the index of the folder being loaded points one shard at it, so that a
    # check of "the folder of the first file" would pass while this folder's other shards load unchecked.
    converted("llama").save_pretrained(tmp_path / "good", max_shard_size=8000)
    import shutil

    shutil.copytree(tmp_path / "good", tmp_path / "doctored")
    config = read_config(tmp_path / "doctored")
    index_path = tmp_path / "doctored" / config["quantization_config"]["weights"]
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (f"../good/{first}" if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    for load in (AutoModelForCausalLM.from_pretrained, MoMosModel.from_pretrained):
        with pytest.raises(ValueError, match="weight files are not all in its folder|not a safetensors file inside"):
            load(tmp_path / "doctored")


def test_any_edit_of_config_json_is_caught(saved):
    edit_config(saved, lambda c: c.update(hidden_act="gelu"))  # outside the quantization config
    for load in (AutoModelForCausalLM.from_pretrained, checkpoint.checkpoint_info):
        with pytest.raises(ValueError, match="config.json is not the one .* was saved with"):
            load(saved)


def test_a_momos_config_that_contradicts_the_layers_is_refused(saved):
    edit_config(saved, lambda c: c["quantization_config"]["momos_config"].update(s=8))
    resign(saved)
    with pytest.raises(ValueError, match=r"contradicts momos_config \(k=300, s=8"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_a_checkpoint_missing_a_dense_tensor_is_refused(saved):
    rewrite_tensors(saved, lambda t: t.pop("model.embed_tokens.weight"))
    with pytest.raises(ValueError, match=r"lacks \['model.embed_tokens.weight'\]: they would load as random weights"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_malformed_safetensors_headers_are_named(saved):
    file = weight_file(saved)
    data = file.read_bytes()
    (length,) = __import__("struct").unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = header[name]["data_offsets"][::-1]  # a range that ends before it starts
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (length - len(text))  # the same length, so only the entry is wrong
    file.write_bytes(data[:8] + text + data[8 + length :])
    for load in (AutoModelForCausalLM.from_pretrained, checkpoint.checkpoint_info):
        with pytest.raises(
            ValueError, match=f"{file.name} is corrupted: the header entry of .* does not describe its bytes"
        ):
            load(saved)


def test_dense_checkpoint_is_not_a_momos_one(tmp_path):
    build("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is not a MoMos checkpoint"):
        MoMosModel.from_pretrained(tmp_path)


def test_a_config_object_shared_with_a_converted_model_still_builds_dense_models(tmp_path):
    config = build("llama").config
    mm = get_momos_model(LlamaForCausalLM(config), MoMosConfig(k=16, s=5, kmeans_iters=2))
    assert getattr(config, "quantization_config", None) is None  # the caller's object is not labelled
    assert all(m.config is mm.base_model.config for m in mm.base_model.modules() if hasattr(m, "config"))
    torch.manual_seed(1)
    dense = LlamaForCausalLM(config).eval()
    dense.save_pretrained(tmp_path / "dense")
    mm.save_pretrained(tmp_path / "momos")
    assert "quantization_config" not in read_config(tmp_path / "dense")
    assert read_config(tmp_path / "momos")["quantization_config"]["quant_method"] == "momos"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert type(reloaded.model.layers[0].mlp.up_proj) is nn.Linear
    assert torch.equal(outputs(reloaded, "llama"), outputs(dense, "llama"))


@pytest.mark.parametrize("merge", ["merge_lora", "merge_and_unload"])
def test_a_model_whose_momos_layers_were_all_merged_saves_as_a_plain_model(tmp_path, merge):
    converted("llama").save_pretrained(tmp_path / "momos")
    torch.manual_seed(0)  # random B as well as A: the merged weights differ from the MoMos ones
    lora = get_lora_model(
        AutoModelForCausalLM.from_pretrained(tmp_path / "momos"),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    merged = merge_lora(lora, into="dense")[0] if merge == "merge_lora" else lora.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged", tokenizer=byte_tokenizer())
    assert "quantization_config" not in read_config(tmp_path / "merged")
    assert getattr(merged.config, "quantization_config", None) is None and not merged.is_quantized
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(reloaded.model.layers[0].mlp.up_proj) is nn.Linear
    assert torch.equal(outputs(reloaded, "llama"), outputs(merged, "llama"))
    momos = AutoModelForCausalLM.from_pretrained(tmp_path / "momos")
    assert not torch.equal(outputs(reloaded, "llama"), outputs(momos, "llama"))  # the adapters were merged in


@pytest.mark.parametrize(
    "scaled, message",
    [
        ("model.layers.1.mlp.up_proj", r"^the motifs fitted to model.layers.1.mlp.up_proj overflow torch.float16"),
        ("model.embed_tokens", r"^model.embed_tokens.weight overflows torch.float16"),
    ],
)
def test_a_dtype_cast_that_would_overflow_is_refused_leaving_the_model_untouched(scaled, message):
    model = build("llama")
    with torch.no_grad():
        model.get_submodule(scaled).weight.mul_(1e7)  # finite in float32, infinite in float16
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        get_momos_model(model, MoMosConfig(k=16, s=4, kmeans_iters=1), dtype=torch.float16)
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[n], t) for n, t in before.items())
    assert getattr(model.config, "quantization_config", None) is None
    assert type(model.model.layers[1].mlp.up_proj) is nn.Linear
    mm = get_momos_model(model, MoMosConfig(k=16, s=4, kmeans_iters=1))  # float32 holds them
    assert torch.isfinite(outputs(mm, "llama")).all()


def test_fit_errors_stay_the_conversions_through_project_and_reload(tmp_path):
    mm = converted("llama")  # train_mode "motifs": project() refits each mosaic weight to itself
    conversion = dict(mm.fit_errors)
    assert set(conversion) == set(mm.momos_layers()) and all(0.1 < e < 1 for e in conversion.values())
    refit = mm.project()
    assert mm.fit_errors == conversion  # still the error against the dense weights
    assert set(refit) == set(conversion) and all(refit[name] < conversion[name] for name in refit)
    mm.save_pretrained(tmp_path)
    assert MoMosModel.from_pretrained(tmp_path).fit_errors == pytest.approx(conversion, rel=1e-12)


def test_saving_a_model_without_momos_layers_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no MoMos layers to save"):
        save.save_checkpoint(build("llama"), tmp_path, {})


def test_save_from_a_gathered_state_dict(tmp_path):
    # What the recipe does under FSDP: the wrapper's full state dict (keys prefixed `base_model.`) is saved.
    mm = converted("llama", train_mode="ste")
    mm.project()
    reference = outputs(mm, "llama")
    mm.save_pretrained(tmp_path, state_dict=mm.state_dict())
    # The ste model multiplies by the reconstructed weight, the reloaded one uses the lookup product.
    torch.testing.assert_close(
        outputs(AutoModelForCausalLM.from_pretrained(tmp_path), "llama"), reference, rtol=0, atol=1e-6
    )


@pytest.mark.slow
def test_the_plain_call_without_momos_hf_fails_and_says_what_to_install(saved):
    # A fresh interpreter that never imports momos_hf: Transformers alone must not load random weights.
    code = (
        "import sys; from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(sys.argv[1])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(saved)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode != 0
    assert "pip install momos-hf" in done.stderr and "import momos_hf" in done.stderr


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_q_bit_dictionaries_are_stored_at_q_bits(tmp_path, arch):
    mm = converted(arch, k=300, s=4, kmeans_iters=1, motif_scope="global", motif_bits=4, zero_motif=True)
    mm.save_pretrained(tmp_path)
    owner = next(name for name, spec in schema.layer_specs(mm.base_model).items() if spec.motifs == name)
    tensors = load_file(weight_file(tmp_path))
    assert not any(key.endswith(".motifs") for key in tensors)
    assert (
        tensors[f"{owner}.motif_codes"].shape == (300 * 4 * 4 // 8,)
        and tensors[f"{owner}.motif_step"].dtype == torch.float32
    )
    inputs = model_inputs(arch)
    for load in (MoMosModel.from_pretrained, AUTO[arch].from_pretrained):
        loaded = load(tmp_path)
        layer = (loaded.get_base_model() if isinstance(loaded, MoMosModel) else loaded).get_submodule(owner)
        assert not hasattr(layer, "motif_codes") and layer.motifs.dtype == torch.float32 and layer.motif_bits == 4
        with torch.no_grad():
            assert torch.allclose(mm(**inputs).logits, loaded(**inputs).logits, atol=1e-5)
    loaded.save_pretrained(tmp_path / "again")  # a reloaded model saves the same codes
    assert torch.equal(
        load_file(weight_file(tmp_path / "again"))[f"{owner}.motif_codes"], tensors[f"{owner}.motif_codes"]
    )
    layers = mm.momos_layers()
    specs = schema.parse_quantization(read_config(tmp_path)["quantization_config"])  # the order the file is read in
    weights = torch.cat(
        [layers[name].mosaic_weight().detach().flatten() for name, spec in specs.items() if spec.mosaic == name]
    )
    assert torch.allclose(info.read_leading_weights(tmp_path, 5000), weights[:5000], atol=1e-6)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda codes, step: codes[:1].fill_(255), r"motif codes reach 7, beyond the 7 levels of a 3-bit grid"),
        (lambda codes, step: step.fill_(float("nan")), r"the motif grid step is \[nan\], not a finite number >= 0"),
    ],
)
def test_q_bit_codes_off_the_grid_are_refused(tmp_path, edit, message):
    converted("llama", motif_scope="global", motif_bits=3).save_pretrained(tmp_path)
    owner = next(
        key.removesuffix(".motif_codes") for key in load_file(weight_file(tmp_path)) if key.endswith(".motif_codes")
    )
    rewrite_tensors(tmp_path, lambda t: edit(t[f"{owner}.motif_codes"], t[f"{owner}.motif_step"]))
    with pytest.raises(ValueError, match=f"corrupted MoMos checkpoint: layer {owner}: {message}"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
