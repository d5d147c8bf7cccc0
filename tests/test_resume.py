"""Resumable sequential conversion: saved blocks are reused exactly, and only when they match."""

import copy
import hashlib
import logging

import pytest
import torch
from conftest import build, model_inputs

from momos_hf import MoMosConfig, get_momos_model
from momos_hf.convert import Converter
from momos_hf.convert.resume import BlockResults, _content_digest

CONFIG = MoMosConfig(k=16, s=4, scale=True, fit="data-aware")


def batches(seed=0):
    return [model_inputs("llama", batch=2, length=12, seed=seed + i) for i in range(2)]


def state(mm):
    return {
        name: (layer.motifs.detach().clone(), layer.mosaic.clone(), layer.scale.detach().clone())
        for name, layer in mm.momos_layers().items()
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert all(torch.equal(x, y) for x, y in zip(a[name], b[name])), name


@pytest.fixture
def fits(monkeypatch):
    """The names of the layers each `_fit` call fitted; `fits.fail_at` makes call number n raise."""
    calls, real = [], Converter.fit

    def counting(self, matrices, *args, **kwargs):
        calls.append(sorted(matrices))
        if len(calls) == getattr(counting, "fail_at", 0):
            raise KeyboardInterrupt  # as a user's Ctrl-C would
        return real(self, matrices, *args, **kwargs)

    monkeypatch.setattr(Converter, "fit", counting)
    counting.calls = calls
    return counting


def convert(folder, config=CONFIG, seed=0):
    return get_momos_model(build("llama"), config, batches(seed), sequential=True, resume_folder=str(folder))


def test_an_interrupted_conversion_resumes_after_the_last_saved_block(tmp_path, fits, caplog):
    reference = state(get_momos_model(build("llama"), CONFIG, batches(), sequential=True))
    fits.calls.clear()
    fits.fail_at = 2
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block-0.safetensors", "momos-resume.json"]
    fits.fail_at, fits.calls[:] = 0, []
    with caplog.at_level(logging.WARNING):
        assert_same(state(convert(tmp_path)), reference)
    assert [n[0].split(".")[2] for n in fits.calls] == ["1"]  # block 0 came from its file
    assert f"reused 1 of 2 blocks from {tmp_path}" in caplog.text
    fits.calls.clear()
    assert_same(state(convert(tmp_path)), reference)
    assert fits.calls == []


def test_saved_blocks_are_used_only_when_they_match(tmp_path, fits, caplog):
    reference = state(convert(tmp_path))
    fits.calls.clear()
    convert(tmp_path, MoMosConfig(k=8, s=4, scale=True, fit="data-aware"))
    assert len(fits.calls) == 2  # other settings: every block fitted again (and its file replaced)
    fits.calls.clear()
    convert(tmp_path, seed=1)
    assert len(fits.calls) == 2  # other calibration data
    convert(tmp_path / "other", seed=1)
    other = build("llama")
    with torch.no_grad():
        other.model.embed_tokens.weight.mul_(3)  # same target weights, another model around them
    fits.calls.clear()
    get_momos_model(other, CONFIG, batches(1), sequential=True, resume_folder=str(tmp_path / "other"))
    assert len(fits.calls) == 2
    reference_files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    block0 = tmp_path / "block-0.safetensors"
    for damage in (
        lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]),  # an edited tensor byte
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: b"",
    ):  # empty
        saved = BlockResults(tmp_path, "")
        block0.write_bytes(damage(reference_files["block-0.safetensors"]))
        with pytest.raises(ValueError, match="holds block-0.safetensors, which momos-hf did not write"):
            convert(tmp_path, seed=1)  # changed since it was written: not ours to overwrite
        saved._record(
            block0.name, [hashlib.sha256(block0.read_bytes()).hexdigest()]
        )  # as if the manifest had been edited to list it
        fits.calls.clear()
        with caplog.at_level(logging.WARNING):
            assert_same(state(convert(tmp_path, seed=1)), state(convert(tmp_path / "fresh", seed=1)))
        assert [n[0].split(".")[2] for n in fits.calls[:1]] == ["0"] and "not a valid saved block" in caplog.text
        caplog.clear()
    assert reference  # the first conversion ran


