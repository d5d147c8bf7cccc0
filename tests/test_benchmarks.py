"""The benchmarks' `--quick` modes run and print sane numbers (their speed is not checked here)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SHAKESPEARE = BENCHMARKS.parents[1] / "shared" / "data" / "shakespeare"


def run_quick(script: str, tmp_path) -> object:
    out = tmp_path / "out.json"
    subprocess.run(
        [sys.executable, script, "--quick", "--json", str(out)],
        cwd=BENCHMARKS,
        check=True,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "MOMOS_HF_CACHE": str(tmp_path / "cache")},
    )
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="needs ../shared/data/shakespeare beside the repository")
def test_fidelity_quick(tmp_path):
    rows = run_quick("fidelity.py", tmp_path)
    assert {(r["method"], r["bits_per_weight"]) for r in rows} == {
        (m, b) for m in ("sample", "kmeans", "data-aware", "rtn") for b in (1.0, 2.0)
    }
    for row in rows:
        assert 0.9 < row["score"] < 3.0 and row["dense_perplexity"] > 1.0  # perplexity relative to dense
        assert row["total_bits_per_weight"] >= row["bits_per_weight"]
        assert 0 < row["rel_error"] < (10 if row["method"] == "rtn" else 1)
    score = {(r["method"], r["bits_per_weight"]): r["score"] for r in rows}
    for bits in (1.0, 2.0):
        assert score[("data-aware", bits)] < score[("kmeans", bits)]
        assert score[("data-aware", bits)] < score[("rtn", bits)]


@pytest.mark.slow
@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="needs ../shared/data/shakespeare beside the repository")
def test_llm_quality_quick(tmp_path):
    """Every method at 2 bits on a tiny random Llama, each in its own process: honest bit counts, finite
    perplexities, and a memory reading (a random model's perplexities say nothing about quality)."""
    pytest.importorskip("hqq")
    results = run_quick("llm_quality.py", tmp_path)
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == [
        "rtn",
        "hqq",
        "gptq",
        "momos-kmeans",
        "momos-data-aware",
        "momos-sequential",
        "momos-pipeline",
    ]
    assert rows["rtn"]["bits_per_weight"] == rows["gptq"]["bits_per_weight"] == 2.5  # 2 bits + 2 fp16 per 64
    assert rows["hqq"]["bits_per_weight"] == 2.5
    momos_bits = {
        rows[m]["bits_per_weight"] for m in ("momos-kmeans", "momos-data-aware", "momos-sequential", "momos-pipeline")
    }
    assert (
        len(momos_bits) == 1 and momos_bits.pop() > 2.0
    )  # 8/4 index bits + dictionaries and scales (large on a tiny model)
    dense = results["dense"]
    assert 200 < dense["perplexity"] < 300  # a random 257-token model is near uniform
    for row in rows.values():
        assert math.isfinite(row["perplexity"]) and row["conversion_s"] > 0 and row["peak_bytes"] > 0


@pytest.mark.slow
def test_inference_quick(tmp_path):
    results = run_quick("inference.py", tmp_path)
    variants = [r["variant"] for r in results["layers"] if r["rows"] == 1]
    assert variants == [
        "dense float32",
        "dense bfloat16",
        "momos compiled_lookup",
        "momos lookup",
        "momos reconstruct",
        "momos auto",
        "momos cached",
    ]
    for row in results["layers"]:
        assert row["ms"] > 0 and row["vs_dense"] > 0
        if row["variant"] in ("momos lookup", "momos reconstruct", "momos auto"):
            assert row["memory_saving"] > 12  # k=256, s=16 on a 256x512 layer: 16x less than fp32
    assert [r["model"] for r in results["model"]] == ["dense", "momos auto", "momos cached"]
    assert all(r["tokens_per_second"] > 0 for r in results["model"])


@pytest.mark.slow
def test_size_quick(tmp_path):
    rows = run_quick("size.py", tmp_path)
    assert len(rows) == 4
    for row in rows:
        assert row["momos_bytes"] == pytest.approx(row["description_length_bytes"], rel=1e-9)
        assert row["converted_fp16_bytes"] > row["momos_bytes"]
        assert row["entropy_mosaic_bytes"] <= row["packed_mosaic_bytes"]
        assert 0 <= row["entropy_saving"] < 0.2


@pytest.mark.slow
def test_conversion_quick(tmp_path):
    rows = run_quick("conversion.py", tmp_path)
    assert [(r["init"], r["layers"]) for r in rows] == [
        (i, n) for i in ("kmeans", "data-aware") for n in (1, 2, 3)
    ] + [("data-aware-sequential", n) for n in (1, 2, 32)]
    for init in ("kmeans", "data-aware", "data-aware-sequential"):
        weights = [r["weights"] for r in rows if r["init"] == init and "weights" in r]
        assert all(a < b for a, b in zip(weights, weights[1:]))
    measured, extrapolated = rows[:-1], rows[-1]
    assert all(r["seconds"] > 0 and r["peak_above_model_mib"] >= 0 for r in measured)
    one, two = rows[-3:-1]
    assert two["weights"] == 2 * one["weights"] and one["hidden"] == 256 and one["intermediate"] == 688
    assert extrapolated["extrapolated_seconds"] == pytest.approx(
        one["seconds"] + 31 * (two["seconds"] - one["seconds"])
    )


@pytest.mark.slow
def test_trust_probe_quick(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "trust_probe.py",
            "--quick",
            "--strict",
            "--json",
            str(tmp_path / "probe.json"),
            "--work",
            str(tmp_path / "work"),
        ],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=900,
    )
    results = json.loads((tmp_path / "probe.json").read_text())
    assert done.returncode == 0, done.stdout[-3000:]
    assert len(results) == 21 and {r["category"] for r in results} <= {"correct", "clear"}
    assert {r["family"] for r in results} == {"config", "load", "save", "push", "cli", "recipe"}


@pytest.mark.slow
@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="needs ../shared/data/shakespeare beside the repository")
def test_lora_quick(tmp_path):
    """The four adaptations on a tiny Llama: trainable counts as designed, training lowers held-out perplexity."""
    rows = {r["variant"]: r for r in run_quick("lora.py", tmp_path)}
    assert list(rows) == ["MoMos alone", "MoMos + LoRA r=16", "MoMos motifs mode", "dense + LoRA r=16"]
    assert rows["MoMos alone"]["trainable_parameters"] == 0 and rows["MoMos alone"]["seconds_per_step"] is None
    assert rows["MoMos + LoRA r=16"]["trainable_parameters"] == rows["dense + LoRA r=16"]["trainable_parameters"] > 0
    for name in ("MoMos + LoRA r=16", "MoMos motifs mode", "dense + LoRA r=16"):
        assert rows[name]["seconds_per_step"] > 0 and rows[name]["ppl_after"] < rows[name]["ppl_before"]
