"""Quality of a real causal LM at about 1, 2 and 3 bits per weight: MoMos against the scalar quantizers users
would otherwise pick, side by side in one run.

Model: SmolLM2-135M-Instruct (`common.smollm2_path`, or any local causal-LM folder with `--model`), every
attention and MLP projection of every block, in the model's own dtype. Held-out perplexity on the first
`--eval_windows` windows of 512 tokens of valid.txt (Hamlet, The Tempest), each window on its own; calibration
on `--calibration_samples` windows of train.txt (other plays), so the two never overlap.

Methods, at each rate (peers: one fp16 scale and zero-point per group of 64 inputs, `peers.py`):
- `rtn`, `hqq`: round-to-nearest and HQQ (the `hqq` package), no data;
- `gptq`: GPTQ, block by block on the calibration windows (a faithful implementation, `peers.py`: no library
  runs on CPU here);
- `momos-kmeans`: motifs by k-means on the weights, row scales;
- `momos-data-aware`: motifs and mosaic fitted to each layer's output error on the calibration windows;
- `momos-sequential`: the same, block by block, each block calibrated on the already-converted ones;
- `momos-pipeline`: `momos-sequential`, then `--finetune_steps` steps (one calibration window each) training
  motifs, scales and norms to predict the dense model's next-token distribution (`momos_hf.train.distill`).

Bits per weight are honest: MoMos mosaics, dictionaries and row scales; the peers' codes plus their
per-group scale and zero-point. Every method runs in its own process, so its conversion time (calibration
included) and peak memory (model included) are its own; `dense` gives the reference perplexity and memory.
Rows are written to `--json` as they finish.

Usage: python benchmarks/llm_quality.py [--quick] [--rates 2 3 1] [--methods ...] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import SHARED, smollm2_path, write_json
from peers import quantize_model, quantize_model_sequentially
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from momos_hf import MoMosConfig, get_momos_model
from momos_hf.app.text import byte_tokenizer, calibration_batches
from momos_hf.convert.targets import find_targets
from momos_hf.metrics import window_perplexity
from momos_hf.report.complexity import complexity_report
from momos_hf.train.distill import DEFAULT_FINETUNE_LR, finetune_to_teacher, teacher_targets

TEXT = SHARED / "data" / "shakespeare"
GROUP = 64
# rate -> (peer code bits, MoMos k, MoMos s): ceil(log2 k) / s index bits per weight, plus dictionary and scales
RATES = {1: (1, 256, 8), 2: (2, 256, 4), 3: (3, 512, 3)}
METHODS = ("rtn", "hqq", "gptq", "momos-kmeans", "momos-data-aware", "momos-sequential", "momos-pipeline")
WINDOW = 512
EVAL_BATCH = 4


def load(path: str):
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def perplexity(model, windows: torch.Tensor) -> float:
    """Token-weighted perplexity over all windows, each window on its own (`momos_hf.metrics`)."""
    return window_perplexity(model, windows, EVAL_BATCH)


def eval_windows(tokenizer, n: int, length: int) -> torch.Tensor:
    ids = tokenizer(
        (TEXT / "valid.txt").read_text(encoding="utf-8"), add_special_tokens=False, return_tensors="pt"
    ).input_ids[0]
    n = min(n, len(ids) // length)
    return ids[: n * length].view(n, length)


def convert(model, method: str, rate: int, calibration: list[dict], finetune_steps: int, finetune_lr: float):
    """Convert `model` by `method` at `rate`; returns the model to evaluate and its bits per weight."""
    bits, k, s = RATES[rate]
    names = find_targets(model, None)
    if method in ("rtn", "hqq"):
        return model, quantize_model(model, names, method, bits, GROUP)
    if method == "gptq":
        return model, quantize_model_sequentially(model, names, bits, GROUP, calibration)
    fit = "kmeans" if method == "momos-kmeans" else "data-aware"
    targets = teacher_targets(model, calibration) if method == "momos-pipeline" else None
    config = MoMosConfig(k=k, s=s, scale=True, fit=fit)
    mm = get_momos_model(
        model,
        config,
        calibration if fit == "data-aware" else None,
        sequential=method in ("momos-sequential", "momos-pipeline"),
    )
    if targets is not None:
        finetune_to_teacher(mm, targets, finetune_steps, finetune_lr)
    return mm, complexity_report(mm, max_bytes=0).bits_per_weight


def run_one(args, method: str, rate: int) -> dict:
    """One method at one rate, in this process: convert, measure, evaluate."""
    torch.manual_seed(0)
    model, tokenizer = load(args.model)
    calibration = calibration_batches(
        tokenizer, str(TEXT / "train.txt"), args.calibration_samples, args.calibration_len
    )
    windows = eval_windows(tokenizer, args.eval_windows, args.eval_len)
    start = time.perf_counter()
    if method == "dense":
        bits = torch.finfo(next(model.parameters()).dtype).bits
    else:
        model, bits = convert(model, method, rate, calibration, args.finetune_steps, args.finetune_lr)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    tuning = (
        dict(finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr) if method == "momos-pipeline" else {}
    )
    return dict(
        method=method,
        rate=rate,
        bits_per_weight=bits,
        perplexity=perplexity(model, windows),
        conversion_s=seconds,
        peak_bytes=peak,
        **tuning,
    )


def run_child(args, method: str, rate: int) -> dict:
    """`run_one` in a fresh process; progress goes to this process's stderr."""
    command = [
        sys.executable,
        __file__,
        "--child",
        method,
        str(rate),
        "--model",
        args.model,
        "--calibration_samples",
        str(args.calibration_samples),
        "--calibration_len",
        str(args.calibration_len),
        "--eval_windows",
        str(args.eval_windows),
        "--eval_len",
        str(args.eval_len),
        "--finetune_steps",
        str(args.finetune_steps),
        "--finetune_lr",
        str(args.finetune_lr),
    ]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def quick_model(folder: Path) -> str:
    """A tiny byte-level Llama (random weights) saved with its tokenizer: the plumbing, in seconds."""
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=257,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    ).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