def test_resume_folder_needs_a_sequential_conversion_and_a_folder(tmp_path):
    with pytest.raises(ValueError, match="use sequential=True"):
        get_momos_model(build("llama"), CONFIG, batches(), resume_folder=str(tmp_path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        convert(tmp_path / "file")
    model = build("llama")
    untouched = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError):
        get_momos_model(model, CONFIG, batches(), sequential=True, resume_folder=str(tmp_path / "file"))
    assert all(torch.equal(untouched[k], v) for k, v in model.state_dict().items())


def test_a_folder_holding_the_users_files_of_block_names_is_refused(tmp_path, fits):
    mine = tmp_path / "block-0.safetensors"
    mine.write_bytes(b"my own notes")
    with pytest.raises(ValueError, match=r"holds block-0\.safetensors, which momos-hf did not write") as refused:
        convert(tmp_path)
    assert "\n" not in str(refused.value) and mine.read_bytes() == b"my own notes" and fits.calls == []
    (tmp_path / "block-0.safetensors").rename(tmp_path / "notes")
    (tmp_path / "momos-resume.json").write_text('{"format": "mine"}')
    with pytest.raises(ValueError, match="momos-resume.json that is not a momos-hf resume manifest"):
        convert(tmp_path)
    assert (tmp_path / "momos-resume.json").read_text() == '{"format": "mine"}' and fits.calls == []


def test_a_saved_block_of_another_dtype_is_fitted_again(tmp_path, fits, caplog):
    """float64 motifs where the fit makes float32 ones: consistent (digests recomputed) but not this fit's."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    reference = state(convert(tmp_path))
    block0 = tmp_path / "block-0.safetensors"
    saved = BlockResults(tmp_path, "")
    with safe_open(block0, framework="pt") as f:
        meta, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    tensors = {name: t.double() if name.endswith(".motifs") else t for name, t in tensors.items()}
    save_file(tensors, block0, metadata={**meta, "digest": _content_digest(tensors, meta["errors"])})
    saved._record(block0.name, [hashlib.sha256(block0.read_bytes()).hexdigest()])
    fits.calls.clear()
    with caplog.at_level(logging.WARNING):
        assert_same(state(convert(tmp_path)), reference)
    assert [n[0].split(".")[2] for n in fits.calls] == ["0"] and "torch.float32 motifs" in caplog.text


def test_a_run_removes_only_its_hosts_partial_files_whose_writer_is_gone(tmp_path):
    import os
    import socket
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    host = socket.gethostname()
    stale = [
        tmp_path / f".block-0.safetensors.{host}-{gone.pid}.partial",
        tmp_path / f".momos-resume.json.{host}-{gone.pid}.partial",
    ]
    kept = [
        tmp_path / f".block-1.safetensors.{host}-{os.getpid()}.partial",  # a live writer's
        tmp_path / f".block-1.safetensors.elsewhere-{gone.pid}.partial",  # another host's
        tmp_path / f".block-0.safetensors.{gone.pid}.partial.notes",
    ]
    for path in stale + kept:
        path.write_bytes(b"x")
    BlockResults(tmp_path, "key")
    assert not any(p.exists() for p in stale) and all(p.read_bytes() == b"x" for p in kept)


def test_a_run_stopped_between_listing_and_renaming_a_block_keeps_the_folder_its_own(tmp_path, fits, monkeypatch):
    """The manifest lists a block file's new version before the rename: stopped in between (as by kill -9),
    the old file is still listed, so the next run reuses the folder instead of refusing it."""
    import os

    from momos_hf.convert import resume

    convert(tmp_path)
    real_replace = os.replace

    def stopped_at_the_block_rename(source, target):
        if str(target).endswith("block-0.safetensors"):
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(resume.os, "replace", stopped_at_the_block_rename)
    other = MoMosConfig(k=8, s=4, scale=True, fit="data-aware")
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path, other)
    monkeypatch.setattr(resume.os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "block-0.safetensors",
        "block-1.safetensors",
        "momos-resume.json",
    ]  # no partial left
    fits.calls.clear()
    assert_same(state(convert(tmp_path, other)), state(convert(tmp_path / "fresh", other)))
    assert len(fits.calls) == 2 + 2  # both blocks fitted again (old settings' files), then the fresh folder's
