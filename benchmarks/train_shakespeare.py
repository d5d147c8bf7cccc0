"""Training from scratch on real text, dense vs MoMos, side by side in one run.

A small Llama (4 layers, hidden 256, byte tokens) is trained on ../shared/data/shakespeare/train.txt with
recipes/finetune.py: dense; MoMos `projected` (the paper); MoMos `ste`; and MoMos `motifs` after a dense
warm-up of half the steps. k=256, s=16 (0.5 bits per weight for the mosaic). Printed: validation perplexity
(valid.txt: Hamlet and The Tempest, held out) relative to dense, bits per converted weight, and the
wall-clock overhead of MoMos training relative to dense, with the time spent in projections.
Usage: python benchmarks/train_shakespeare.py [--steps 600] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import SHARED, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import finetune  # noqa: E402

MODEL = {
    "model_type": "llama",
    "vocab_size": 257,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--project_every", type=int, default=50)
    parser.add_argument("--motif_scope", choices=("layer", "global"), default="layer")
    parser.add_argument("--json")
    args = parser.parse_args()
    data = SHARED / "data" / "shakespeare"
    work = Path(tempfile.mkdtemp(prefix="momos-train-"))
    (work / "model.json").write_text(json.dumps(MODEL))
    common = [
        "--train_file",
        str(data / "train.txt"),
        "--validation_file",
        str(data / "valid.txt"),
        "--block_size",
        "128",
        "--per_device_train_batch_size",
        "16",
        "--per_device_eval_batch_size",
        "32",
        "--learning_rate",
        "2e-3",
        "--lr_scheduler_type",
        "cosine",
        "--num_warmup_steps",
        "30",
        "--logging_steps",
        "50",
        "--seed",
        "0",
        "--k",
        "256",
        "--s",
        "16",
        "--project_every",
        str(args.project_every),
        "--motif_scope",
        args.motif_scope,
    ]
    scratch = ["--model_config", str(work / "model.json")]

    def run(name, *extra):
        print(f"== {name}", flush=True)
        return finetune.main([*common, *extra, "--output_dir", str(work / name)])

    results = {
        "dense": run("dense", *scratch, "--max_steps", str(args.steps), "--train_mode", "dense"),
        "projected": run("projected", *scratch, "--max_steps", str(args.steps), "--train_mode", "projected"),
        "ste": run("ste", *scratch, "--max_steps", str(args.steps), "--train_mode", "ste"),
    }
    run("warmup", *scratch, "--max_steps", str(args.steps // 2), "--train_mode", "dense")
    results["motifs after dense warm-up"] = run(
        "motifs",
        "--model_name_or_path",
        str(work / "warmup"),
        "--max_steps",
        str(args.steps - args.steps // 2),
        "--train_mode",
        "motifs",
        "--learning_rate",
        "1e-3",
        "--modules_to_save",
        "embed_tokens",
        "lm_head",
        "norm",
    )
    dense = results["dense"]
    print(f"\n{args.steps} steps of 16 x 128 bytes; validation = Hamlet + The Tempest (held out)")
    print(
        f"{'run':<28} {'val ppl':>8} {'ppl / dense':>11} {'bits/w':>7} {'train s':>8} {'overhead':>9} "
        f"{'in projections':>15}"
    )
    for name, m in results.items():
        bits = f"{m['bits_per_weight']:.3f}" if "bits_per_weight" in m else "32 (fp32)"
        overhead = m["train_seconds"] / dense["train_seconds"] - 1
        print(
            f"{name:<28} {m['perplexity']:>8.3f} {m['perplexity'] / dense['perplexity']:>11.3f} {bits:>7} "
            f"{m['train_seconds']:>8.1f} {overhead:>+9.1%} {m['projection_seconds']:>14.1f}s"
        )
    print("(motifs: the dense warm-up's time is not counted in its row)")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
