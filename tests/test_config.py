import re

import pytest

from momos_hf import MoMosConfig


def test_defaults_are_the_headline_rate():
    config = MoMosConfig()
    assert (config.k, config.s, config.motif_scope, config.fit) == (256, 16, "layer", "kmeans")


def test_json_round_trip(tmp_path):
    config = MoMosConfig(
        k=64,
        s=8,
        target_modules=["q_proj", "v_proj"],
        motif_scope="global",
        scale=True,
        zero_motif=True,
        motif_dtype="bfloat16",
        seed=3,
        modules_to_save=["lm_head"],
        motif_bits=4,
    )
    assert MoMosConfig.from_json_string(config.to_json_string()) == config
    config.save_pretrained(tmp_path)
    assert MoMosConfig.from_pretrained(tmp_path) == config
    assert not list(tmp_path.glob("*.tmp"))


def test_capacity_resolves_k_per_dictionary():
    config = MoMosConfig(capacity=0.01)
    assert config.k is None
    assert config.num_motifs(10_000) == 100
    assert config.num_motifs(10) == 1
    assert MoMosConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, "k must be an integer >= 1"),
        ({"k": 2.5}, "k must be an integer >= 1"),
        ({"s": 0}, "s must be an integer >= 1"),
        ({"k": 8, "capacity": 0.1}, "not both"),
        ({"capacity": 1.5}, "capacity must be in (0, 1]"),
        ({"motif_scope": "model"}, "motif_scope must be one of ['layer', 'global']"),
        ({"fit": "random"}, "fit must be one of ['sample', 'kmeans', 'data-aware']"),
        ({"motif_dtype": "int8"}, "motif_dtype must be one of"),
        ({"kmeans_iters": -1}, "kmeans_iters must be an integer >= 0"),
        ({"target_modules": "q_proj("}, "not a valid regex"),
        ({"target_modules": ["q_proj", 3]}, "target_modules must be a string or a list of module names"),
        ({"scale": "no"}, "scale must be True or False, got 'no'"),
        ({"zero_motif": "yes"}, "zero_motif must be True or False, got 'yes'"),
        ({"zero_motif": True, "k": 1}, "zero_motif=True needs k >= 2"),
        ({"capacity": "0.5"}, "capacity must be in (0, 1] (a fraction of the blocks, as a number), got '0.5'"),
        ({"seed": "a"}, "seed must be an integer in [0, 2**63), got 'a'"),
        ({"seed": 2**70}, "seed must be an integer in [0, 2**63)"),
        ({"project_every": -1}, "project_every must be an integer >= 0"),
        ({"train_mode": "lora"}, "train_mode must be one of"),
        ({"motif_bits": 1}, "motif_bits must be an integer in [2, 16]"),
        ({"motif_bits": 32}, "motif_bits must be an integer in [2, 16]"),
        ({"motif_bits": 4.0}, "motif_bits must be an integer in [2, 16]"),
        ({"constrain_vectors": 1}, "constrain_vectors must be True or False"),
        (
            {"constrain_vectors": True},
            "constrain_vectors=True needs motif_scope='global', train_mode='projected', scale=False and "
            "fit in ['sample', 'kmeans']; got motif_scope='layer', train_mode='motifs'",
        ),
        (
            {"constrain_vectors": True, "motif_scope": "global", "train_mode": "projected", "fit": "data-aware"},
            "got fit='data-aware'",
        ),
    ],
)
def test_impossible_values_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MoMosConfig(**kwargs)


def test_one_module_to_save_may_be_a_string():
    assert MoMosConfig(modules_to_save="lm_head").modules_to_save == ["lm_head"]


def test_unknown_fields_are_named():
    with pytest.raises(ValueError, match=r"unknown MoMosConfig fields \['kk'\]"):
        MoMosConfig.from_dict({"kk": 3})


def test_corrupt_json_names_the_file(tmp_path):
    (tmp_path / "momos_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="momos_config.json is not valid JSON"):
        MoMosConfig.from_pretrained(tmp_path)
