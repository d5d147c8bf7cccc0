"""Fidelity after post-training conversion (no fine-tuning): paper's sampled motifs vs k-means vs
data-aware vs round-to-nearest scalar quantization, at 0.5, 1, 2 and 3 bits per weight, side by side.

Two real models:
- all-MiniLM-L6-v2: mean cosine of sentence embeddings to the dense model on 128 held-out Shakespeare
  lines (valid.txt); calibration (data-aware only) on lines of train.txt.
- a small byte-level Llama trained here on ../shared/data/shakespeare/train.txt (cached after the first
  run): validation perplexity on valid.txt relative to dense; calibration on windows of train.txt.

Rates: s=16, 8, 4 with k=256 and s=2 with k=64 give 0.5, 1, 2, 3 index bits per weight. `total bits/w`
adds the dictionaries and scales at 16 bits per value (RTN: its per-row clip). Weight
error is pooled over layers and compared with the Gaussian bound 2^(-2R). Data-aware uses row scales.
Usage: python benchmarks/fidelity.py [--quick] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from common import CACHE, SHARED, encode, load_minilm, sentence_embeddings, shakespeare_lines, write_json
from transformers import AutoModelForCausalLM
from transformers.utils import logging

from momos_hf import MoMosConfig, get_momos_model
from momos_hf.app.text import byte_tokenizer, calibration_batches
from momos_hf.convert.targets import find_targets
from momos_hf.layer import layer_class_for
from momos_hf.metrics import window_perplexity

RATES = {0.5: (16, 256), 1.0: (8, 256), 2.0: (4, 256), 3.0: (2, 64)}
METHODS = ("sample", "kmeans", "data-aware", "rtn")
LM = {
    "model_type": "llama",
    "vocab_size": 257,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
}
QUICK_LM = dict(LM, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
TEXT = SHARED / "data" / "shakespeare"


def matrix_of(model, name: str) -> torch.Tensor:
    """The weight of module `name` as the `[out, in]` matrix MoMos fits (a view: writes reach the module)."""
    module = model.get_submodule(name)
    return layer_class_for(module).matrix_of(module)


def round_to_nearest(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row uniform quantization to `2^bits` levels over `[-c, c]`, the clip `c` chosen per row among
    20 fractions of `max |w|` to minimise the squared error (min-max grids waste levels on outliers)."""
    levels = 2**bits
    best, best_error = None, None
    for fraction in torch.linspace(0.05, 1.0, 20):
        clip = weight.abs().max(1, keepdim=True).values.clamp(min=1e-12) * fraction
        step = 2 * clip / (levels - 1)
        q = ((weight.clamp(-clip, clip) + clip) / step).round() * step - clip
        error = (weight - q).square().sum(1, keepdim=True)
        if best is None:
            best, best_error = q, error
        else:
            better = error < best_error
            best, best_error = torch.where(better, q, best), torch.minimum(error, best_error)
    return best


def convert(model, method: str, rate: float, calibration) -> tuple[torch.nn.Module, dict]:
    """The model in `method`'s form at `rate` index bits/weight, and its size and weight-error figures."""
    targets = find_targets(model, None)
    originals = {n: matrix_of(model, n).detach().clone() for n in targets}
    weights = sum(w.numel() for w in originals.values())
    if method == "rtn":
        if rate != int(rate):
            return None, {}
        with torch.no_grad():
            for name, w in originals.items():
                matrix_of(model, name).copy_(round_to_nearest(w, int(rate)))
        approx = {n: matrix_of(model, n).detach() for n in targets}
        extra_bits = sum(w.shape[0] * 16 for w in originals.values())  # one fp16 clip per row
    else:
        s, k = RATES[rate]
        config = MoMosConfig(k=k, s=s, fit=method, scale=method == "data-aware")
        model = get_momos_model(model, config, calibration if method == "data-aware" else None)
        layers = model.momos_layers()
        approx = {n: layer.mosaic_weight().detach() for n, layer in layers.items()}
        extra_bits = sum(l.k * l.s * 16 + (0 if l.scale is None else l.out_features * 16) for l in layers.values())
    error = sum(float((originals[n] - approx[n]).square().sum()) for n in targets)
    spread = sum(float((w - w.mean()).square().sum()) for w in originals.values())
    return model, {
        "rel_error": error / spread,
        "error_over_bound": error / spread / 2 ** (-2 * rate),
        "total_bits_per_weight": rate + extra_bits / weights,
    }


