"""The training recipe, run for real: two CPU processes through `accelerate launch` (gloo), and in-process
runs on text files loaded through `datasets`."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from momos_hf import MoMosLinear
from momos_hf.app.text import load_text_datasets

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "finetune.py"
sys.path.insert(0, str(RECIPE.parent))
import finetune  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, *args):
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(RECIPE),
        *args,
    ]
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=600)  # a bound for a busy machine, not a speed check
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks: nothing outlives the test
        out, err = process.communicate()
        pytest.fail(f"accelerate launch did not finish in 600 s; its output ends with:\n{(out + err)[-4000:]}")
    assert process.returncode == 0, err[-4000:]
    return out


def final_loss(output):
    return float(re.search(r"final: eval loss ([\d.]+)", output)[1])


@pytest.mark.slow
def test_two_processes_train_agree_save_and_resume(tmp_path):
    common = [
        "--max_steps",
        "8",
        "--k",
        "64",
        "--train_mode",
        "ste",
        "--project_every",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "2",
        "--max_eval_samples",
        "16",
    ]
    out = launch(tmp_path, *common, "--output_dir", str(tmp_path / "run"), "--checkpointing_steps", "4")
    assert "world size 2" in out
    assert "MoMos state identical on all 2 ranks: True" in out
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 8
    assert results["eval_loss"] < results["initial_eval_loss"] - 0.3
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert any(isinstance(m, MoMosLinear) for m in model.modules())
    assert "## Evaluation" in (tmp_path / "run" / "README.md").read_text()
    resumed = launch(
        tmp_path,
        *common,
        "--output_dir",
        str(tmp_path / "resumed"),
        "--resume_from_checkpoint",
        str(tmp_path / "run" / "step_4"),
    )
    assert "resumed from step 4" in resumed
    assert final_loss(resumed) == final_loss(out)  # the same run, continued exactly


@pytest.mark.slow
def test_lora_adapters_on_a_momos_checkpoint_with_two_processes(tmp_path):
    from peft import PeftConfig

    from momos_hf import MoMosConfig, get_momos_model
    from momos_hf.app.demo import tiny_llama
    from momos_hf.app.text import byte_tokenizer
    from momos_hf.integrations.lora import load_lora
    from momos_hf.layer import momos_layers

    tokenizer = byte_tokenizer()
    get_momos_model(tiny_llama(0, len(tokenizer)), MoMosConfig(k=64, s=16)).save_pretrained(
        tmp_path / "base", tokenizer=tokenizer
    )
    out = launch(
        tmp_path,
        "--model_name_or_path",
        str(tmp_path / "base"),
        "--lora_r",
        "8",
        "--max_steps",
        "8",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "1e-2",
        "--max_eval_samples",
        "16",
        "--output_dir",
        str(tmp_path / "adapter"),
    )
    assert "world size 2" in out and "adapter identical on all 2 ranks: True" in out
    results = json.loads((tmp_path / "adapter" / "eval_results.json").read_text())
    assert results["eval_loss"] < results["initial_eval_loss"] - 0.05
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()
    }
    assert not list((tmp_path / "adapter").glob("model*.safetensors"))  # the base is not copied
    assert PeftConfig.from_pretrained(tmp_path / "adapter").base_model_name_or_path == str(tmp_path / "base")
    assert str(tmp_path / "base") in (tmp_path / "adapter" / "README.md").read_text()
    model = load_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert momos_layers(model)


@pytest.fixture
def text_files(tmp_path):
    lines = [f"Line {i}: the quick brown fox jumps over the lazy dog, {i % 7} times." for i in range(400)]
    (tmp_path / "train.txt").write_text("\n".join(lines[:360]))
    (tmp_path / "valid.txt").write_text("\n".join(lines[360:]))
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["motifs", "projected", "dense"])
def test_recipe_modes_on_text_files(text_files, mode, monkeypatch):
    monkeypatch.chdir(text_files)
    (text_files / "out").mkdir()
    (text_files / "out" / "README.md").write_text("my own notes")  # a README of the user's is never replaced
    # motifs mode starts from a data-aware fit calibrated on two training batches
    extra = (
        ["--modules_to_save", "embed_tokens", "lm_head", "--fit", "data-aware", "--calibration_batches", "2"]
        if mode == "motifs"
        else []
    )
    metrics = finetune.main(
        [
            "--train_file",
            "train.txt",
            "--validation_file",
            "valid.txt",
            "--max_steps",
            "12",
            "--train_mode",
            mode,
            "--k",
            "64",
            "--project_every",
            "6",
            "--block_size",
            "64",
            "--learning_rate",
            "3e-3",
            "--output_dir",
            "out",
            "--complexity_every",
            "4",
            "--complexity_budget",
            "0",
            *extra,
        ]
    )
    assert metrics["eval_loss"] < metrics["initial_eval_loss"] - 0.5
    assert ("bits_per_weight" in metrics) == (mode != "dense")
    history = json.loads((text_files / "out" / "complexity.json").read_text())
    steps = [row["step"] for row in history]  # every 4 steps: the budget is lifted
    assert steps == [0, 4, 8, 12]
    assert 0 < metrics["complexity_overhead"] < 1 and history[-1]["gzip_ratio"] > 1
    model = AutoModelForCausalLM.from_pretrained(text_files / "out")
    assert any(isinstance(m, MoMosLinear) for m in model.modules()) == (mode != "dense")
    assert (text_files / "out" / "README.md").read_text() == "my own notes"


@pytest.mark.slow
def test_distillation_from_the_dense_model(text_files, monkeypatch):
    monkeypatch.chdir(text_files)
    # First a short dense run, then MoMos training distilled from it.
    finetune.main(
        [
            "--train_file",
            "train.txt",
            "--max_steps",
            "10",
            "--train_mode",
            "dense",
            "--block_size",
            "64",
            "--learning_rate",
            "3e-3",
            "--output_dir",
            "dense",
        ]
    )
    metrics = finetune.main(
        [
            "--model_name_or_path",
            "dense",
            "--train_file",
            "train.txt",
            "--max_steps",
            "6",
            "--train_mode",
            "ste",
            "--k",
            "64",
            "--distill",
            "--distill_hidden_weight",
            "0.1",
            "--block_size",
            "64",
            "--output_dir",
            "student",
        ]
    )
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert metrics["ranks_agree"] and metrics["bits_per_weight"] < 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model_name_or_path", "a", "--model_config", "b.json"], "not both"),
        (["--push_to_hub", "--hub_model_id", "me/x", "--train_mode", "dense"], "publishes MoMos checkpoints"),
        (["--max_steps", "0"], "argument --max_steps: must be >= 1, got 0"),
        (["--block_size", "0"], "argument --block_size: must be >= 1, got 0"),
        (["--checkpointing_steps", "-2"], "argument --checkpointing_steps: must be >= 0"),
        (["--lora_r", "8"], "--lora_r trains adapters on a MoMos checkpoint: give it with --model_name_or_path"),
        (["--lora_r", "8", "--model_name_or_path", "m", "--distill"], "distillation needs the dense model"),
        (["--lora_r", "0", "--model_name_or_path", "m"], "argument --lora_r: must be in [1, 4096], got 0"),
        (
            ["--lora_r", "8", "--model_name_or_path", "m", "--lora_dropout", "1"],
            "argument --lora_dropout: must be a finite number in [0, 1), got 1",
        ),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        finetune.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--lora_alpha", "nan"),
        ("--lora_alpha", "0"),
        ("--lora_dropout", "-0.1"),
        ("--lora_r", "100000"),
        ("--learning_rate", "inf"),
        ("--learning_rate", "-0.001"),
        ("--learning_rate", "100"),
        ("--weight_decay", "nan"),
        ("--validation_split_percentage", "-10"),
        ("--validation_split_percentage", "100"),
        ("--distill_alpha", "2"),
        ("--distill_temperature", "0"),
        ("--distill_hidden_weight", "inf"),
        ("--complexity_budget", "nan"),
        ("--seed", "-1"),
        ("--seed", str(2**40)),
        ("--motif_bits", "1"),
        ("--motif_bits", "17"),
        ("--k", "-3"),
        ("--s", "0"),
        ("--preprocessing_num_workers", "0"),
        ("--eval_steps", "-1"),
        ("--project_every", "-1"),
        ("--complexity_every", "-1"),
        ("--num_warmup_steps", "-1"),
        ("--per_device_train_batch_size", "0"),
        ("--max_train_samples", "-5"),
        ("--calibration_batches", "0"),
        ("--lr_scheduler_type", "linearr"),
    ],
)
def test_nan_inf_negative_and_absurd_numbers_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        finetune.parse_args(["--model_name_or_path", "m", "--lora_r", "4", flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"finetune.py: error: argument {flag}: ") and value in err


def test_bad_data_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="expected a .txt, .json, .jsonl or .csv file"):
        load_text_datasets(train_file="data.parquet")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        load_text_datasets(train_file=str(tmp_path / "empty.txt"))
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="binary.txt is not UTF-8 text"):
        load_text_datasets(train_file=str(tmp_path / "binary.txt"))
    with pytest.raises(ValueError, match="missing.txt is not a file"):
        load_text_datasets(train_file=str(tmp_path / "missing.txt"))


@pytest.mark.slow
def test_bf16_mixed_precision(text_files, monkeypatch, capsys):
    from accelerate.state import AcceleratorState

    monkeypatch.chdir(text_files)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(True)  # Accelerate keeps one state per process; earlier tests set "no"
    try:
        metrics = finetune.main(
            [
                "--train_file",
                "train.txt",
                "--max_steps",
                "8",
                "--train_mode",
                "ste",
                "--k",
                "64",
                "--project_every",
                "4",
                "--block_size",
                "64",
                "--learning_rate",
                "3e-3",
                "--output_dir",
                "bf16",
            ]
        )
    finally:
        AcceleratorState._reset_state(True)
    assert "mixed precision bf16" in capsys.readouterr().out
    assert metrics["eval_loss"] < metrics["initial_eval_loss"] - 0.3
    model = AutoModelForCausalLM.from_pretrained(text_files / "bf16")
    assert any(isinstance(m, MoMosLinear) for m in model.modules())


def run_recipe(tmp_path, *args, env=None):
    """The recipe as a plain process (one rank), started the way a user starts it. Its output goes to files, not
    pipes: a pipe nobody reads fills up and stalls the process."""
    name = f"recipe-{len(list(tmp_path.glob('recipe-*.out')))}"
    with open(tmp_path / f"{name}.out", "w") as out, open(tmp_path / f"{name}.err", "w") as err:
        process = subprocess.Popen(
            [sys.executable, str(RECIPE), *args],
            cwd=tmp_path,
            stdout=out,
            stderr=err,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1", **(env or {})},
        )
    process.logs = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    return process


def finish(process, timeout=600):
    """Waits for a recipe process; returns its stdout and stderr."""
    process.wait(timeout=timeout)
    return tuple(log.read_text() for log in process.logs)


@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_exactly(tmp_path):
    # 40 training blocks in batches of 4: 10 steps an epoch, so the 24 steps cross two epoch boundaries.
    common = [
        "--max_steps",
        "24",
        "--k",
        "64",
        "--train_mode",
        "ste",
        "--project_every",
        "5",
        "--block_size",
        "64",
        "--per_device_train_batch_size",
        "4",
        "--max_train_samples",
        "40",
        "--max_eval_samples",
        "16",
        "--checkpointing_steps",
        "3",
        "--learning_rate",
        "3e-3",
    ]
    one_thread = {"OMP_NUM_THREADS": "1"}  # two runs share the cores: threads that spin-wait on each other stall both
    whole = run_recipe(tmp_path, *common, "--output_dir", "whole", env=one_thread)
    killed = run_recipe(tmp_path, *common, "--output_dir", "killed", env=one_thread)
    deadline = time.monotonic() + 900  # generous: CI machines are shared and busy
    while not (tmp_path / "killed" / "step_12").exists():  # kill -9 some time after step 12 is saved
        assert killed.poll() is None, finish(killed)[1][-3000:]
        assert time.monotonic() < deadline, "step_12 was not saved in 900 s"
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    out, err = finish(whole)
    assert whole.returncode == 0, err[-3000:]
    saved = sorted(
        int(p.name.split("_")[1]) for p in (tmp_path / "killed").glob("step_*") if p.name.split("_")[1].isdigit()
    )
    resumed = run_recipe(
        tmp_path,
        *common,
        "--output_dir",
        "resumed",
        "--resume_from_checkpoint",
        f"killed/step_{saved[-1]}",
        env=one_thread,
    )
    resumed_out, err = finish(resumed)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from step {saved[-1]}" in resumed_out
    assert final_loss(resumed_out) == final_loss(out)  # the same run, continued exactly


@pytest.mark.slow
def test_incomplete_corrupted_or_finished_training_checkpoints_are_refused(text_files, monkeypatch):
    monkeypatch.chdir(text_files)
    common = ["--train_file", "train.txt", "--k", "64", "--block_size", "64", "--max_eval_samples", "8"]
    finetune.main([*common, "--max_steps", "4", "--checkpointing_steps", "2", "--output_dir", "run"])
    step = text_files / "run" / "step_4"
    for max_steps in ("3", "4"):  # past it, or exactly at it: nothing left to train
        with pytest.raises(ValueError, match=f"step_4 is at step 4, and --max_steps is {max_steps}: nothing is left"):
            finetune.main(
                [*common, "--max_steps", max_steps, "--output_dir", "again", "--resume_from_checkpoint", str(step)]
            )
    resume = [
        "--max_steps",
        "4",
        "--output_dir",
        "again",
        "--resume_from_checkpoint",
        str(text_files / "run" / "step_2"),
    ]
    for flags, differing in (
        (["--k", "8"], "k 64 there, 8 here"),
        (["--motif_bits", "8"], "motif_bits None there, 8 here"),
        (["--learning_rate", "0.01", "--seed", "1"], "learning_rate 0.001 there, 0.01 here; seed 42 there, 1 here"),
        (["--validation_split_percentage", "20"], "validation_split_percentage 10 there, 20 here"),
    ):
        with pytest.raises(
            ValueError, match=f"step_2 was saved by a run with other settings: {re.escape(differing)}$"
        ):
            finetune.main([*common, *flags, *resume])
    optimizer_file = next(p for p in step.iterdir() if p.name.startswith("optimizer"))
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:-8])
    with pytest.raises(ValueError, match="step_4 is corrupted"):
        finetune.main([*common, "--max_steps", "6", "--output_dir", "again", "--resume_from_checkpoint", str(step)])
    (text_files / "run" / "step_2" / "momos_step.json").unlink()
    with pytest.raises(ValueError, match="step_2 is not a complete training checkpoint"):
        finetune.main(
            [
                *common,
                "--max_steps",
                "6",
                "--output_dir",
                "again",
                "--resume_from_checkpoint",
                str(text_files / "run" / "step_2"),
            ]
        )


@pytest.mark.slow
def test_secrets_stay_local_and_push_uploads_only_the_checkpoint(text_files):
    from hub_server import HubServer

    (text_files / "token.txt").write_text("hf_SECRET42\n")
    with HubServer() as hub:
        run = run_recipe(
            text_files,
            "--train_file",
            "train.txt",
            "--max_steps",
            "2",
            "--k",
            "64",
            "--block_size",
            "64",
            "--max_eval_samples",
            "8",
            "--checkpointing_steps",
            "1",
            "--report_to",
            "tensorboard",
            "--output_dir",
            "out",
            "--push_to_hub",
            "--hub_model_id",
            "me/run",
            "--hub_token_file",
            "token.txt",
            env={"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(text_files / "hf")},
        )
        out, err = finish(run)
        assert run.returncode == 0, err[-3000:]
        assert "hf_SECRET42" not in out + err
        files = hub.state.repos["me/run"]
        assert hub.state.private["me/run"] and set(hub.state.tokens_seen) == {"hf_SECRET42"}
    written = [p for p in (text_files / "out").rglob("*") if p.is_file()]
    assert (text_files / "token.txt").read_text() == "hf_SECRET42\n"
    assert any("events" in p.name for p in written)  # the tracker wrote its logs...
    assert not [p for p in written if b"hf_SECRET42" in p.read_bytes()]  # ...and no file holds the token
    weights = json.loads(files["config.json"])["quantization_config"]["weights"]
    assert set(files) == {
        "config.json",
        weights,
        "generation_config.json",
        "README.md",
        "eval_results.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert not any(b"hf_SECRET42" in data for data in files.values())


@pytest.mark.parametrize("argv", [["--hub_token", "hf_SECRET42"], ["--hub_token=hf_SECRET42"], ["--hub_token"]])
def test_a_token_on_the_command_line_is_refused_without_repeating_it(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        finetune.parse_args(["--push_to_hub", "--hub_model_id", "me/x", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "hf_SECRET42" not in err
    assert "--hub_token takes no value on the command line" in err and "HF_TOKEN" in err and "--hub_token_file" in err


def test_token_files_are_checked_before_any_work(tmp_path, capsys):
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "two").write_text("hf_a hf_b\n")
    for name, message in (
        ("missing", "token file .*missing: No such file"),
        ("empty", "token file .*empty does not hold one token"),
        ("two", "token file .*two does not hold one token"),
    ):
        with pytest.raises(SystemExit):
            finetune.parse_args(["--push_to_hub", "--hub_model_id", "me/x", "--hub_token_file", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert re.search(message, err) and err.count("\n") == 1 and "hf_a" not in err
    with pytest.raises(SystemExit):
        finetune.parse_args(["--hub_token_file", str(tmp_path / "two")])
    assert "--hub_token_file is used with --push_to_hub only" in capsys.readouterr().err


@pytest.mark.slow
def test_a_failed_accelerate_launch_prints_no_token(tmp_path):
    """Accelerate prints a failed child's whole command line: with the token in a file, that line holds a path."""
    (tmp_path / "token.txt").write_text("hf_SECRET42")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(RECIPE),
            "--train_file",
            "missing.txt",
            "--push_to_hub",
            "--hub_model_id",
            "me/x",
            "--hub_token_file",
            "token.txt",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert done.returncode != 0 and "missing.txt is not a file" in done.stderr
    assert "hf_SECRET42" not in done.stdout + done.stderr


