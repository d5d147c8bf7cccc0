import json
import re

import pytest
from conftest import build
from transformers import AutoModelForCausalLM

from momos_hf.app.cli import main
from momos_hf.app.text import byte_tokenizer, calibration_batches


@pytest.mark.slow
def test_demo_trains_and_reports(capsys):
    main(["demo", "--steps", "8", "--k", "64"])
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("validation loss"))
    before, after = (float(x) for x in line.split()[2:5:2])
    assert after < before - 0.5
    assert "bits per weight" in out and "BDM" in out


def test_report_on_a_local_model(tmp_path, capsys):
    build("bert").save_pretrained(tmp_path / "bert")
    main(
        [
            "report",
            str(tmp_path / "bert"),
            "--k",
            "16",
            "--s",
            "4",
            "--max_bytes",
            "4096",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    out = capsys.readouterr().out
    assert "encoder.layer.1.output.dense" in out and "x fp32" in out
    main(
        [
            "report",
            str(tmp_path / "bert"),
            "--k",
            "16",
            "--s",
            "4",
            "--max_bytes",
            "0",
            "--target_regex",
            r".*\.1\..*dense",
        ]
    )
    regex_out = capsys.readouterr().out
    assert "converted layers     3 " in regex_out
    main(
        [
            "report",
            str(tmp_path / "bert"),
            "--k",
            "16",
            "--s",
            "4",
            "--max_bytes",
            "0",
            "--target_modules",
            "all-linear",
        ]
    )
    assert "converted layers     13 " in capsys.readouterr().out  # the pooler too
    assert '"bits_per_weight"' in (tmp_path / "r.json").read_text()


def fails(argv, capsys):
    """Run the CLI expecting a user error: exit status 2 and one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("momos-hf: error: "), err
    return err


def test_errors_are_one_clear_line(tmp_path, capsys):
    build("bert").save_pretrained(tmp_path / "bert")
    assert "k=4096 motifs do not fit" in fails(["report", str(tmp_path / "bert"), "--k", "4096", "--s", "4"], capsys)
    assert "/nope is not a local model folder" in fails(
        ["compress", "/nope", "--output_dir", str(tmp_path / "o")], capsys
    )
    assert "/nope is not a folder" in fails(["info", "/nope"], capsys)
    assert "has no config.json" in fails(["push", str(tmp_path), "me/x"], capsys)  # before any network call
    (tmp_path / "file").write_text("x")
    assert "it is a file, not a folder" in fails(
        ["compress", str(tmp_path / "bert"), "--k", "16", "--s", "4", "--output_dir", str(tmp_path / "file")], capsys
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info"], "the following arguments are required: directory"),
        (["compress", "x"], "the following arguments are required: --output_dir"),
        (["compress", "x", "--output_dir", "y", "--k", "abc"], "argument --k: invalid positive_int value: 'abc'"),
        (
            ["compress", "x", "--output_dir", "y", "--calibration_samples", "0"],
            "argument --calibration_samples: must be >= 1",
        ),
        (["report", "--max_bytes", "-5"], "argument --max_bytes: must be >= 0, got -5"),
        (["compress", "x", "--output_dir", "y", "--finetune_lr", "nan"], "argument --finetune_lr: must be a finite"),
        (["compress", "x", "--output_dir", "y", "--finetune_lr", "inf"], "argument --finetune_lr: must be a finite"),
        (["compress", "x", "--output_dir", "y", "--finetune_lr", "-1"], "argument --finetune_lr: must be a finite"),
        (["compress", "x", "--output_dir", "y", "--seed", "-1"], "argument --seed: must be in [0, 4294967295]"),
        (["compress", "x", "--output_dir", "y", "--motif_bits", "1"], "argument --motif_bits: must be in [2, 16]"),
        (["report", "--kmeans_iters", "1000000"], "argument --kmeans_iters: must be in [0, 10000]"),
        (["report", "--activation_budget_mb", "-1"], "argument --activation_budget_mb: must be >= 0"),
        (["report", "--calibration_seq_len", "0"], "argument --calibration_seq_len: must be >= 1"),
        (["demo", "--steps", "0"], "argument --steps: must be >= 1"),
        (["demo", "--seed", "-5"], "argument --seed: must be in [0, 4294967295]"),
        (["demo", "--k", "nan"], "argument --k: invalid positive_int value: 'nan'"),
        (["push", "x", "me/x", "--token", "hf_X"], "--token takes no value on the command line"),
        (["push", "x", "me/x", "--token_file", "/nope/token"], "token file /nope/token: No such file"),
    ],
)
def test_argument_errors_are_one_line_too(argv, message, capsys):
    err = fails(argv, capsys)
    assert message in err and "hf_X" not in err  # a refused token is never repeated


def test_version_and_defaults_in_help(capsys):
    from momos_hf import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"momos-hf {__version__}"
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    help_text = capsys.readouterr().out
    assert "(default: 256)" in help_text and "(default: auto)" in help_text and "--motif_scope" in help_text
    options = re.split(r"\n  -", help_text)[1:]
    assert len(options) > 20 and all(option.count("default") <= 1 for option in options)  # each default once
    assert "(default: None)" not in help_text


def test_demo_flags_before_the_command_suggest_the_demo(capsys):
    assert "options go after a command: for the demo, `momos-hf demo --steps 3`" in fails(["--steps", "3"], capsys)


def test_compress_then_info(tmp_path, capsys):
    import torch
    from conftest import model_inputs
    from transformers import AutoModelForCausalLM

    build("llama").save_pretrained(tmp_path / "dense")
    main(
        [
            "compress",
            str(tmp_path / "dense"),
            "--output_dir",
            str(tmp_path / "momos"),
            "--k",
            "16",
            "--s",
            "4",
            "--motif_scope",
            "global",
        ]
    )
    compress_out = capsys.readouterr().out
    main(["info", str(tmp_path / "momos")])
    info = capsys.readouterr().out
    assert info in compress_out + "\n"
    assert "MoMos layers         14 (1 dictionaries)" in info
    assert "= 1.0000x their description length" in info
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "momos")
    with torch.no_grad():
        assert torch.isfinite(model(**model_inputs("llama")).logits).all()
    # Compressing the MoMos checkpoint again with other settings would mislabel its layers: refused.
    assert "fitted with other settings (k=16, not 8)" in fails(
        [
            "compress",
            str(tmp_path / "momos"),
            "--output_dir",
            str(tmp_path / "again"),
            "--k",
            "8",
            "--s",
            "4",
            "--motif_scope",
            "global",
        ],
        capsys,
    )
    # Compressing into the model's own folder would overwrite its config.json: refused before loading it.
    assert "is the model folder: give the MoMos checkpoint a folder of its own" in fails(
        ["compress", str(tmp_path / "dense"), "--output_dir", str(tmp_path / "dense"), "--k", "16", "--s", "4"], capsys
    )


def test_compress_keeps_the_dtype_the_model_was_saved_in(tmp_path, capsys):
    import torch

    build("llama").to(torch.bfloat16).save_pretrained(tmp_path / "dense")
    main(["compress", str(tmp_path / "dense"), "--output_dir", str(tmp_path / "auto"), "--k", "16", "--s", "4"])
    main(
        [
            "compress",
            str(tmp_path / "dense"),
            "--output_dir",
            str(tmp_path / "fp32"),
            "--k",
            "16",
            "--s",
            "4",
            "--torch_dtype",
            "float32",
        ]
    )
    capsys.readouterr()
    configs = {name: json.loads((tmp_path / name / "config.json").read_text()) for name in ("auto", "fp32")}
    assert configs["auto"]["dtype"] == "bfloat16" and configs["fp32"]["dtype"] == "float32"


def test_info_on_a_dense_folder_is_refused(tmp_path, capsys):
    build("llama").save_pretrained(tmp_path)
    assert "is not a MoMos checkpoint" in fails(["info", str(tmp_path)], capsys)


def test_compress_fine_tunes_towards_the_dense_model(tmp_path, capsys):
    import torch

    from momos_hf.app.text import byte_tokenizer, calibration_batches, embedded_text
    from momos_hf.train.distill import teacher_targets, top_kl

    text = tmp_path / "calibration.txt"
    text.write_text(embedded_text(), encoding="utf-8")
    model = build("llama")
    model.resize_token_embeddings(257)
    with torch.no_grad():  # random blocks barely touch the residual stream: larger ones make conversion matter
        for name, param in model.named_parameters():
            if param.dim() == 2 and "layers" in name:
                param.mul_(10)
    model.save_pretrained(tmp_path / "dense")
    byte_tokenizer().save_pretrained(tmp_path / "dense")
    args = ["compress", str(tmp_path / "dense"), "--k", "8", "--s", "4", "--scale"]
    calibration = ["--calibration_file", str(text), "--calibration_samples", "8", "--calibration_seq_len", "32"]
    assert "--finetune_steps needs --calibration_file" in fails(
        args + ["--output_dir", str(tmp_path / "x"), "--finetune_steps", "4"], capsys
    )
    assert "--finetune_lr is used with --finetune_steps only" in fails(
        args + ["--output_dir", str(tmp_path / "x"), "--finetune_lr", "1"], capsys
    )
    # the default value given explicitly is refused too: the flag, not its value, is what has no effect
    assert "--finetune_lr is used with --finetune_steps only" in fails(
        args + ["--output_dir", str(tmp_path / "x"), "--finetune_lr", "1e-4"], capsys
    )
    assert "argument --finetune_lr: must be a finite number in (0, 1], got -1" in fails(
        args + calibration + ["--output_dir", str(tmp_path / "x"), "--finetune_steps", "4", "--finetune_lr=-1"],
        capsys,
    )
    assert not (tmp_path / "x").exists()
    main(args + ["--output_dir", str(tmp_path / "plain")])
    main(
        args
        + calibration
        + ["--output_dir", str(tmp_path / "tuned"), "--finetune_steps", "16", "--finetune_lr", "3e-3"]
    )
    targets = teacher_targets(model.eval(), calibration_batches(byte_tokenizer(), str(text), 8, 32))

    def kl(folder):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / folder).eval()
        with torch.no_grad():
            return sum(
                float(top_kl(loaded(**w).logits[0], i, p))
                for w, i, p in zip(targets.inputs, targets.ids, targets.logprobs)
            )

    assert kl("tuned") < 0.8 * kl("plain")  # measured 0.70


def test_compress_data_aware_from_a_calibration_file(tmp_path, capsys):
    from momos_hf.app.text import byte_tokenizer, embedded_text

    text = tmp_path / "calibration.txt"
    text.write_text(embedded_text(), encoding="utf-8")
    model = build("gpt2")
    model.resize_token_embeddings(257)
    model.save_pretrained(tmp_path / "dense")
    byte_tokenizer().save_pretrained(tmp_path / "dense")
    args = [
        "compress",
        str(tmp_path / "dense"),
        "--output_dir",
        str(tmp_path / "momos"),
        "--k",
        "16",
        "--s",
        "4",
        "--fit",
        "data-aware",
    ]
    assert "--fit data-aware needs --calibration_file" in fails(args, capsys)
    main(args + ["--calibration_file", str(text), "--calibration_samples", "8", "--calibration_seq_len", "32"])
    assert "MoMos layers         8" in capsys.readouterr().out
    config = json.loads((tmp_path / "momos" / "config.json").read_text())
    assert config["quantization_config"]["momos_config"]["fit"] == "data-aware"
    assert "--calibration_file is used by --fit data-aware and --finetune_steps only" in fails(
        args[:-2] + ["--calibration_file", str(text)], capsys
    )
    calibration = ["--calibration_file", str(text), "--calibration_samples", "8", "--calibration_seq_len", "32"]
    offload = tmp_path / "offload"
    offload.mkdir()
    main(
        args
        + calibration
        + [
            "--sequential",
            "--offload_folder",
            str(offload),
            "--activation_budget_mb",
            "0",
            "--output_dir",
            str(tmp_path / "sequential"),
            "--resume_folder",
            str(tmp_path / "resume"),
        ]
    )
    assert "MoMos layers         8" in capsys.readouterr().out and not list(offload.iterdir())
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == [
        "block-0.safetensors",
        "block-1.safetensors",
        "momos-resume.json",
    ]
    assert "used with --sequential only" in fails(
        args + calibration + ["--resume_folder", str(tmp_path / "resume")], capsys
    )
    assert "used with --sequential only" in fails(args + calibration + ["--offload_folder", str(offload)], capsys)
    assert "used with --sequential only" in fails(args + calibration + ["--activation_budget_mb", "2048"], capsys)
    assert "--sequential calibrates --fit data-aware" in fails(args[:-2] + ["--sequential"], capsys)


def test_flags_are_checked_before_the_model_is_loaded(tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text " * 50)
    missing = str(tmp_path / "missing-model")  # were the model loaded first, this would be the error
    data_aware = ["--fit", "data-aware", "--calibration_file", str(text)]
    for flags, message in (
        (["--output_dir", missing], "is the model folder: give the MoMos checkpoint a folder of its own"),
        (
            ["--output_dir", "o", *data_aware, "--calibration_samples", "100000000"],
            "need 190.7 GiB .* over the 1.0 GiB",
        ),
        (["--output_dir", "o", "--sequential"], "--sequential calibrates --fit data-aware"),
        (["--output_dir", "o", "--finetune_lr", "0.1"], "--finetune_lr is used with --finetune_steps only"),
        (["--output_dir", "o", "--fit", "data-aware"], "--fit data-aware needs --calibration_file"),
    ):
        err = fails(["compress", missing, *flags], capsys)
        assert re.search(message, err) and "not a local model folder" not in err, err


def test_calibration_is_bounded_by_the_text_and_the_vocabulary(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("abcdefgh" * 8)  # 64 byte tokens: 57 distinct windows of 8
    assert len(calibration_batches(byte_tokenizer(), str(text), 57, 8)) == 8
    with pytest.raises(ValueError, match="gives 57 distinct windows of 8 tokens, fewer than the 58 calibration"):
        calibration_batches(byte_tokenizer(), str(text), 58, 8)
    with pytest.raises(ValueError, match=r"gives token id \d+ .* the model has 10 embeddings: the tokenizer is not"):
        calibration_batches(byte_tokenizer(), str(text), 4, 8, vocab_size=10)
    with pytest.raises(ValueError, match="100000000 calibration windows of 128 tokens need 190.7 GiB"):
        calibration_batches(byte_tokenizer(), str(tmp_path / "never-read.txt"), 10**8, 128)