def trained_lm(steps: int, spec: dict):
    """The byte-level Llama trained on Shakespeare with recipes/finetune.py (cached by size and steps)."""
    folder = CACHE / f"fidelity-lm-{spec['hidden_size']}-{steps}"
    if not (folder / "config.json").exists():
        import json
        import tempfile

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
        import finetune

        spec_file = Path(tempfile.mkdtemp()) / "model.json"
        spec_file.write_text(json.dumps(spec))
        finetune.main(
            [
                "--model_config",
                str(spec_file),
                "--train_file",
                str(TEXT / "train.txt"),
                "--validation_file",
                str(TEXT / "valid.txt"),
                "--block_size",
                "128",
                "--per_device_train_batch_size",
                "16",
                "--learning_rate",
                "2e-3",
                "--lr_scheduler_type",
                "cosine",
                "--num_warmup_steps",
                "30",
                "--max_steps",
                str(steps),
                "--train_mode",
                "dense",
                "--seed",
                "0",
                "--output_dir",
                str(folder),
            ]
        )
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def perplexity(model, windows: torch.Tensor) -> float:
    return window_perplexity(model, windows, 16)


def sweep(name: str, dense, calibration, rates, score) -> list[dict]:
    """Convert a copy of `dense` with every method at every rate; `score(model)` gives its figures."""
    rows = []
    for rate in rates:
        for method in METHODS:
            start = time.perf_counter()
            model, row = convert(copy.deepcopy(dense), method, rate, calibration)
            if model is None:
                continue
            rows.append(
                dict(
                    model=name,
                    method=method,
                    bits_per_weight=rate,
                    **row,
                    **score(model),
                    seconds=time.perf_counter() - start,
                )
            )
            print_row(rows[-1])
    return rows


def lm_benchmark(args) -> list[dict]:
    dense = trained_lm(args.lm_steps, QUICK_LM if args.quick else LM)
    tokenizer = byte_tokenizer()
    calibration = calibration_batches(tokenizer, str(TEXT / "train.txt"), args.calibration, 128)
    held_out = torch.cat(
        [b["input_ids"] for b in calibration_batches(tokenizer, str(TEXT / "valid.txt"), args.held_out, 128)]
    )
    reference = perplexity(dense, held_out)

    def score(model):
        ppl = perplexity(model, held_out)
        return {"score": ppl / reference, "perplexity": ppl, "dense_perplexity": reference}

    return sweep("shakespeare-llama", dense, calibration, args.rates, score)


def minilm_benchmark(args) -> list[dict]:
    dense, tokenizer, _ = load_minilm()
    held_out = encode(tokenizer, shakespeare_lines())
    lines = shakespeare_lines("train", args.calibration)
    calibration = [encode(tokenizer, lines[i : i + 32]) for i in range(0, len(lines), 32)]

    @torch.no_grad()
    def embed(model):
        return sentence_embeddings(model(**held_out).last_hidden_state, held_out["attention_mask"])

    reference = embed(dense)
    return sweep(
        "all-MiniLM-L6-v2",
        dense,
        calibration,
        args.rates,
        lambda model: {"score": float((embed(model) * reference).sum(-1).mean())},
    )


def print_row(row: dict) -> None:
    print(
        f"{row['model']:<18} {row['method']:<10} {row['bits_per_weight']:>6.1f} {row['total_bits_per_weight']:>8.3f} "
        f"{row['rel_error']:>8.4f} {row['error_over_bound']:>9.2f} {row['score']:>8.4f} {row['seconds']:>6.1f}",
        flush=True,
    )


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, name in zip(axes[0], models):
        for method in METHODS:
            points = [(r["bits_per_weight"], r["score"]) for r in rows if r["model"] == name and r["method"] == method]
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set_xlabel("index bits per weight")
        ax.set_ylabel("embedding cosine to dense" if name.startswith("all-MiniLM") else "perplexity / dense")
        if not name.startswith("all-MiniLM"):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: small LM only, 2 rates, few samples")
    parser.add_argument("--json")
    parser.add_argument("--plot", help="write a PNG of score vs bits per weight")
    args = parser.parse_args(argv)
    args.rates = [1.0, 2.0] if args.quick else list(RATES)
    args.lm_steps, args.calibration, args.held_out = (20, 16, 16) if args.quick else (600, 1024, 128)
    logging.disable_progress_bar()
    torch.manual_seed(0)
    print(
        f"{'model':<18} {'method':<10} {'bits/w':>6} {'total b/w':>8} {'rel.err':>8} {'err/bound':>9} {'score':>8} "
        f"{'sec':>6}"
    )
    rows = lm_benchmark(args) if args.quick else minilm_benchmark(args) + lm_benchmark(args)
    print("score: MiniLM = embedding cosine to dense (higher is better); LM = perplexity / dense (lower is better)")
    write_json(args.json, rows)
    if args.plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
