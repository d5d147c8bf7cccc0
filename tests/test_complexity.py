import pytest
import torch
from conftest import build

from momos_hf import MoMosConfig, get_momos_model
from momos_hf.report.complexity import bdm_of_signs, complexity_report, compression_ratios, usage_entropy


def test_description_length_per_layer_dictionary():
    model = build("llama")
    mm = get_momos_model(model, MoMosConfig(k=16, s=4, kmeans_iters=2))
    report = complexity_report(mm, mm.fit_errors, max_bytes=0)
    q = next(l for l in report.layers if l.name.endswith("layers.0.self_attn.q_proj"))
    assert (q.params, q.blocks, q.k, q.s) == (32 * 32, 32 * 8, 16, 4)
    assert q.mosaic_bits == 256 * 4  # ceil(log2 16) bits per block
    assert q.dictionary_bits == 16 * 4 * 32  # k * s * fp32
    assert q.description_length_bits == 1024 + 2048
    assert q.bits_per_weight == pytest.approx(3.0)
    assert 0 < q.rel_error < 1 and 0 < q.usage_entropy <= 4
    assert report.shared_dictionary_bits == 0
    assert report.other_params == sum(p.numel() for p in model.parameters()) - 14 * 16 * 4  # all but motifs
    assert report.total_bits == report.converted_bits + 32 * report.other_params
    assert report.compression_ratios == {} and report.bdm_bits is None


def test_biases_of_momos_layers_count_as_other_parameters():
    mm = get_momos_model(build("gpt2"), MoMosConfig(k=16, s=4, kmeans_iters=2))
    report = complexity_report(mm, max_bytes=0)
    motifs = sum(layer.motifs.numel() for layer in mm.momos_layers().values())
    assert report.other_params == sum(p.numel() for p in mm.parameters()) - motifs


def test_global_dictionary_is_counted_once_and_reaches_half_a_bit():
    model = build("llama")
    mm = get_momos_model(
        model, MoMosConfig(k=256, s=16, motif_scope="global", kmeans_iters=2, target_modules="all-linear")
    )
    report = complexity_report(mm, max_bytes=0)
    assert report.shared_dictionary_bits == 256 * 16 * 32
    assert all(l.dictionary_bits == 0 and l.bits_per_weight == 0.5 for l in report.layers)
    mosaic_bits = sum(l.params for l in report.layers) // 16 * 8
    assert report.converted_bits == mosaic_bits + 256 * 16 * 32
    totals = report.to_dict()["totals"]
    assert totals["ratio_vs_fp32"] == pytest.approx(32 / report.bits_per_weight)


def test_complexity_figures_are_measured():
    mm = get_momos_model(build("gpt2"), MoMosConfig(k=4, s=4, kmeans_iters=2))
    report = complexity_report(mm, max_bytes=2**14)
    assert report.measured_bytes == 2**14
    assert set(report.compression_ratios) >= {"gzip", "bz2", "lzma"}
    assert all(r > 1.2 for r in report.compression_ratios.values())  # 4 motifs: very repetitive bytes
    text = report.format()
    assert "transformer.h.0.attn.c_attn" in text and "bits per weight" in text and "lzma" in text


def test_compression_ratio_separates_structure_from_noise():
    noise = torch.randn(4096).numpy().tobytes()
    repeated = torch.randn(16).repeat(256).numpy().tobytes()
    assert compression_ratios(noise)["gzip"] < 1.2 < 10 < compression_ratios(repeated)["gzip"]


def test_usage_entropy():
    assert usage_entropy(torch.tensor([0, 1, 2, 3]), 4) == pytest.approx(2.0)
    assert usage_entropy(torch.zeros(10, dtype=torch.uint8), 256) == 0.0


def test_bdm_ranks_regular_signs_below_random_ones():
    pytest.importorskip("pybdm")
    regular = torch.tensor([1.0, -1.0] * 2048)
    noisy = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    assert bdm_of_signs(regular) < 0.2 * bdm_of_signs(noisy)


def test_report_needs_momos_layers():
    with pytest.raises(ValueError, match="LlamaForCausalLM has no MoMos layers"):
        complexity_report(build("llama"))
