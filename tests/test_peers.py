"""benchmarks/peers.py: RTN, HQQ and GPTQ baselines on small seeded tensors and tiny models."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

# loaded by path, not via sys.path, so benchmarks/common.py and friends cannot shadow other tests' imports
_spec = importlib.util.spec_from_file_location(
    "peers", Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"
)
peers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peers)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def levels_per_group(q: torch.Tensor, group: int) -> int:
    """Most distinct values in one row of one group."""
    return max(len(torch.unique(q[r, c : c + group])) for r in range(q.shape[0]) for c in range(0, q.shape[1], group))


def correlated_inputs(cols: int, rows: int = 4096, seed: int = 1) -> torch.Tensor:
    g = gen(seed)
    return torch.randn(rows, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols**0.5)


def output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return (x @ (w - q).T).pow(2).sum().item()


def naive_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, damping: float = 0.01) -> torch.Tensor:
    """The paper's column-by-column OBS update with an explicit inverse, no Cholesky, no lazy batches, float64."""
    w, h, maxq = w.double().clone(), h.double().clone(), 2**bits - 1
    h.diagonal().add_(damping * h.diagonal().mean())
    hinv, q = torch.linalg.inv(h), torch.zeros_like(w)
    for c in range(w.shape[1]):
        if c % group == 0:
            lo, s = peers._grid(w[:, c : c + group], maxq)
        q[:, c] = peers._snap(w[:, c : c + 1], lo, s, maxq)[:, 0]
        err = (w[:, c] - q[:, c]) / hinv[c, c]
        w[:, c + 1 :] -= err[:, None] * hinv[c, c + 1 :]
        hinv -= hinv[:, c : c + 1] @ hinv[c : c + 1, :] / hinv[c, c]  # drop column c from the problem
    return q.float()


# -----------------------------------------------------------------------------
# RTN


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_rtn_levels_and_extremes(bits):
    w = torch.randn(16, 100, generator=gen())  # 100 = 3 groups of 32 and a short one of 4
    q = peers.quantize_rtn(w, bits, 32)
    assert q.shape == w.shape and q.dtype == w.dtype
    assert levels_per_group(q, 32) <= 2**bits
    for c in range(0, 100, 32):  # min-max grid: each group's min and max are levels
        torch.testing.assert_close(q[:, c : c + 32].amin(1), w[:, c : c + 32].amin(1))
        torch.testing.assert_close(q[:, c : c + 32].amax(1), w[:, c : c + 32].amax(1))
    assert (q - w).abs().max() <= (w.amax(1) - w.amin(1)).max() / (2**bits - 1) / 2 + 1e-6  # at most half a step


def test_rtn_error_shrinks_with_bits():
    w = torch.randn(64, 256, generator=gen())
    err = [(w - peers.quantize_rtn(w, b, 64)).pow(2).mean().item() for b in range(1, 9)]
    assert all(a > b for a, b in zip(err, err[1:]))
    assert all(3.0 < a / b < 5.0 for a, b in zip(err[2:], err[3:]))  # ~4x (6 dB) a bit once the grid is fine


def test_rtn_exact_on_grid():
    g, bits, group = gen(), 3, 16
    k = torch.randint(0, 2**bits, (8, 48), generator=g).float()
    k[:, ::group], k[:, 1::group] = 0, 2**bits - 1  # each group spans the whole grid
    lo = torch.randn(8, 3, generator=g).repeat_interleave(group, 1)
    s = torch.rand(8, 3, generator=g).repeat_interleave(group, 1) + 0.1
    w = lo + s * k
    torch.testing.assert_close(peers.quantize_rtn(w, bits, group), w, rtol=0, atol=1e-6)