def print_row(row: dict, dense: dict) -> None:
    print(
        f"{row['method']:18s} {row['rate']:>4} {row['bits_per_weight']:8.3f} {row['perplexity']:12.2f} "
        f"{row['perplexity'] / dense['perplexity']:10.3f}x {row['conversion_s']:9.1f} "
        f"{row['peak_bytes'] / 2**30:7.2f} ({row['peak_bytes'] / dense['peak_bytes']:.2f}x)",
        flush=True,
    )


def plot(rows: list[dict], dense: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in METHODS:
        points = sorted(
            (r["bits_per_weight"], r["perplexity"] / dense["perplexity"]) for r in rows if r["method"] == method
        )
        if points:
            ax.plot(*zip(*points), marker="o", label=method)
    ax.set_xlabel("bits per converted weight (all overheads counted)")
    ax.set_ylabel("perplexity / dense")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(f"{Path(dense['model']).name}: held-out perplexity after post-training compression")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="local causal-LM folder (default: SmolLM2-135M, see common.smollm2_path)"
    )
    parser.add_argument("--rates", type=int, nargs="+", default=[2, 3, 1], choices=sorted(RATES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--calibration_samples", type=int, default=128)
    parser.add_argument("--calibration_len", type=int, default=WINDOW)
    parser.add_argument("--finetune_steps", type=int, default=128, help="momos-pipeline's fine-tuning steps")
    parser.add_argument(
        "--finetune_lr", type=float, default=DEFAULT_FINETUNE_LR, help="momos-pipeline's peak learning rate"
    )
    parser.add_argument("--eval_windows", type=int, default=32)
    parser.add_argument("--eval_len", type=int, default=WINDOW)
    parser.add_argument(
        "--quick", action="store_true", help="a tiny random Llama, 2 bits, few windows: checks the plumbing"
    )
    parser.add_argument("--json")
    parser.add_argument("--plot")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "RATE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args, args.child[0], int(args.child[1]))))
        return
    with tempfile.TemporaryDirectory() as scratch:
        if args.quick:
            args.model = quick_model(Path(scratch))
            args.rates, args.calibration_samples, args.calibration_len, args.eval_windows, args.eval_len = (
                [2],
                8,
                64,
                4,
                64,
            )
            args.finetune_steps = 4
        args.model = args.model or str(smollm2_path())
        dense = dict(run_child(args, "dense", 0), model=args.model)
        print(f"{args.model}: dense perplexity {dense['perplexity']:.2f}, peak {dense['peak_bytes'] / 2**30:.2f} GiB")
        print(
            f"{'method':18s} {'rate':>4} {'bits/w':>8} {'perplexity':>12} {'vs dense':>11} {'convert s':>9} "
            f"{'peak GiB (vs dense)':>20}"
        )
        rows: list[dict] = []
        for rate in args.rates:
            for method in args.methods:
                rows.append(run_child(args, method, rate))
                print_row(rows[-1], dense)
                write_json(args.json, {"dense": dense, "rows": rows})
    if args.plot:
        plot(rows, dense, args.plot)


if __name__ == "__main__":
    main()
