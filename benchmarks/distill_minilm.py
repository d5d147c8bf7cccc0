"""MoMos-aware distillation of the real all-MiniLM-L6-v2, measured by sentence-embedding cosine.

For k=256 at s=4 (2 bits/weight) and s=16 (0.5 bits/weight): convert the attention and MLP layers (row scales;
data-aware on 256 lines of train.txt by default, or k-means with `--fit kmeans`), then train against the dense model
(loss: MSE of the last hidden states plus 1 - cosine of the mean-pooled sentence embeddings) on Shakespeare lines
from train.txt, by default in `motifs` mode (motifs, row scales and LayerNorms train; the mosaic stays). Printed:
the mean cosine of sentence embeddings to the dense model on 128 held-out lines (valid.txt) after post-training
projection alone and after distillation, with the time taken. Usage: python benchmarks/distill_minilm.py [--steps
300] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import torch
import torch.nn.functional as F
from common import encode, load_minilm, sentence_embeddings, shakespeare_lines, write_json
from transformers.utils import logging

from momos_hf import MoMosConfig, get_momos_model
from momos_hf.metrics import load_metric
from momos_hf.train.schedule import ProjectionSchedule


@torch.no_grad()
def mean_cosine(student, teacher, batch) -> float:
    """Mean cosine of the student's sentence embeddings to the teacher's (`momos_hf.metrics` embedding_cosine)."""
    a = sentence_embeddings(student(**batch).last_hidden_state, batch["attention_mask"])
    b = sentence_embeddings(teacher(**batch).last_hidden_state, batch["attention_mask"])
    return load_metric("embedding_cosine", keep_in_memory=True).compute(predictions=a.tolist(), references=b.tolist())[
        "cosine"
    ]


def distil(teacher, tokenizer, held_out, train_lines, s: int, args) -> dict:
    config = MoMosConfig(
        k=256,
        s=s,
        scale=True,
        fit=args.fit,
        kmeans_iters=args.kmeans_iters,
        train_mode=args.mode,
        project_every=args.project_every,
        modules_to_save=["LayerNorm"],
    )
    start = time.perf_counter()
    calibration = None
    if args.fit == "data-aware":
        lines = train_lines[:: max(1, len(train_lines) // 256)][:256]
        calibration = [encode(tokenizer, lines[i : i + 32]) for i in range(0, len(lines), 32)]
    student = get_momos_model(copy.deepcopy(teacher), config, calibration)
    before = mean_cosine(student, teacher, held_out)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.lr)
    rng = random.Random(0)
    schedule = ProjectionSchedule(student)
    for step in range(1, args.steps + 1):
        batch = encode(tokenizer, rng.sample(train_lines, args.batch_size))
        with torch.no_grad():
            target = teacher(**batch).last_hidden_state
        hidden = student(**batch).last_hidden_state
        mask = batch["attention_mask"].bool()
        mask_pooled = batch["attention_mask"]
        cosine = (sentence_embeddings(hidden, mask_pooled) * sentence_embeddings(target, mask_pooled)).sum(-1).mean()
        loss = F.mse_loss(hidden[mask], target[mask]) + (1 - cosine)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step_end(step)
        if step % 50 == 0:
            print(f"  s={s} step {step}: loss {loss.item():.4f}, batch cosine {cosine.item():.4f}", flush=True)
    schedule.train_end(args.steps)
    after = mean_cosine(student, teacher, held_out)
    return {
        "s": s,
        "k": 256,
        "fit": args.fit,
        "bits_per_weight": 8 / s,
        "cosine_projection_only": before,
        "cosine_distilled": after,
        "steps": args.steps,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mode", choices=("motifs", "projected", "ste"), default="motifs")
    parser.add_argument("--block_sizes", type=int, nargs="+", default=[4, 16], help="values of s to run")
    parser.add_argument("--project_every", type=int, default=50)
    parser.add_argument("--kmeans_iters", type=int, default=5)
    parser.add_argument(
        "--fit", choices=("kmeans", "data-aware"), default="data-aware", help="how the distillation starts"
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.disable_progress_bar()
    torch.manual_seed(0)
    teacher, tokenizer, _ = load_minilm()
    held_out = encode(tokenizer, shakespeare_lines("valid"))
    train_lines = shakespeare_lines("train", n=20000)
    results = [distil(teacher, tokenizer, held_out, train_lines, s, args) for s in args.block_sizes]
    print(f"\n{'bits/w':>6} {'s':>3} {'cos, projection only':>21} {'cos, distilled':>15} {'seconds':>8}")
    for r in results:
        print(
            f"{r['bits_per_weight']:>6.1f} {r['s']:>3} {r['cosine_projection_only']:>21.4f} "
            f"{r['cosine_distilled']:>15.4f} {r['seconds']:>8.0f}"
        )
    write_json(args.json, results)


if __name__ == "__main__":
    main()