def test_rtn_groups_are_independent_and_edge_cases():
    w = torch.randn(8, 100, generator=gen())
    q = peers.quantize_rtn(w, 2, 32)
    torch.testing.assert_close(q[:, 96:], peers.quantize_rtn(w[:, 96:], 2, 4))  # the short last group
    torch.testing.assert_close(q[:, 32:64], peers.quantize_rtn(w[:, 32:64], 2, 32))
    torch.testing.assert_close(peers.quantize_rtn(w, 2, 1000), peers.quantize_rtn(w, 2, 100))  # group > in: per row
    torch.testing.assert_close(
        peers.quantize_rtn(torch.full((2, 8), 0.3), 2, 4), torch.full((2, 8), 0.3)
    )  # constant group
    qb = peers.quantize_rtn(w.bfloat16(), 2, 32)
    assert qb.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        peers.quantize_rtn(w[0], 2, 32)


# -----------------------------------------------------------------------------
# GPTQ


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 32), (3, 128), (4, 64)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group):
    x = correlated_inputs(128)
    w = torch.randn(64, 128, generator=gen(2))
    q = peers.quantize_gptq(w, x.T @ x / x.shape[0], bits, group)
    # measured: GPTQ / RTN output error 0.51 .. 0.61 on this data
    assert output_error(x, w, q) < 0.75 * output_error(x, w, peers.quantize_rtn(w, bits, group))
    assert levels_per_group(q, group) <= 2**bits


def test_gptq_matches_naive_obs_and_ignores_block_size():
    x = correlated_inputs(48, rows=1024)
    h = x.T @ x / x.shape[0]
    w = torch.randn(8, 48, generator=gen(3))
    ref = naive_gptq(w, h, 3, 12)
    for block_size in (128, 48, 16, 5):  # groups inside, across and straddling blocks
        torch.testing.assert_close(peers.quantize_gptq(w, h, 3, 12, block_size=block_size), ref, rtol=0, atol=1e-4)


def test_gptq_with_diagonal_moment_is_rtn():
    # no correlation between inputs => no error to move around, whatever each input's power
    w = torch.randn(32, 100, generator=gen())
    rtn = peers.quantize_rtn(w, 3, 32)
    assert torch.equal(peers.quantize_gptq(w, torch.eye(100), 3, 32), rtn)
    assert torch.equal(
        peers.quantize_gptq(w, torch.diag(torch.rand(100, generator=gen(1)) + 0.1), 3, 32, block_size=16), rtn
    )


def test_gptq_short_group_dead_inputs_and_dtype():
    x = correlated_inputs(100, rows=2048)
    x[:, [3, 70]] = 0  # inputs that never fire
    w = torch.randn(16, 100, generator=gen(4))
    q = peers.quantize_gptq(w.bfloat16(), x.T @ x / x.shape[0], 2, 32, block_size=48)
    assert q.dtype == torch.bfloat16 and torch.isfinite(q).all()
    assert levels_per_group(q.float(), 32) <= 4
    assert output_error(x, w, q.float()) < 0.8 * output_error(x, w, peers.quantize_rtn(w, 2, 32))
    with pytest.raises(ValueError, match="moment"):
        peers.quantize_gptq(w, torch.eye(99), 2, 32)


# -----------------------------------------------------------------------------
# HQQ


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_levels_and_error_vs_rtn(bits):
    pytest.importorskip("hqq")
    w = torch.randn(128, 256, generator=gen())
    q = peers.quantize_hqq(w, bits, 64)
    assert q.shape == w.shape and q.dtype == w.dtype
    assert levels_per_group(q, 64) <= 2**bits
    # measured on Gaussian weights: HQQ / RTN mean squared error 0.90 .. 0.95 (it minimises an l_0.7 error)
    assert (w - q).pow(2).mean() < 0.99 * (w - peers.quantize_rtn(w, bits, 64)).pow(2).mean()


