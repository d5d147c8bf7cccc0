import json

import pytest
from conftest import build

from momos_hf.cli import main


def test_demo_trains_and_reports(capsys):
    main(["demo", "--steps", "8", "--k", "64"])
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("validation loss"))
    before, after = (float(x) for x in line.split()[2:5:2])
    assert after < before - 0.5
    assert "bits per weight" in out and "BDM" in out


def test_report_on_a_local_model(tmp_path, capsys):
    build("bert").save_pretrained(tmp_path / "bert")
    main(["report", str(tmp_path / "bert"), "--k", "16", "--s", "4", "--max_bytes", "4096", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "encoder.layer.1.output.dense" in out and "x fp32" in out
    main(["report", str(tmp_path / "bert"), "--k", "16", "--s", "4", "--max_bytes", "0", "--target_regex", r".*\.1\..*dense"])
    regex_out = capsys.readouterr().out
    assert "converted layers     3 " in regex_out
    main(["report", str(tmp_path / "bert"), "--k", "16", "--s", "4", "--max_bytes", "0", "--target_modules", "all-linear"])
    assert "converted layers     13 " in capsys.readouterr().out  # the pooler too
    assert '"bits_per_weight"' in (tmp_path / "r.json").read_text()


def test_errors_are_one_clear_line(tmp_path):
    build("bert").save_pretrained(tmp_path / "bert")
    with pytest.raises(SystemExit, match=r"momos-hf: error: k=4096 motifs do not fit"):
        main(["report", str(tmp_path / "bert"), "--k", "4096", "--s", "4"])


def test_compress_then_info(tmp_path, capsys):
    import torch
    from conftest import model_inputs
    from transformers import AutoModelForCausalLM

    build("llama").save_pretrained(tmp_path / "dense")
    main(["compress", str(tmp_path / "dense"), "--out", str(tmp_path / "momos"), "--k", "16", "--s", "4", "--scope", "global"])
    compress_out = capsys.readouterr().out
    main(["info", str(tmp_path / "momos")])
    info = capsys.readouterr().out
    assert info in compress_out + "\n"
    assert "MoMos layers         14 (1 dictionaries)" in info
    assert "= 1.0000x their description length" in info
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "momos")
    with torch.no_grad():
        assert torch.isfinite(model(**model_inputs("llama")).logits).all()


def test_info_on_a_dense_folder_is_refused(tmp_path):
    build("llama").save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match="is not a MoMos checkpoint"):
        main(["info", str(tmp_path)])


def test_compress_data_aware_from_a_calibration_file(tmp_path, capsys):
    from momos_hf.data import byte_tokenizer
    from momos_hf.demo import embedded_text

    text = tmp_path / "calibration.txt"
    text.write_text(embedded_text(), encoding="utf-8")
    model = build("gpt2")
    model.resize_token_embeddings(257)
    model.save_pretrained(tmp_path / "dense")
    byte_tokenizer().save_pretrained(tmp_path / "dense")
    args = ["compress", str(tmp_path / "dense"), "--out", str(tmp_path / "momos"), "--k", "16", "--s", "4", "--init", "data-aware"]
    with pytest.raises(SystemExit, match="--init data-aware needs --calibration_file"):
        main(args)
    main(args + ["--calibration_file", str(text), "--calibration_samples", "8", "--calibration_seq_len", "32"])
    assert "MoMos layers         8" in capsys.readouterr().out
    config = json.loads((tmp_path / "momos" / "config.json").read_text())
    assert config["quantization_config"]["momos_config"]["init"] == "data-aware"
    with pytest.raises(SystemExit, match="--calibration_file is used by --init data-aware only"):
        main(args[:-2] + ["--calibration_file", str(text)])
