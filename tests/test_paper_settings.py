"""The papers' operating points in the library: q-bit motifs, every 1-D parameter on the one dictionary
(`constrain_vectors`), and the pruning baselines measured by description length."""

import math

import pytest
import torch
from conftest import build, model_inputs
from torch import nn

from momos_hf import MoMosConfig, get_momos_model
from momos_hf.checkpoint.info import checkpoint_info
from momos_hf.model import MoMosModel
from momos_hf.mosaic import fake_quantize_motifs, quantize_motifs
from momos_hf.report.complexity import complexity_report
from momos_hf.train.pruning import (
    HardConcreteGate,
    apply_masks,
    kept_for_bits,
    magnitude_masks,
    sparse_description_bits,
    top_masks,
)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def paper_config(**kw):
    return MoMosConfig(
        **{
            "capacity": 0.02,
            "s": 4,
            "motif_scope": "global",
            "fit": "sample",
            "zero_motif": True,
            "train_mode": "projected",
            "target_modules": "all-linear",
            **kw,
        }
    )


def test_quantized_motifs_lie_on_a_symmetric_grid():
    motifs = torch.tensor([[0.0, 0.7, -1.4, 0.05], [1.3, -0.2, 0.33, 0.0]])
    q = quantize_motifs(motifs, 3)  # 7 levels: step 1.4 / 3
    step = 1.4 / 3
    assert torch.allclose(q / step, torch.round(q / step), atol=1e-5) and q.abs().max() == pytest.approx(1.4)
    assert torch.equal(q[:, [0]][0], torch.zeros(1)) and (q == 0).sum() >= 2  # zero stays exact
    assert torch.equal(quantize_motifs(q, 3), q)  # idempotent: a loaded grid stays the same grid
    assert len(torch.unique(quantize_motifs(torch.randn(64, 4), 4))) <= 15
    x = motifs.clone().requires_grad_()
    fake_quantize_motifs(x, 3).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight through


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_q_bit_motifs_train_save_and_load_on_the_grid(arch, tmp_path):
    mm = get_momos_model(build(arch), MoMosConfig(k=16, s=4, motif_scope="global", motif_bits=4))
    layer = next(iter(mm.momos_layers().values()))
    assert len(torch.unique(layer.effective_motifs().detach())) <= 15
    report = complexity_report(mm, max_bytes=0)
    assert report.shared_dictionary_bits == 16 * 4 * 4 + 32  # k * s * q plus the grid's float32 step
    inputs = model_inputs(arch, batch=4)
    optimizer = torch.optim.AdamW([p for p in mm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = mm(**inputs, labels=inputs["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert len(torch.unique(layer.effective_motifs().detach())) <= 15
    mm.save_pretrained(tmp_path / "ckpt")
    assert (
        checkpoint_info(tmp_path / "ckpt")["description_length_bytes"] * 8
        == complexity_report(mm, max_bytes=0).converted_bits
    )
    loaded = MoMosModel.from_pretrained(tmp_path / "ckpt")
    assert next(iter(loaded.momos_layers().values())).motif_bits == 4
    with torch.no_grad():
        assert torch.allclose(mm(**inputs).logits, loaded(**inputs).logits, atol=1e-5)


def test_constrained_vectors_sit_on_the_dictionary_and_are_counted():
    model = mlp()
    mm = get_momos_model(model, paper_config(constrain_vectors=True, motif_bits=8))
    motifs = mm.base_model[0].effective_motifs().detach()
    assert set(mm.vector_mosaics) == {"0.bias", "2.bias"}
    for name, mosaic in mm.vector_mosaics.items():
        bias = mm.base_model.get_parameter(name).detach()
        assert torch.allclose(bias, motifs[mosaic.long().flatten()].flatten()[: bias.numel()], atol=1e-6)
    report = complexity_report(mm, max_bytes=0)
    blocks = 128 * 16 + 10 * 32 + 32 + 3  # the matrices' and the biases' blocks of 4 (10 values pad to 3 blocks)
    k = mm.base_model[0].k
    assert k == int(0.02 * blocks)
    assert report.other_params == 0 and report.converted_params == 64 * 128 + 128 + 128 * 10 + 10
    assert report.total_bits == blocks * math.ceil(math.log2(k)) + k * 4 * 8 + 32
    # Training moves the biases off the mosaic; the projection puts them back (and the matrices).
    optimizer = torch.optim.SGD(mm.parameters(), lr=0.5)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    nn.functional.cross_entropy(mm(x), y).backward()
    optimizer.step()
    bias = mm.base_model.get_parameter("0.bias")
    assert len(torch.unique(bias.detach())) > 15
    mm.project()
    motifs = mm.base_model[0].effective_motifs().detach()
    assert torch.allclose(
        bias.detach(), motifs[mm.vector_mosaics["0.bias"].long().flatten()].flatten()[:128], atol=1e-6
    )
    with pytest.raises(ValueError, match="constrain_vectors=True has no MoMos checkpoint form"):
        get_momos_model(build("llama"), paper_config(constrain_vectors=True, target_modules=None)).save_pretrained(
            "unused"
        )


def test_constrain_vectors_covers_norms_and_spares_modules_to_save():
    mm = get_momos_model(
        build("llama"), paper_config(constrain_vectors=True, target_modules=None, modules_to_save=["norm"])
    )
    names = set(mm.vector_mosaics)
    assert "model.layers.0.input_layernorm.weight" in names and "model.norm.weight" not in names
    assert all(mm.base_model.get_parameter(n).ndim == 1 for n in names)


def test_sparse_description_length_and_its_inverse():
    assert sparse_description_bits(8, 0) == 0 and sparse_description_bits(8, 8, 32) == pytest.approx(256)
    assert sparse_description_bits(8, 2, 32) == pytest.approx(math.log2(28) + 64)
    n = 100_000
    for bits in (1e4, 2.5e5, 1e6):
        kept = kept_for_bits(n, bits)
        assert sparse_description_bits(n, kept) <= bits < sparse_description_bits(n, kept + 1)
    with pytest.raises(ValueError, match="kept must be in"):
        sparse_description_bits(4, 5)


def test_magnitude_and_gate_masks():
    a, b = torch.tensor([0.1, -3.0, 0.5]), torch.tensor([[2.0, -0.01], [0.0, 1.0]])
    masks = magnitude_masks([a, b], 3)
    assert masks[0].tolist() == [False, True, False] and masks[1].tolist() == [[True, False], [False, True]]
    apply_masks([a, b], masks)
    assert a.tolist() == [0.0, -3.0, 0.0] and b.tolist() == [[2.0, 0.0], [0.0, 1.0]]
    assert [m.sum().item() for m in top_masks([torch.arange(5.0), torch.arange(5.0, 8.0)], 4)] == [1, 3]
    gate = HardConcreteGate(torch.Size([1000]), keep=0.9, generator=torch.Generator().manual_seed(0))
    weight = torch.ones(1000)
    gate.eval()
    assert torch.allclose(gate(weight), torch.full((1000,), 0.9 * 1.2 - 0.1))  # the noise-free gate, stretched
    gate.train()
    sampled = gate(weight)
    assert 0 <= sampled.min() and sampled.max() <= 1 and 0.8 < (sampled > 0).float().mean() <= 1.0
    assert gate.open_probability().mean().item() == pytest.approx(
        torch.sigmoid(torch.tensor(math.log(9) - 2 / 3 * math.log(0.1 / 1.1))).item()
    )
