"""Fit the real all-MiniLM-L6-v2 with MoMos and compare the weight error with the Gaussian bound.

For each setting: the relative weight error of the converted layers, pooled over layers
(sum ||W - W_hat||^2 / sum ||W - mean W||^2), its ratio to the rate-distortion bound of an i.i.d. Gaussian
source at the same bits per weight, D(R) = 2^(-2R); the conversion time and weights per second; and,
as a first look at function, the mean cosine of sentence embeddings to the dense model on held-out
Shakespeare lines. Usage: python benchmarks/fit_minilm.py [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import encode, load_minilm, sentence_embeddings, shakespeare_lines, write_json
from transformers.utils import logging

from momos_hf import MoMosConfig, get_momos_model
from momos_hf.mosaic import index_bits

SETTINGS = [("sample", 16, 256), ("kmeans", 16, 256), ("sample", 4, 256), ("kmeans", 4, 256)]


@torch.no_grad()
def embed(model, batch) -> torch.Tensor:
    return sentence_embeddings(model(**batch).last_hidden_state, batch["attention_mask"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--kmeans_iters", type=int, default=15)
    args = parser.parse_args()
    logging.disable_progress_bar()
    torch.manual_seed(0)
    dense, tokenizer, path = load_minilm()
    batch = encode(tokenizer, shakespeare_lines())
    reference = embed(dense, batch)
    print(f"all-MiniLM-L6-v2 from {path}, torch threads: {torch.get_num_threads()}")
    head = (
        f"{'init':<7} {'s':>3} {'k':>4} {'bits/w':>6} {'rel.err':>8} {'bound':>7} {'err/bound':>9} {'fit s':>6} "
        f"{'Mweights/s':>10} {'emb.cos':>7}"
    )
    print(head)
    print("-" * len(head))
    results = []
    for init, s, k in SETTINGS:
        model = copy.deepcopy(dense)
        originals = {
            n: m.weight.detach().clone()
            for n, m in model.named_modules()
            if hasattr(m, "weight") and m.weight is not None
        }
        start = time.perf_counter()
        mm = get_momos_model(model, MoMosConfig(k=k, s=s, fit=init, kmeans_iters=args.kmeans_iters))
        seconds = time.perf_counter() - start
        layers = mm.momos_layers()
        squared_error = sum(
            float((originals[n] - l.mosaic_weight().detach()).square().sum()) for n, l in layers.items()
        )
        spread = sum(float((originals[n] - originals[n].mean()).square().sum()) for n in layers)
        weights = sum(originals[n].numel() for n in layers)
        bits = index_bits(k) / s
        error, bound = squared_error / spread, 2 ** (-2 * bits)
        cosine = float((embed(mm, batch) * reference).sum(-1).mean())
        row = dict(
            init=init,
            s=s,
            k=k,
            bits_per_weight=bits,
            rel_error=error,
            gaussian_bound=bound,
            error_over_bound=error / bound,
            fit_seconds=seconds,
            weights_per_second=weights / seconds,
            embedding_cosine=cosine,
            layers=len(layers),
            weights=weights,
        )
        results.append(row)
        print(
            f"{init:<7} {s:>3} {k:>4} {bits:>6.2f} {error:>8.4f} {bound:>7.4f} {error / bound:>9.3f} {seconds:>6.1f} "
            f"{weights / seconds / 1e6:>10.2f} {cosine:>7.3f}"
        )
    write_json(args.json, results)


if __name__ == "__main__":
    main()
