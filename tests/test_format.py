"""The storage format of dictionaries, the description-length formula, and checkpoints of every format version:
the fixtures under tests/fixtures (see its README) load with today's code and give the logits saved beside them."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from momos_hf import MoMosConfig, MoMosModel, get_momos_model
from momos_hf.checkpoint.info import checkpoint_info, format_info
from momos_hf.checkpoint.schema import FORMAT_VERSION, config_digest, sha256_of
from momos_hf.convert.converter import Converter
from momos_hf.mosaic import DictionaryFormat, description_bits, quantize_motifs
from momos_hf.report.complexity import complexity_report

FIXTURES = Path(__file__).parent / "fixtures"
VERSIONS = {"v1": 1, "v2": 2, "v2-qbit": 2, "v3": 3, "v3-qbit": 3}


def fixture_copy(tmp_path, name):
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def rewrite(path, edit_tensors=lambda t: None, edit_config=lambda c: None):
    """Edit a checkpoint's tensors and config.json and sign it again, as a deliberate forger would."""
    config = json.loads((path / "config.json").read_text())
    edit_config(config)
    file = path / "model.safetensors"
    with safe_open(file, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    edit_tensors(tensors)
    if "momos_config_sha256" in metadata:
        metadata["momos_config_sha256"] = config_digest(config)
    save_file(tensors, file, metadata=metadata)
    config["quantization_config"]["checksums"] = {"model.safetensors": sha256_of(file)}
    (path / "config.json").write_text(json.dumps(config))


def dictionary_owner(path):
    layers = json.loads((path / "config.json").read_text())["quantization_config"]["layers"]
    return next(name for name, spec in layers.items() if spec["motifs"] == name)


@pytest.mark.parametrize("name", list(VERSIONS))
@pytest.mark.parametrize("load", [AutoModelForCausalLM.from_pretrained, MoMosModel.from_pretrained])
def test_every_format_version_loads_with_the_logits_it_was_saved_with(name, load):
    config = json.loads((FIXTURES / name / "config.json").read_text())
    assert config["quantization_config"]["format_version"] == VERSIONS[name]
    expected = load_file(FIXTURES / name / "logits.safetensors")
    model = load(FIXTURES / name).eval()
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    # the products may sum in another order than the code that wrote the fixture: float32 rounding apart
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(VERSIONS))
def test_info_reads_every_format_version(name):
    info = checkpoint_info(FIXTURES / name)
    latest = checkpoint_info(FIXTURES / ("v3-qbit" if "qbit" in name else "v3"))
    assert info["format_version"] == VERSIONS[name]
    same = ("converted_params", "total_params", "bits_per_weight", "description_length_bytes")
    assert {key: info[key] for key in same} == {key: latest[key] for key in same}
    assert info["converted_params"] == 7680 and "parameters" in format_info(info)


def test_a_newer_format_version_is_refused_with_upgrade_advice(tmp_path):
    path = fixture_copy(tmp_path, "v3")
    rewrite(path, edit_config=lambda c: c["quantization_config"].update(format_version=FORMAT_VERSION + 1))
    for read in (AutoModelForCausalLM.from_pretrained, checkpoint_info):
        with pytest.raises(ValueError, match=r"^this checkpoint uses momos format_version 4; .*: upgrade momos-hf$"):
            read(path)


def test_a_later_checkpoint_relabelled_version_1_is_refused(tmp_path):
    """Version 1 files carry no config digest: a v3 checkpoint whose config.json is edited to say version 1 (in
    v1's fields) must not escape the digest check."""
    path = fixture_copy(tmp_path, "v3")

    def as_version_1(config):
        quantization = config["quantization_config"]
        quantization["format_version"] = 1
        for spec in quantization["layers"].values():
            del spec["dictionary"]

    rewrite(path, edit_config=as_version_1)
    with pytest.raises(ValueError, match="says format_version 1 but model.safetensors was saved by a later momos-hf"):
        AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_bits", [None, 2, 4, 16])
