"""The main job on its embedded default: build a small Llama from a config, convert it to MoMos, train the
motifs (and embeddings) for a few steps on the embedded sonnets, and print the size/complexity report.
Nothing is downloaded: the text ships with the package and the tokenizer is plain UTF-8 bytes."""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils.logging import tqdm

from ..config import MoMosConfig
from ..model import MoMosModel, get_momos_model
from ..report.complexity import complexity_report
from .text import embedded_text


def tiny_llama(seed: int = 0, vocab_size: int = 256) -> LlamaForCausalLM:
    """A 1M-parameter Llama over byte tokens; every projection has >= 1024 blocks of 16."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


def byte_batches(data: torch.Tensor, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(len(data) - length, (batch_size,), generator=generator)
    return torch.stack([data[i : i + length] for i in starts.tolist()])


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, data: torch.Tensor, length: int = 128) -> float:
    windows = data[: len(data) // length * length].reshape(-1, length)
    return float(model(input_ids=windows, labels=windows).loss)


def run_demo(
    steps: int = 60, k: int = 256, s: int = 16, scope: str = "global", seed: int = 0, show_layers: bool = False
) -> dict:
    """Run the demo, print what happens, return the losses and the report as a dict.

    The default scope is the paper's single dictionary: this model's layers are too small (1024-3072
    blocks) for 256 motifs per layer to stay near 0.5 bits/weight."""
    data = torch.tensor(list(embedded_text().encode("utf-8")), dtype=torch.long)
    split = int(0.9 * len(data))
    train, valid = data[:split], data[split:]
    mm: MoMosModel = get_momos_model(
        tiny_llama(seed),
        MoMosConfig(k=k, s=s, motif_scope=scope, seed=seed, modules_to_save=["embed_tokens", "lm_head"]),
    )
    mm.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in mm.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    before = evaluate_loss(mm, valid)
    progress = tqdm(range(steps), desc="train motifs")
    for _ in progress:
        batch = byte_batches(train, 16, 128, generator)
        loss = mm(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    after = evaluate_loss(mm, valid)
    print(f"validation loss {before:.3f} -> {after:.3f} (perplexity {math.exp(before):.1f} -> {math.exp(after):.1f})")
    report = complexity_report(mm, mm.fit_errors)
    print(report.format(per_layer=show_layers))
    return {"loss_before": before, "loss_after": after, "report": report.to_dict()}
