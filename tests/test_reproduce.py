"""Complexity tracking and the paper-reproduction recipe (`--quick`)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import build, model_inputs
from momos_hf import MoMosConfig, get_momos_model
from momos_hf.complexity import bdm_of_signs, histogram_entropy
from momos_hf.tracking import ComplexityTracker, complexity_snapshot, sample_values

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))
import reproduce_paper  # noqa: E402


def test_histogram_entropy_and_2d_bdm():
    g = torch.Generator().manual_seed(0)
    assert histogram_entropy(torch.tensor([1.0, 2.0] * 50), bins=4) == pytest.approx(1.0)
    assert histogram_entropy(torch.randn(100000, generator=g), bins=256) > 6.0
    ordered = torch.ones(4096)
    noisy = torch.randn(4096, generator=g)
    assert bdm_of_signs(ordered, 2) < 0.1 * bdm_of_signs(noisy, 2)
    assert bdm_of_signs(ordered, 1) < 0.1 * bdm_of_signs(noisy, 1)
    with pytest.raises(ValueError, match="2-D BDM needs at least 1024 values"):
        bdm_of_signs(noisy[:100], 2)


def test_snapshot_of_dense_and_momos_models():
    dense = build("llama")
    figures = complexity_snapshot(dense, max_values=4096)
    assert figures["values"] <= 4096 + 32
    assert figures["description_length_bits"] == 32 * sum(p.numel() for p in dense.parameters())
    assert {"gzip_ratio", "lzma_ratio", "bdm1d_bits_per_sign", "bdm2d_bits_per_sign", "histogram_entropy"} <= set(figures)
    mm = get_momos_model(build("llama"), MoMosConfig(k=16, s=4, motif_scope="global"))
    momos = complexity_snapshot(mm, max_values=4096)
    assert momos["description_length_bits"] < 0.5 * figures["description_length_bits"]
    assert 0 < momos["motif_usage_entropy"] <= 4.0
    assert momos["gzip_ratio"] > figures["gzip_ratio"]  # 16 motifs repeat: gzip finds them
    parts = sample_values([torch.arange(10.0), torch.arange(100.0, 130.0)], 20)
    assert parts.tolist() == list(range(5)) + list(range(100, 115))  # the same leading share of each


class FakeClock:
    """Seconds that advance only when told: a measurement costs `measure`, a training step `step`."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_tracker_doubles_its_interval_while_over_budget(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("momos_hf.tracking.complexity_snapshot", lambda model, max_values: setattr(clock, "now", clock.now + 1.0) or {})
    tracker = ComplexityTracker(every=2, max_overhead=0.1, clock=clock)
    measured = []
    for step in range(65):
        if tracker.track(None, step) is not None:
            measured.append(step)
        clock.now += 0.5  # a training step
    # A measurement costs 1 s, a step 0.5 s: the interval doubles until one costs at most ~10% of the time.
    assert measured == [0, 2, 4, 8, 16, 32, 64]
    assert tracker.every == 128 and all(step % 2 == 0 for step in measured)
    assert tracker.overhead == pytest.approx(7 / (7 + 0.5 * 65))


def test_tracker_schedule_and_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    mm = get_momos_model(build("llama"), MoMosConfig(k=16, s=4, train_mode="motifs"))
    tracker = ComplexityTracker(every=2, max_values=2048, max_overhead=None)
    rows = [tracker.track(mm, step, loss=1.0 / (step + 1)) for step in range(9)]
    assert [row["step"] for row in rows if row] == [0, 2, 4, 6, 8] and rows[1] is None
    assert 0 < tracker.overhead <= 1
    data = [dict(input_ids=row, labels=row) for row in model_inputs("llama", batch=8, length=8)["input_ids"]]
    args = TrainingArguments(str(tmp_path / "trainer"), max_steps=4, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             logging_steps=1, save_strategy="no")
    callback = ComplexityTracker(every=2, max_values=2048, max_overhead=None)
    Trainer(model=mm.base_model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert [r["step"] for r in callback.history] == [0, 2, 4]
    assert callback.history[-1]["loss"] is not None


def test_reproduce_paper_quick(tmp_path):
    path = reproduce_paper.main(["--quick", "--output_dir", str(tmp_path)])
    report = path.read_text()
    assert "| digits | paper | 64 |" in report and "| lm | library | 256 |" in report
    assert (tmp_path / "complexity_vs_step.png").stat().st_size > 1000
    assert (tmp_path / "accuracy_vs_bits.png").stat().st_size > 1000
    runs = json.loads((tmp_path / "report.json").read_text())
    assert {(r["task"], r["procedure"]) for r in runs} == {(t, p) for t in ("digits", "lm") for p in ("dense", "paper", "library")}
    assert len({r["seed"] for r in runs}) == 2
    digits = [r for r in runs if r["task"] == "digits"]
    assert all(0.1 < r["score"] <= 1.0 for r in digits)
    assert len({round(r["score"], 6) for r in digits}) > 1  # computed per run, not constant
    for run in runs:
        assert run["bdm1d_bits_per_sign_init"] != run["bdm1d_bits_per_sign_final"] or run["procedure"] == "paper"
        assert (run["bits_per_weight"] == 32.0) == (run["procedure"] == "dense")
        for key in ("pearson_bdm1d_bits_per_sign_loss", "spearman_histogram_entropy_loss"):
            if key in run:
                assert -1.0 <= run[key] <= 1.0 and not math.isnan(run[key])
    assert all(r["score"] > 1.0 for r in runs if r["task"] == "lm")  # perplexities
