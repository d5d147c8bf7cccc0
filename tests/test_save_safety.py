"""A save never loses anything: saving into `.` and `..`, saves that fail half way, real kill -9 at random
points (seeded, bounded), two processes saving into one folder, files the save did not write, links."""

import builtins
import errno
import json
import os
import random
import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import build, model_inputs
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM

import momos_hf.checkpoint.save as save
from momos_hf import MoMosConfig, MoMosModel, get_momos_model
from momos_hf.app.text import byte_tokenizer
from momos_hf.checkpoint.verify import read_checkpoint_config, weight_file_names

TESTS = os.path.dirname(os.path.abspath(__file__))


def converted(seed):
    return get_momos_model(build("llama", seed=seed), MoMosConfig(k=16, s=4, kmeans_iters=1, seed=seed))


def logits(folder):
    with torch.no_grad():
        return MoMosModel.from_pretrained(folder)(**model_inputs("llama")).logits


def snapshot(folder):
    """Every file under `folder` (hidden ones included) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def user_files(folder):
    (folder / "README.md").write_text("my card")
    (folder / "notes").mkdir(exist_ok=True)
    (folder / "notes" / "todo.txt").write_text("keep me")
    return {"README.md": b"my card", "notes/todo.txt": b"keep me"}


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".momos")]


def test_saving_into_the_current_and_the_parent_folder_keeps_every_file(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    mine = user_files(work)
    monkeypatch.chdir(work)
    first, second = converted(1), converted(2)
    first.save_pretrained(".")
    second.save_pretrained(".")  # over the first, in the folder the process runs in
    assert {k: v for k, v in snapshot(work).items() if k in mine} == mine and not leftovers(work)
    assert torch.equal(logits(work), second(**model_inputs("llama")).logits)
    (work / "sub").mkdir()
    monkeypatch.chdir(work / "sub")
    first.save_pretrained("..")
    assert {k: v for k, v in snapshot(work).items() if k in mine} == mine and not leftovers(work)
    assert torch.equal(logits(work), first(**model_inputs("llama")).logits)


def other_generation(mm, max_length):
    mm.base_model.generation_config.max_length = max_length  # so that the two saves differ in every file
    return mm


def test_a_save_that_fails_before_its_commit_changes_nothing(tmp_path, monkeypatch):
    converted(1).save_pretrained(tmp_path, tokenizer=byte_tokenizer())
    user_files(tmp_path)
    before = snapshot(tmp_path)
    real_replace = save.os.replace

    def no_permission(*args, **kwargs):
        raise PermissionError("read-only file system")

    def commit_fails(src, dst):
        if str(dst).endswith("config.json"):
            raise PermissionError("read-only file system")
        real_replace(src, dst)

    for target, fault in (
        ("save_file", no_permission),
        ("write_text_synced", no_permission),
        ("os.replace", commit_fails),
    ):
        with monkeypatch.context() as patch:
            patch.setattr(save.os, "replace", fault) if target == "os.replace" else patch.setattr(save, target, fault)
            with pytest.raises(save.SaveError, match=rf"^cannot write {tmp_path}\S*: read-only file system$"):
                other_generation(converted(2), 99).save_pretrained(
                    tmp_path, tokenizer=byte_tokenizer(), max_shard_size=8000
                )
        assert snapshot(tmp_path) == before  # generation config and tokenizer included


WRITES = {  # each file a save writes: how it is named in the error, a name that only its write opens
    "journal": (save.JOURNAL_NAME, ".momos-save.json"),
    "weights": ("model-00001-of-00003.safetensors", None),  # written by safetensors (Rust), not open()
    "index": ("model.safetensors.index.json", "model.safetensors.index.json"),
    "generation config": ("generation_config.json", "generation_config.json"),
    "tokenizer": (None, "tokenizer_config.json"),
    "config": ("config.json", "config.json"),
}


@pytest.fixture(scope="module")
def old_and_new():
    return converted(1), other_generation(converted(2), 99)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
@pytest.mark.parametrize("file", list(WRITES))
def test_a_write_the_system_refuses_is_named_in_one_line_and_loses_nothing(
    tmp_path, monkeypatch, old_and_new, file, code
):
    old = tmp_path / "old"
    old_and_new[0].save_pretrained(old, tokenizer=byte_tokenizer())
    before = snapshot(old)
    named, opened = WRITES[file]
    real_open = builtins.open

    def refusing_open(path, mode="r", *args, **kwargs):
        if "w" in mode and os.path.basename(path) == opened:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, mode, *args, **kwargs)

    def refusing_save_file(*args, **kwargs):  # as safetensors reports it
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

    monkeypatch.setattr(builtins, "open", refusing_open)
    if opened is None:
        monkeypatch.setattr(save, "save_file", refusing_save_file)
    what = re.escape(f"the tokenizer files into {old}" if named is None else str(old / named))
    with pytest.raises(save.SaveError, match=rf"^cannot write {what}: {os.strerror(code)}$") as refused:
        old_and_new[1].save_pretrained(old, tokenizer=byte_tokenizer(), max_shard_size=8000)
    assert refused.value.errno == code and isinstance(refused.value, (OSError, ValueError))
    monkeypatch.undo()
    assert snapshot(old) == before  # the previous checkpoint, whole, and nothing left over


@pytest.mark.slow
def test_a_weight_file_over_the_file_size_limit_is_named(tmp_path):
    """A real EFBIG: the saver runs under RLIMIT_FSIZE, below the size of its weight file only."""
    converted(1).save_pretrained(tmp_path / "old")
    before = snapshot(tmp_path / "old")
    limit = max(len(data) for name, data in before.items() if not name.endswith(".safetensors")) + 1
    assert limit < (tmp_path / "old" / "model.safetensors").stat().st_size
    code = f"""
