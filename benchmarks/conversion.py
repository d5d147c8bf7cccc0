"""Conversion throughput and peak memory of k-means and data-aware fitting vs model size.

Llamas of 2, 4 and 8 layers (hidden 1024, about 26M, 51M and 102M converted weights) are built from a
config and converted with k=256, s=16, each in a fresh process that reports the wall time of
`get_momos_model` and the peak resident memory above the built model. Data-aware conversion includes
its calibration: 16 random sequences of 128 tokens. A least-squares line `seconds = a + b * weights`
over the sizes shows whether time grows linearly with parameters.
Usage: python benchmarks/conversion.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse

from common import run_child, write_json

CHILD = """
import json, resource, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging
from momos_hf import MoMosConfig, get_momos_model
logging.disable_progress_bar()
layers, hidden, init = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                     num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
model = LlamaForCausalLM(config).eval()
calibration = [{"input_ids": torch.randint(0, 1024, (4, 128), generator=torch.Generator().manual_seed(i))} for i in range(4)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
mm = get_momos_model(model, MoMosConfig(k=256, s=16, fit=init), calibration if init == "data-aware" else None)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = sum(l.in_features * l.out_features for l in mm.momos_layers().values())
print(json.dumps({"weights": weights, "seconds": seconds, "peak_above_model_mib": (peak - before) / 1024}))
"""


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Intercept, slope and R^2 of the least-squares line through `(xs, ys)`."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return intercept, slope, 1 - ss_res / ss_tot if ss_tot > 0 else 1.0


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: hidden 128, 1-3 layers")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    hidden, layer_counts = (128, [1, 2, 3]) if args.quick else (1024, [2, 4, 8])
    rows = []
    print(f"{'init':<11} {'layers':>6} {'Mweights':>9} {'seconds':>8} {'Mweights/s':>10} {'peak above model MiB':>21}")
    for init in ("kmeans", "data-aware"):
        for layers in layer_counts:
            row = dict(init=init, layers=layers, **run_child(CHILD, layers, hidden, init))
            rows.append(row)
            print(f"{init:<11} {layers:>6} {row['weights'] / 1e6:>9.1f} {row['seconds']:>8.1f} "
                  f"{row['weights'] / row['seconds'] / 1e6:>10.2f} {row['peak_above_model_mib']:>21.0f}", flush=True)
        points = [r for r in rows if r["init"] == init]
        a, b, r2 = linear_fit([r["weights"] for r in points], [r["seconds"] for r in points])
        print(f"{init}: seconds = {a:.2f} + {b * 1e6:.2f} per Mweight (R^2 = {r2:.4f})")
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