def test_dictionary_format_round_trips_and_counts_its_bits(dtype, q_bits):
    torch.manual_seed(0)
    motifs = torch.randn(16, 4).to(dtype)
    form = DictionaryFormat(dtype, q_bits)
    stored = form.encode(motifs)
    assert tuple(stored) == form.parts
    decoded = form.decode(stored, 16, 4)
    assert decoded.dtype == dtype
    assert torch.equal(decoded, motifs if q_bits is None else quantize_motifs(motifs.float(), q_bits).to(dtype))
    assert form.bits(16, 4) == 16 * 4 * (torch.finfo(dtype).bits if q_bits is None else q_bits) + (
        0 if q_bits is None else 32
    )
    if q_bits is not None:  # the codes are packed at q bits each
        assert (
            stored["motif_codes"].numel() == -(-16 * 4 * q_bits // 8) and stored["motif_step"].dtype == torch.float32
        )


def test_one_description_length_for_the_size_guard_the_report_and_info(tmp_path):
    config = MoMosConfig(k=16, s=4, kmeans_iters=1, scale=True, motif_scope="global", motif_bits=4)
    mm = get_momos_model(tiny_llama(), config)
    report = complexity_report(mm, max_bytes=0)
    shapes = [(layer.out_features, layer.in_features) for layer in mm.momos_layers().values()]
    formula = sum(sum(description_bits(o, i, 16, 4, None, 32)) for o, i in shapes) + 16 * 4 * 4 + 32
    assert report.converted_bits == formula
    mm.save_pretrained(tmp_path)
    assert checkpoint_info(tmp_path)["description_length_bytes"] * 8 == formula
    # the size guard counts by the same formula: it accepts this setting and names that count when it refuses one
    matrices = {name: torch.zeros(o, i) for name, (o, i) in zip(mm.momos_layers(), shapes)}
    Converter(tiny_llama(), config)._check_compresses(matrices)
    wide = MoMosConfig(k=960, s=16, scale=True, motif_scope="global")
    bits = sum(sum(description_bits(o, i, 960, 16, None, 32)) for o, i in shapes) + 960 * 16 * 32
    with pytest.raises(ValueError, match=f"takes {bits / 8:,.0f} bytes, more than its {15360 * 4:,d} dense bytes"):
        Converter(tiny_llama(), wide)._check_compresses(matrices)


def test_a_q_bit_step_whose_grid_overflows_is_refused_at_load(tmp_path):
    path = fixture_copy(tmp_path, "v3-qbit")
    owner = dictionary_owner(path)
    rewrite(path, lambda t: t[f"{owner}.motif_step"].fill_(1e37))
    for read in (AutoModelForCausalLM.from_pretrained, checkpoint_info):
        with pytest.raises(ValueError, match=r"motifs reach 7e\+37: rows of 48 such weights overflow torch.float32"):
            read(path)


def test_a_negative_q_bit_step_is_refused_by_info_as_by_the_load(tmp_path, capsys):
    from momos_hf.app.cli import main

    path = fixture_copy(tmp_path, "v3-qbit")
    owner = dictionary_owner(path)
    rewrite(path, lambda t: t[f"{owner}.motif_step"].fill_(-0.5))
    with pytest.raises(ValueError, match=r"the motif grid step is \[-0.5\], not a finite number >= 0"):
        AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(SystemExit) as exit_:
        main(["info", str(path)])
    errors = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(errors) == 1 and "the motif grid step is [-0.5]" in errors[0]


def test_q_bit_motifs_keep_their_stored_dtype_whatever_dtype_the_model_loads_in(tmp_path):
    mm = get_momos_model(tiny_llama(), MoMosConfig(k=16, s=4, kmeans_iters=1, motif_scope="global", motif_bits=16))
    mm.save_pretrained(tmp_path)
    owner = dictionary_owner(tmp_path)
    codes = load_file(tmp_path / "model.safetensors")[f"{owner}.motif_codes"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.get_submodule(owner).motifs.dtype == torch.float32
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16  # the rest loads as asked
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    assert torch.equal(load_file(again / "model.safetensors")[f"{owner}.motif_codes"], codes)  # all 64 codes


def test_the_report_of_the_base_model_counts_constrained_vectors():
    config = MoMosConfig(
        k=16, s=4, kmeans_iters=1, motif_scope="global", constrain_vectors=True, train_mode="projected"
    )
    mm = get_momos_model(tiny_llama(), config)
    wrapped, base = complexity_report(mm, max_bytes=0), complexity_report(mm.get_base_model(), max_bytes=0)
    vectors = {name for name in mm.vector_mosaics}
    assert vectors and vectors <= {layer.name for layer in base.layers}
    assert base.to_dict()["totals"] == wrapped.to_dict()["totals"]


def test_one_parameter_count_for_print_trainable_parameters_info_and_the_report(tmp_path, capsys):
    mm = get_momos_model(tiny_llama(), MoMosConfig(k=16, s=4, kmeans_iters=1, scale=True))
    mm.save_pretrained(tmp_path)
    total = mm.get_nb_trainable_parameters()[1]
    info, report = checkpoint_info(tmp_path), complexity_report(mm, max_bytes=0)
    dense = sum(p.numel() for p in tiny_llama().parameters())
    assert total == info["total_params"] == report.total_params == dense == 21664
    mm.print_trainable_parameters()
    assert f"all params: {total:,d}" in capsys.readouterr().out
    assert f"parameters           {total:,d} (" in format_info(info) and f"parameters           {total:,d} (" in (
        report.format()
    )


def test_float_motifs_stored_in_another_dtype_than_recorded_are_refused(tmp_path):
    path = fixture_copy(tmp_path, "v3")
    owner = dictionary_owner(path)
    rewrite(path, lambda t: t.update({f"{owner}.motifs": t[f"{owner}.motifs"].to(torch.bfloat16)}))
    for read in (AutoModelForCausalLM.from_pretrained, checkpoint_info):
        with pytest.raises(ValueError, match=rf"{owner}\.motifs is BF16 but layer .* records float32 motifs"):
            read(path)