import resource, sys
sys.path.insert(0, {TESTS!r})
from momos_hf import MoMosModel
model = MoMosModel.from_pretrained(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
try:
    model.save_pretrained(sys.argv[1])
except OSError as err:
    print(f"{{type(err).__name__}} {{err.errno}} {{err}}")
"""
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "old")], capture_output=True, text=True, timeout=300
    )
    weights = re.escape(str(tmp_path / "old")) + r"/model-momos-\w+\.safetensors"  # a fresh name beside the old
    expected = rf"SaveError {errno.EFBIG} cannot write {weights}: File too large"
    assert re.fullmatch(expected, done.stdout.strip()), done.stdout + done.stderr[-2000:]
    assert snapshot(tmp_path / "old") == before


def test_a_save_interrupted_after_its_commit_is_completed(tmp_path, monkeypatch):
    converted(1).save_pretrained(tmp_path)
    real_replace = save.os.replace
    interrupted = []

    def dies_once_after_the_commit(src, dst):
        if str(dst).endswith("generation_config.json") and not interrupted:
            interrupted.append(1)
            raise KeyboardInterrupt("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(save.os, "replace", dies_once_after_the_commit)
    second = other_generation(converted(2), 99)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(tmp_path)
    assert interrupted and leftovers(tmp_path)  # committed, with the generation config still waiting
    assert torch.equal(logits(tmp_path), second(**model_inputs("llama")).logits)  # the load completes the save
    assert not leftovers(tmp_path) and '"max_length": 99' in (tmp_path / "generation_config.json").read_text()


def test_a_folder_holding_another_model_is_refused_untouched(tmp_path):
    build("llama").save_pretrained(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="already holds a model that is not a MoMos checkpoint"):
        converted(1).save_pretrained(tmp_path)
    assert snapshot(tmp_path) == before


def test_weight_files_the_save_did_not_write_are_kept(tmp_path):
    others = {
        "model.safetensors": b"a dense model of mine",
        "model_dense_backup.safetensors": b"backup",
        "model.fp16.safetensors": b"half",
    }
    for name, data in others.items():
        (tmp_path / name).write_bytes(data)
    first, second = converted(1), converted(2)
    first.save_pretrained(tmp_path)
    second.save_pretrained(tmp_path, max_shard_size=8000)
    first.save_pretrained(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in others} == others
    assert torch.equal(logits(tmp_path), first(**model_inputs("llama")).logits)
    weights = {p.name for p in tmp_path.iterdir() if p.name.startswith("model")} - set(others)
    assert len(weights) == 1  # the earlier saves' own weights are gone


def test_only_weight_files_of_a_previous_save_are_ever_removed(tmp_path):
    converted(1).save_pretrained(tmp_path)
    mine = user_files(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["checksums"].update({"README.md": "0" * 64, "notes": "0" * 64})  # forged
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / ".momos-save.json").write_text(
        json.dumps({"staging": ".momos-save-000000000000", "create": ["README.md"], "remove": ["README.md"]})
    )
    converted(2).save_pretrained(tmp_path)
    assert {k: v for k, v in snapshot(tmp_path).items() if k in mine} == mine


@pytest.mark.parametrize("case", ["dangling link", "below a file", "config.json is a folder", "not a tokenizer"])
def test_impossible_targets_are_named(tmp_path, case):
    target = tmp_path / "target"
    tokenizer = None
    if case == "dangling link":
        target.symlink_to(tmp_path / "nowhere")
    elif case == "below a file":
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "target"
    elif case == "config.json is a folder":
        (target / "config.json").mkdir(parents=True)
    else:
        tokenizer = "byte"
    with pytest.raises(
        ValueError,
        match="link to a folder that does not exist|cannot create the folder|already holds a "
        "model that is not a MoMos checkpoint|tokenizer must be a tokenizer",
    ):
        converted(1).save_pretrained(target, tokenizer=tokenizer)


def test_a_state_dict_that_would_not_load_is_not_saved(tmp_path):
    good = converted(1)
    good.save_pretrained(tmp_path)
    before = snapshot(tmp_path)
    full = good.state_dict()
    motifs = next(k for k in full if k.endswith(".motifs"))
    for state, message in (
        ({k: v for k, v in full.items() if "embed_tokens" not in k}, "lacks"),
        ({**full, motifs: full[motifs] * float("nan")}, "has NaN or infinite values"),
        ({**full, "base_model.lm_head.weight": full["base_model.lm_head.weight"][:3]}, "other shapes"),
    ):
        with pytest.raises(ValueError, match=message):
            good.save_pretrained(tmp_path, state_dict=state)
        assert snapshot(tmp_path) == before


def test_a_linked_target_stays_a_link_and_no_folder_is_replaced(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    inode = real.stat().st_ino
    converted(1).save_pretrained(link)
    converted(2).save_pretrained(link)
    assert link.is_symlink() and real.stat().st_ino == inode  # written through the link, never swapped
    assert (real / "config.json").exists() and torch.equal(logits(link), logits(real))


SAVER = """
import os, random, sys, time
sys.path.insert(0, {tests!r})
import momos_hf.checkpoint.save as save
from momos_hf import MoMosModel
from momos_hf.app.text import byte_tokenizer

random.seed(int(sys.argv[3]))
real_replace = save.os.replace

def slow_replace(src, dst):  # every rename takes a while, so that kills land between them
    time.sleep(random.uniform(0, {delay}))
    real_replace(src, dst)

save.os.replace = slow_replace
model = MoMosModel.from_pretrained(sys.argv[1])
tokenizer = byte_tokenizer()
print("ready", flush=True)
for i in range(int(sys.argv[4])):
    model.save_pretrained(sys.argv[2], tokenizer=tokenizer, max_shard_size=8000 if i % 2 else "5GB")
"""


def start_saver(source, target, seed, saves, delay=0.02):
    code = textwrap.dedent(SAVER.format(tests=TESTS, delay=delay))
    return subprocess.Popen(
        [sys.executable, "-c", code, str(source), str(target), str(seed), str(saves)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
    )


def wait_ready(process, timeout=120):
    line = process.stdout.readline()
    assert line.strip() == "ready", process.stderr.read()[-3000:]


@pytest.fixture
def two_checkpoints(tmp_path):
    references = {}
    for seed in (1, 2):
        mm = other_generation(converted(seed), 50 + seed)
        mm.save_pretrained(tmp_path / f"model{seed}")
        with torch.no_grad():
            references[50 + seed] = mm(**model_inputs("llama")).logits
    return references


def check_whole(target, references, mine):
    """The folder holds one of the two checkpoints, complete (its weights and its generation config), and
    every file of the user's."""
    assert target.is_dir()
    max_length = json.loads((target / "generation_config.json").read_text())["max_length"]
    assert torch.equal(logits(target), references[max_length])
    assert {k: v for k, v in snapshot(target).items() if k in mine} == mine
    assert (target / "tokenizer.json").exists()


@pytest.mark.slow
def test_kill_9_at_random_points_never_loses_a_checkpoint(tmp_path, two_checkpoints):
    target = tmp_path / "target"
    MoMosModel.from_pretrained(tmp_path / "model1").save_pretrained(target, tokenizer=byte_tokenizer())
    mine = user_files(target)
    rng = random.Random(0)
    interrupted = 0
    for trial in range(8):
        saver = start_saver(tmp_path / f"model{1 + trial % 2 + 0}", target, seed=trial, saves=50)
        wait_ready(saver)
        time.sleep(rng.uniform(0.0, 0.6))  # somewhere inside one of the saves
        saver.kill()
        saver.wait()
        interrupted += bool(leftovers(target))
        check_whole(target, two_checkpoints, mine)
    assert interrupted >= 4  # most kills landed inside a save, leaving its journal or staging folder
    MoMosModel.from_pretrained(tmp_path / "model2").save_pretrained(target, tokenizer=byte_tokenizer())
    assert not leftovers(target)  # the next save cleaned up what the kills left
    check_whole(target, two_checkpoints, mine)


@pytest.mark.slow
def test_two_processes_saving_into_one_folder_take_turns(tmp_path, two_checkpoints):
    target = tmp_path / "target"
    target.mkdir()
    mine = user_files(target)
    savers = [start_saver(tmp_path / f"model{seed}", target, seed=seed, saves=6) for seed in (1, 2)]
    for saver in savers:
        wait_ready(saver)
    for saver in savers:
        _, err = saver.communicate(timeout=300)
        assert saver.returncode == 0, err[-3000:]
    check_whole(target, two_checkpoints, mine)
    assert not leftovers(target)
    weights = [p.name for p in target.iterdir() if p.name.startswith("model") and "safetensors" in p.name]
    quantization = read_checkpoint_config(target)["quantization_config"]
    assert set(weights) == {quantization["weights"], *weight_file_names(target, quantization["weights"])}
    assert isinstance(
        AutoModelForCausalLM.from_pretrained(target).model.layers[0].mlp.up_proj,
        type(next(iter(MoMosModel.from_pretrained(target).momos_layers().values()))),
    )