@pytest.mark.slow
def test_lora_output_keeps_user_files_reruns_and_refuses_foreign_folders(text_files, monkeypatch):
    from momos_hf import load_lora

    monkeypatch.chdir(text_files)
    common = ["--train_file", "train.txt", "--block_size", "64", "--max_eval_samples", "8", "--k", "64"]
    finetune.main([*common, "--max_steps", "2", "--output_dir", "base"])
    adapter = text_files / "adapter"
    adapter.mkdir()
    (adapter / "README.md").write_bytes(b"# my adapter notes\n")
    (adapter / "notes.txt").write_bytes(b"mine")
    lora = [*common, "--model_name_or_path", "base", "--lora_r", "4", "--max_steps", "2"]
    finetune.main([*lora, "--output_dir", "adapter"])
    finetune.main([*lora, "--output_dir", "adapter"])  # a rerun into its own output
    assert (adapter / "README.md").read_bytes() == b"# my adapter notes\n"
    assert (adapter / "notes.txt").read_bytes() == b"mine"
    model = load_lora(AutoModelForCausalLM.from_pretrained("base"), adapter)
    assert any("lora_A" in name for name, _ in model.named_parameters())

    def never_loaded(args):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(finetune, "load_model_and_tokenizer", never_loaded)
    with pytest.raises(ValueError, match="--output_dir base is the --model_name_or_path folder"):
        finetune.main([*lora, "--output_dir", "base"])
    with pytest.raises(ValueError, match="holds files a MoMos run would overwrite .*adapter_config.json"):
        finetune.main([*common, "--max_steps", "2", "--output_dir", "adapter"])
    (text_files / "mine").mkdir()
    (text_files / "mine" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds files a LoRA run would overwrite \(tokenizer.json\)"):
        finetune.main([*lora, "--output_dir", "mine"])
    assert (text_files / "mine" / "tokenizer.json").read_text() == "{}"


@pytest.mark.slow
def test_an_adapter_card_says_what_the_base_is_and_how_to_load_it(text_files, monkeypatch):
    monkeypatch.chdir(text_files)
    common = ["--train_file", "train.txt", "--block_size", "64", "--max_eval_samples", "8", "--k", "64"]
    finetune.main([*common, "--max_steps", "2", "--output_dir", "base"])
    finetune.main([*common, "--model_name_or_path", "base", "--lora_r", "4", "--max_steps", "1", "--output_dir", "a"])
    card = (text_files / "a" / "README.md").read_text()
    assert "from momos_hf import load_lora" in card and "`base`" in card and "LlamaForCausalLM" in card
    assert 'AutoModelForCausalLM.from_pretrained("base")' in card and "[More Information Needed]" not in card


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--model_name_or_path", "./no/such/model", "is neither a local path nor a Hub id"),
        ("--tokenizer_name", "/no/such/tokenizer", "is neither a local path nor a Hub id"),
        ("--dataset_name", "../no/such/data", "is neither a local path nor a Hub id"),
        ("--model_config", "no-such-config.json", "--model_config no-such-config.json does not exist"),
        ("--resume_from_checkpoint", "run/step_9", "--resume_from_checkpoint run/step_9 does not exist"),
    ],
)
def test_missing_local_paths_are_one_line(flag, value, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        finetune.parse_args([flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err


@pytest.mark.slow
def test_a_missing_model_is_one_line_from_the_command_line(text_files):
    run = run_recipe(text_files, "--model_name_or_path", "no-such-model", "--train_file", "train.txt")
    out, err = finish(run)
    lines = [line for line in err.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("finetune.py: error:"), err
    assert "no-such-model" in lines[0]
