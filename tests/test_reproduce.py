"""Complexity tracking and the paper-reproduction recipe (`--quick`)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import build, model_inputs

from momos_hf import MoMosConfig, get_momos_model
from momos_hf.report.complexity import bdm_of_signs, histogram_entropy
from momos_hf.train.tracking import ComplexityTracker, complexity_snapshot, sample_values

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
    assert {"gzip_ratio", "lzma_ratio", "bdm1d_bits_per_sign", "bdm2d_bits_per_sign", "histogram_entropy"} <= set(
        figures
    )
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


def test_tracker_keeps_its_budget(monkeypatch):
    clock = FakeClock()
    costs = iter([1.0, 1.0, 3.0] + [1.0] * 100)  # seconds per measurement; the third is dear
    monkeypatch.setattr(
        "momos_hf.train.tracking.complexity_snapshot",
        lambda model, max_values: setattr(clock, "now", clock.now + next(costs)) or {},
    )
    tracker = ComplexityTracker(every=2, max_overhead=0.1, clock=clock)
    measured, overheads = [], []
    for step in range(400):
        if tracker.track(None, step) is not None:
            measured.append(step)
            overheads.append(tracker.overhead)
        clock.now += 0.5  # a training step
    # A step costs 0.5 s: step 36 is the first due step where a 1 s measurement keeps spent <= 10% of elapsed
    # (1 + 1 <= 0.1 * (1 + 18 + 1)), then 54; after the 3 s one (at 54) the next is predicted to cost 3 s: 144.
    assert measured[:4] == [0, 36, 54, 144] and all(step % 2 == 0 for step in measured)
    assert overheads[0] == 1.0  # the reference is always taken
    assert overheads[2] > 0.1  # the 3 s measurement could not be foreseen; every other keeps the budget
    assert all(o <= 0.1 + 1e-9 for i, o in enumerate(overheads) if i not in (0, 2)) and len(overheads) > 8
    assert tracker.overhead <= 0.1


def test_tracker_schedule_and_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    mm = get_momos_model(build("llama"), MoMosConfig(k=16, s=4, train_mode="motifs"))
    tracker = ComplexityTracker(every=2, max_values=2048, max_overhead=None)
    rows = [tracker.track(mm, step, loss=1.0 / (step + 1)) for step in range(9)]
    assert [row["step"] for row in rows if row] == [0, 2, 4, 6, 8] and rows[1] is None
    assert 0 < tracker.overhead <= 1
    data = [dict(input_ids=row, labels=row) for row in model_inputs("llama", batch=8, length=8)["input_ids"]]
    args = TrainingArguments(
        str(tmp_path / "trainer"),
        max_steps=4,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
    )
    callback = ComplexityTracker(every=2, max_values=2048, max_overhead=None)
    Trainer(model=mm.base_model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert [r["step"] for r in callback.history] == [0, 2, 4]
    assert callback.history[-1]["loss"] is not None


@pytest.mark.slow
def test_reproduce_paper_quick(tmp_path):
    path = reproduce_paper.main(["--quick", "--output_dir", str(tmp_path)])
    report = path.read_text()
    assert reproduce_paper.main(["--quick", "--report_only", "--output_dir", str(tmp_path)]).read_text() == report
    assert "| digits | paper | step | 0.01 | 4 |" in report and "| lm | l0 | - | 0.01 | 32 |" in report
    assert "- Claim (2)" in report and "lm paper p=epoch c=0.01 q=32 (" in report  # the verdict counts seeds
    for name in ("score_vs_bits.png", "complexity_vs_step.png"):
        assert (tmp_path / name).stat().st_size > 1000
    runs = json.loads((tmp_path / "report.json").read_text())
    procedures = ("dense", "paper", "library", "magnitude", "l0")
    assert {(r["task"], r["procedure"]) for r in runs} == {(t, p) for t in ("digits", "lm") for p in procedures}
    assert len({r["seed"] for r in runs}) == 2
    assert all(0.05 < r["score"] <= 1.0 for r in runs if r["task"] == "digits")
    for task in ("digits", "lm"):  # the baselines are held to the paper's description length at the same capacity
        paper = next(r for r in runs if r["task"] == task and r["procedure"] == "paper" and r["q"] == 32)
        for pruned in (r for r in runs if r["task"] == task and r["procedure"] in ("magnitude", "l0")):
            assert (
                paper["description_length_bits"] * 0.999
                < pruned["description_length_bits"]
                <= paper["description_length_bits"]
            )
        q4 = next(r for r in runs if r["task"] == task and r["procedure"] == "paper" and r["q"] == 4)
        assert q4["description_length_bits"] < paper["description_length_bits"]
        assert next(r for r in runs if r["task"] == task and r["procedure"] == "dense")["bits_per_param"] == 32