def test_hqq_matches_hqq_linear_and_its_storage():
    pytest.importorskip("hqq")
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    w = torch.randn(40, 128, generator=gen())  # 80 groups of 64: packs without padding at 2, 3 and 4 bits
    for bits in (2, 3, 4):
        layer = HQQLinear.from_weights(
            w.clone(), None, BaseQuantizeConfig(nbits=bits, group_size=64, axis=1), device="cpu"
        )
        torch.testing.assert_close(
            peers.quantize_hqq(w, bits, 64), layer.dequantize().float(), rtol=2e-3, atol=1e-3
        )  # hqq computes in fp16
        stored = sum(t.numel() * t.element_size() * 8 for t in (layer.W_q, layer.meta["scale"], layer.meta["zero"]))
        assert stored / w.numel() == peers.hqq_bits_per_weight(bits, 64)
    assert peers.hqq_bits_per_weight(3, 64) == 3.2 + 0.5 and peers.hqq_bits_per_weight(4, 128) == 4.25
    with pytest.raises(ValueError):
        peers.quantize_hqq(torch.randn(4, 100), 2, 64)  # hqq groups must tile the rows


# -----------------------------------------------------------------------------
# models


def test_bits_per_weight():
    assert peers.bits_per_weight(4, 128) == 4.25 and peers.bits_per_weight(2, 64) == 2.5
    assert peers.bits_per_weight(3, 32, meta_bits=8) == 3.5


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
    )


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0))


def moments_from(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """X^T X / rows of each named layer's input on random tokens: how a benchmark would calibrate."""
    sums, hooks = {}, []
    for name in names:

        def hook(module, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = x.T @ x / x.shape[0]

        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(torch.randint(0, 128, (4, 32), generator=gen()))
    for h in hooks:
        h.remove()
    return sums


@pytest.mark.parametrize("method", ["rtn", "gptq", "hqq"])
def test_quantize_model_llama(method):
    if method == "hqq":
        pytest.importorskip("hqq")
    model = tiny_llama().to(torch.bfloat16)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    moments = moments_from(model, names) if method == "gptq" else None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bits = peers.quantize_model(model, names, method, 3, 32, moments)
    assert bits == (peers.hqq_bits_per_weight(3, 32) if method == "hqq" else peers.bits_per_weight(3, 32))
    for key, value in model.state_dict().items():
        assert value.dtype == torch.bfloat16
        changed = not torch.equal(value, before[key])
        assert changed == (key.removesuffix(".weight") in names), key
    q = model.get_submodule(names[0]).weight.float()
    assert levels_per_group(q, 32) <= 8


def test_quantize_model_gpt2_conv1d():
    model, ref = tiny_gpt2(), tiny_gpt2()
    names = [
        "transformer.h.0.attn.c_attn",
        "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_proj",
    ]  # Conv1D [in, out]
    assert peers.quantize_model(model, names, "rtn", 2, 32) == peers.bits_per_weight(2, 32)
    for key, value in model.state_dict().items():
        name = key.removesuffix(".weight")
        if name in names:  # groups run along the input dimension, i.e. along dim 0 of a Conv1D weight
            w = ref.get_submodule(name).weight
            torch.testing.assert_close(value, peers.quantize_rtn(w.T, 2, 32).T)
        else:
            assert torch.equal(value, ref.state_dict()[key]), key
    moments = moments_from(ref, names[:1])
    peers.quantize_model(ref, names[:1], "gptq", 2, 32, moments)  # transposed weight, [in, in] moment: shapes agree
    assert not torch.equal(ref.get_submodule(names[0]).weight, tiny_gpt2().get_submodule(names[0]).weight)


def test_quantize_model_bad_arguments():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_proj"]
    with pytest.raises(ValueError, match="awq"):
        peers.quantize_model(model, names, "awq", 4, 32)
    with pytest.raises(ValueError, match="gate_proj"):
        peers.quantize_model(model, names, "gptq", 4, 32, {names[0]: torch.eye(64)})
    with pytest.raises(ValueError, match="Embedding"):
        peers.quantize_model(model, ["model.embed_tokens"], "rtn", 4, 32)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-done
    # a short last group is paid for as a whole one: 64 inputs in groups of 48 -> 2 groups a row
    assert peers.quantize_model(model, names[:1], "rtn", 4, 48) == 4 + 2 * 2 * 16 / 64
