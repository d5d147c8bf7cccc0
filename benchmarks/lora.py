"""Adapting a compressed LLM: LoRA on the MoMos base vs MoMos `motifs`-mode fine-tuning vs LoRA on the dense
model, side by side in one run.

SmolLM2-135M (`common.smollm2_path`) and its MoMos checkpoint at about 2 bits per weight (`--momos`: a folder
written by `save_pretrained`, e.g. the data-aware conversion of benchmarks/llm_quality.py; without it the
model is converted here, data-aware, k=256, s=4, row scales, on 8 windows of Shakespeare). Each variant trains
`--steps` AdamW steps on windows of ../shared/data/shakespeare/train.txt, and is scored on held-out windows
of valid.txt (Hamlet and The Tempest) by token-weighted perplexity (`momos_hf.metrics`):

- MoMos alone (no training);
- MoMos + LoRA r=16 on every MoMos layer (`momos_hf.integrations.lora.get_lora_model`; the base frozen);
- MoMos `motifs` mode: the motifs and row scales of every layer train, mosaics frozen;
- dense + LoRA r=16 (peft on the dense model), the reference.
Printed: trainable parameters, median seconds per step, perplexity before and after, and after relative to
the dense model's. `--quick` runs a tiny Llama from a config in seconds (CI).
Usage: python benchmarks/lora.py [--steps 64] [--momos FOLDER] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import SHARED, smollm2_path, write_json
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging

from momos_hf import MoMosConfig, get_momos_model
from momos_hf.app.text import byte_tokenizer
from momos_hf.integrations.lora import get_lora_model
from momos_hf.layer import momos_layers
from momos_hf.metrics import window_perplexity


def windows(tokenizer, split: str, count: int, length: int) -> torch.Tensor:
    """`count` consecutive windows of `length` tokens from the start of a Shakespeare split."""
    text = (SHARED / "data" / "shakespeare" / f"{split}.txt").read_text(encoding="utf-8")
    ids = tokenizer(text[: count * length * 8], return_tensors="pt").input_ids[0]
    if ids.numel() < count * length:
        raise SystemExit(f"{split}.txt gives only {ids.numel()} tokens, {count} x {length} needed")
    return ids[: count * length].view(count, length)


def train(model: torch.nn.Module, data: torch.Tensor, steps: int, batch: int, lr: float) -> list[float]:
    """AdamW steps over `data` in order (wrapping around); seconds of each step."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    seconds = []
    for step in range(steps):
        rows = data[torch.arange(step * batch, (step + 1) * batch) % len(data)]
        start = time.perf_counter()
        model(input_ids=rows, labels=rows).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - start)
    return seconds


def motifs_mode(model: torch.nn.Module) -> torch.nn.Module:
    """Only the motifs and row scales of the MoMos layers train."""
    model.requires_grad_(False)
    for layer in momos_layers(model).values():
        for param in (layer.motifs, layer.scale):
            if param is not None:
                param.requires_grad_(True)
    return model


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--eval_windows", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--momos", help="a MoMos checkpoint of SmolLM2-135M (default: convert it here, data-aware)")
    parser.add_argument("--quick", action="store_true", help="a tiny Llama from a config, a few steps (seconds)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="momos-lora-bench-") as scratch:  # a checkpoint converted here
        rows = compare(args, scratch)
    write_json(args.json, rows)
    return rows


def compare(args: argparse.Namespace, scratch: str) -> list[dict]:
    torch.manual_seed(0)
    if args.quick:
        args.steps, args.batch, args.length, args.eval_windows = 3, 2, 64, 4
        tokenizer = byte_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
        state = LlamaForCausalLM(config).state_dict()

        def dense():
            model = LlamaForCausalLM(config)
            model.load_state_dict(state)
            return model

        checkpoint = scratch
        get_momos_model(dense(), MoMosConfig(k=64, s=4, scale=True)).save_pretrained(checkpoint)
    else:
        path = smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(path)

        def dense():
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

        checkpoint = args.momos
        if checkpoint is None:
            checkpoint = scratch
            calibration = [{"input_ids": w[None]} for w in windows(tokenizer, "train", 8, 512)]
            get_momos_model(
                dense(), MoMosConfig(k=256, s=4, scale=True, fit="data-aware"), calibration
            ).save_pretrained(checkpoint)

    def momos():
        return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)

    train_data = windows(tokenizer, "train", args.steps * args.batch, args.length)
    eval_data = windows(tokenizer, "valid", args.eval_windows, args.length)
    lora = dict(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear")
    variants = {
        "MoMos alone": (momos, 0),
        f"MoMos + LoRA r={args.rank}": (lambda: get_lora_model(momos(), LoraConfig(**lora)), args.steps),
        "MoMos motifs mode": (lambda: motifs_mode(momos()), args.steps),
        f"dense + LoRA r={args.rank}": (lambda: get_peft_model(dense(), LoraConfig(**lora)), args.steps),
    }
    dense_ppl = window_perplexity(dense().eval(), eval_data, args.batch)
    print(f"dense perplexity {dense_ppl:.2f}; {args.steps} steps of {args.batch} x {args.length} tokens, lr {args.lr}")
    print(f"{'variant':<22} {'trainable':>10} {'s/step':>7} {'ppl before':>10} {'ppl after':>9} {'x dense':>8}")
    rows = []
    for name, (build, steps) in variants.items():
        model = build()
        before = window_perplexity(model.eval(), eval_data, args.batch)
        seconds = train(model, train_data, steps, args.batch, args.lr) if steps else []
        after = window_perplexity(model.eval(), eval_data, args.batch) if steps else before
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if steps else 0
        row = dict(
            variant=name,
            steps=steps,
            trainable_parameters=trainable,
            seconds_per_step=statistics.median(seconds[1:] or seconds) if seconds else None,
            ppl_before=before,
            ppl_after=after,
            vs_dense=after / dense_ppl,
            dense_ppl=dense_ppl,
            lr=args.lr,
        )
        rows.append(row)
        step_time = f"{row['seconds_per_step']:.2f}" if seconds else "-"
        print(
            f"{name:<22} {trainable:>10,d} {step_time:>7} {before:>10.2f} {after:>9.2f} {after / dense_ppl:>8.3f}",
            flush=True,
        )
        del model
    return rows


if __name__ == "__main__":
    main()
