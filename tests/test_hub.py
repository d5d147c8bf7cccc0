"""Push to and pull from a Hub over real HTTP: the real `huggingface_hub` client and Transformers talk to
a Hub-API stand-in on 127.0.0.1 (tests/hub_server.py), the real Hub being out of reach here. Clients run in
fresh processes, so that `HF_ENDPOINT` is read as users set it."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import build
from hub_server import HubServer
from huggingface_hub import ModelCard

from momos_hf import MoMosConfig, get_momos_model
from momos_hf.report.card import render_card

TESTS = os.path.dirname(os.path.abspath(__file__))


def run_client(endpoint, code, tmp_path):
    env = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PYTHONPATH": TESTS,
    }
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


@pytest.mark.slow
def test_push_then_pull_gives_identical_logits(hub, tmp_path):
    out = run_client(
        hub.endpoint,
        f"""
        import torch
        from conftest import build, model_inputs
        from transformers import AutoModelForCausalLM
        from momos_hf import MoMosConfig, MoMosModel, get_momos_model

        mm = get_momos_model(build("gpt2"), MoMosConfig(k=16, s=4, kmeans_iters=2, motif_scope="global"))
        url = mm.push_to_hub("org/gpt2-momos", token="hf_test", private=True, commit_message="first")
        assert url.startswith("{hub.endpoint}/org/gpt2-momos/commit/"), url
        inputs = model_inputs("gpt2")
        with torch.no_grad():
            reference = mm(**inputs).logits
            pulled = AutoModelForCausalLM.from_pretrained("org/gpt2-momos", token="hf_test")(**inputs).logits
            wrapped = MoMosModel.from_pretrained("org/gpt2-momos", token="hf_test")(**inputs).logits
        print("identical", torch.equal(pulled, reference), torch.equal(wrapped, reference))
    """,
        tmp_path,
    )
    assert "identical True True" in out
    files = hub.state.repos["org/gpt2-momos"]
    weights = json.loads(files["config.json"])["quantization_config"]["weights"]
    assert set(files) == {"config.json", weights, "generation_config.json", "README.md"}
    assert hub.state.private["org/gpt2-momos"] and set(hub.state.tokens_seen) == {"hf_test"}
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and "momos" in card.data.tags


@pytest.mark.slow
def test_cli_push_uploads_the_checkpoint_and_nothing_else(hub, tmp_path):
    mm = get_momos_model(build("bert"), MoMosConfig(k=16, s=4, kmeans_iters=2))
    folder = tmp_path / "ckpt"
    mm.save_pretrained(folder)
    weights = json.loads((folder / "config.json").read_text())["quantization_config"]["weights"]
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# my own card\n")
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / ".secrets").mkdir()
    (folder / ".secrets" / "api_key.txt").write_text("hf_secret")
    (folder / "step_4").mkdir()
    (folder / "step_4" / "optimizer.bin").write_bytes(b"pickle")
    (folder / "hparams.yml").write_text("hub_token: hf_secret")
    (folder / "notes.txt").write_text("private notes")
    (tmp_path / "token").write_text("hf_cli\n")
    out = run_client(
        hub.endpoint,
        f"""
        from momos_hf.app.cli import main
        main(["push", r"{folder}", "me/bert-momos", "--token_file", r"{tmp_path / "token"}", "--revision", "main"])
    """,
        tmp_path,
    )
    assert "pushed" in out and "me/bert-momos" in out
    assert hub.state.tokens_seen and set(hub.state.tokens_seen) == {"hf_cli"}
    files = hub.state.repos["me/bert-momos"]
    assert set(files) == {"config.json", weights, "README.md", "tokenizer_config.json"}
    assert files["README.md"].decode().endswith("# my own card\n")  # the user's card is kept
    assert files[weights] == (folder / weights).read_bytes()
    assert hub.state.private["me/bert-momos"]  # private unless --public


@pytest.mark.slow
def test_push_checks_every_file_before_the_first_request(hub, tmp_path):
    mm = get_momos_model(build("bert"), MoMosConfig(k=16, s=4, kmeans_iters=2))
    folder = tmp_path / "ckpt"
    mm.save_pretrained(folder)
    weights = folder / json.loads((folder / "config.json").read_text())["quantization_config"]["weights"]
    (tmp_path / "elsewhere.json").write_text("{}")
    (folder / "tokenizer.json").symlink_to(tmp_path / "elsewhere.json")  # a link out of the folder
    (tmp_path / "token").write_text("hf_cli\n")
    code = f"""
        from momos_hf.app.cli import main
        main(["push", r"{folder}", "me/bad", "--token_file", r"{tmp_path / "token"}"])
    """
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "PYTHONPATH": TESTS}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and "tokenizer.json is not a regular file inside" in done.stderr
    (folder / "tokenizer.json").unlink()
    data = bytearray(weights.read_bytes())
    data[-3] ^= 1
    weights.write_bytes(bytes(data))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and "is corrupted: its sha256 differs" in done.stderr
    assert hub.state.requests == [] and "me/bad" not in hub.state.repos


@pytest.mark.slow
def test_push_to_hub_creates_private_repositories_by_default(hub, tmp_path):
    run_client(
        hub.endpoint,
        """
        from conftest import build
        from momos_hf import MoMosConfig, get_momos_model

        mm = get_momos_model(build("llama"), MoMosConfig(k=16, s=4, kmeans_iters=1))
        mm.push_to_hub("org/default")
        mm.push_to_hub("org/public", private=False)
        mm.base_model.push_to_hub("org/through-transformers")  # PreTrainedModel.push_to_hub saves through MoMos
    """,
        tmp_path,
    )
    assert hub.state.private["org/default"] and not hub.state.private["org/public"]
    assert hub.state.private["org/through-transformers"]
    config = json.loads(hub.state.repos["org/through-transformers"]["config.json"])
    assert config["quantization_config"]["weights"] in hub.state.repos["org/through-transformers"]


def test_card_renders_and_parses(tmp_path):
    torch.manual_seed(0)
    mm = get_momos_model(build("llama"), MoMosConfig(k=16, s=4, kmeans_iters=2))
    mm.base_model_name = "HuggingFaceTB/SmolLM2-135M"
    mm.save_pretrained(tmp_path)
    card = ModelCard(render_card(tmp_path, "org/smol-momos"))
    assert card.data.library_name == "transformers"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert set(card.data.tags) == {"momos", "mosaic-of-motifs", "compression"}
    text = card.text
    assert 'AutoModelForCausalLM.from_pretrained("org/smol-momos")' in text
    assert "| MoMos layers on disk / their description length | 1.0000 |" in text
    assert "mean relative weight error at fit time" in text and "lzma" in text
    assert "$" not in text  # every placeholder filled
