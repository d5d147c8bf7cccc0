"""Loads racing saves: a load that overlaps a save into the same folder waits for it, so everything it reads
(config.json, weights, generation_config.json, tokenizer) comes from one save."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import model_inputs
from test_save_safety import converted, other_generation
from transformers import AutoModelForCausalLM, AutoTokenizer

from momos_hf import MoMosModel
from momos_hf.app.text import byte_tokenizer

TESTS = os.path.dirname(os.path.abspath(__file__))

SAVER = """
import sys
sys.path.insert(0, {tests!r})
from momos_hf import MoMosModel
from momos_hf.app.text import byte_tokenizer

models = [MoMosModel.from_pretrained(sys.argv[1]), MoMosModel.from_pretrained(sys.argv[2])]
tokenizer = byte_tokenizer()
print("ready", flush=True)
for i in range(int(sys.argv[4])):
    models[i % 2].save_pretrained(sys.argv[3], tokenizer=tokenizer, max_shard_size=8000 if i % 4 < 2 else "5GB")
"""


@pytest.mark.slow
def test_loads_during_saves_read_one_whole_checkpoint(tmp_path):
    references = {}
    for seed in (1, 2):
        mm = other_generation(converted(seed), 50 + seed)  # every file of the two saves differs
        mm.save_pretrained(tmp_path / f"model{seed}")
        with torch.no_grad():
            references[50 + seed] = mm(**model_inputs("llama")).logits
    target = tmp_path / "target"
    MoMosModel.from_pretrained(tmp_path / "model1").save_pretrained(target, tokenizer=byte_tokenizer())
    saver = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SAVER.format(tests=TESTS))]
        + [str(tmp_path / "model1"), str(tmp_path / "model2"), str(target), "40"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert saver.stdout.readline().strip() == "ready"
    seen, failures = [], []
    try:
        while saver.poll() is None:
            load = AutoModelForCausalLM.from_pretrained if len(seen) % 2 else MoMosModel.from_pretrained
            try:
                model = load(target)
                with torch.no_grad():
                    output = model(**model_inputs("llama")).logits
            except Exception as err:  # every failure is a defect here: the folder always holds a whole checkpoint
                failures.append(f"{type(err).__name__}: {err}")
                continue
            max_length = model.generation_config.max_length
            assert max_length in references and torch.equal(output, references[max_length]), (
                f"load {len(seen)} mixes the weights of one save with the generation config of the other"
            )
            seen.append(max_length)
    finally:
        _, err = saver.communicate(timeout=600)
    assert saver.returncode == 0, err[-3000:]
    assert not failures, failures[:3]
    assert set(seen) == {51, 52}  # the loads did overlap the saves
    assert json.loads((target / "generation_config.json").read_text())["max_length"] == 52  # the 40th save
    assert AutoTokenizer.from_pretrained(target).vocab_size == byte_tokenizer().vocab_size
