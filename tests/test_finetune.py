"""The training recipe, run for real: two CPU processes through `accelerate launch` (gloo), and in-process
runs on text files loaded through `datasets`."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from momos_hf import MoMosLinear
from momos_hf.data import load_text_datasets

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "finetune.py"
sys.path.insert(0, str(RECIPE.parent))
import finetune  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, *args):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(RECIPE), *args]
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def final_loss(output):
    return float(re.search(r"final: eval loss ([\d.]+)", output)[1])


def test_two_processes_train_agree_save_and_resume(tmp_path):
    common = ["--max_steps", "8", "--k", "64", "--project_every", "4", "--per_device_train_batch_size", "4",
              "--logging_steps", "2"]
    out = launch(tmp_path, *common, "--output_dir", str(tmp_path / "run"), "--checkpointing_steps", "4")
    assert "world size 2" in out
    assert "MoMos state identical on all 2 ranks: True" in out
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 8
    assert results["eval_loss"] < results["initial_eval_loss"] - 0.3
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert any(isinstance(m, MoMosLinear) for m in model.modules())
    assert "## Evaluation" in (tmp_path / "run" / "README.md").read_text()
    resumed = launch(tmp_path, *common, "--output_dir", str(tmp_path / "resumed"),
                     "--resume_from_checkpoint", str(tmp_path / "run" / "step_4"))
    assert "resumed from step 4" in resumed
    assert final_loss(resumed) == final_loss(out)  # the same run, continued exactly


@pytest.fixture
def text_files(tmp_path):
    lines = [f"Line {i}: the quick brown fox jumps over the lazy dog, {i % 7} times." for i in range(400)]
    (tmp_path / "train.txt").write_text("\n".join(lines[:360]))
    (tmp_path / "valid.txt").write_text("\n".join(lines[360:]))
    return tmp_path


@pytest.mark.parametrize("mode", ["motifs", "projected", "dense"])
def test_recipe_modes_on_text_files(text_files, mode, monkeypatch):
    monkeypatch.chdir(text_files)
    # motifs mode starts from a data-aware fit calibrated on two training batches
    extra = ["--modules_to_save", "embed_tokens", "lm_head", "--init", "data-aware", "--calibration_batches", "2"] if mode == "motifs" else []
    metrics = finetune.main(["--train_file", "train.txt", "--validation_file", "valid.txt", "--max_steps", "12",
                             "--train_mode", mode, "--k", "64", "--project_every", "6", "--block_size", "64",
                             "--learning_rate", "3e-3", "--output_dir", "out", "--complexity_every", "4", *extra])
    assert metrics["eval_loss"] < metrics["initial_eval_loss"] - 0.5
    assert ("bits_per_weight" in metrics) == (mode != "dense")
    history = json.loads((text_files / "out" / "complexity.json").read_text())
    steps = [row["step"] for row in history]  # every 4 steps, less often if tracking costs over 10%
    assert steps[0] == 0 and len(steps) >= 2 and all(s % 4 == 0 for s in steps)
    assert 0 < metrics["complexity_overhead"] < 1 and history[-1]["gzip_ratio"] > 1
    model = AutoModelForCausalLM.from_pretrained(text_files / "out")
    assert any(isinstance(m, MoMosLinear) for m in model.modules()) == (mode != "dense")


def test_distillation_from_the_dense_model(text_files, monkeypatch):
    monkeypatch.chdir(text_files)
    # First a short dense run, then MoMos training distilled from it.
    finetune.main(["--train_file", "train.txt", "--max_steps", "10", "--train_mode", "dense", "--block_size", "64",
                   "--learning_rate", "3e-3", "--output_dir", "dense"])
    metrics = finetune.main(["--model_name_or_path", "dense", "--train_file", "train.txt", "--max_steps", "6",
                             "--train_mode", "ste", "--k", "64", "--distill", "--distill_hidden_weight", "0.1",
                             "--block_size", "64", "--output_dir", "student"])
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert metrics["ranks_agree"] and metrics["bits_per_weight"] < 2


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        finetune.parse_args(["--model_name_or_path", "a", "--model_config", "b.json"])
    with pytest.raises(SystemExit):
        finetune.parse_args(["--push_to_hub", "--hub_model_id", "me/x", "--train_mode", "dense"])
    with pytest.raises(ValueError, match="expected a .txt, .json, .jsonl or .csv file"):
        load_text_datasets(train_file="data.parquet")


def test_bf16_mixed_precision(text_files, monkeypatch, capsys):
    from accelerate.state import AcceleratorState

    monkeypatch.chdir(text_files)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(True)  # Accelerate keeps one state per process; earlier tests set "no"
    try:
        metrics = finetune.main(["--train_file", "train.txt", "--max_steps", "8", "--train_mode", "ste", "--k", "64",
                                 "--project_every", "4", "--block_size", "64", "--learning_rate", "3e-3", "--output_dir", "bf16"])
    finally:
        AcceleratorState._reset_state(True)
    assert "mixed precision bf16" in capsys.readouterr().out
    assert metrics["eval_loss"] < metrics["initial_eval_loss"] - 0.3
    model = AutoModelForCausalLM.from_pretrained(text_files / "bf16")
    assert any(isinstance(m, MoMosLinear) for m in model.modules())
